"""The attention backends "qk_sniff" wraps, and the mask function that goes with each.

Attention is computed by transformers' own functions, untouched, so logits are the
wrapped backend's bit for bit. The sdpa function and every mask are looked up in transformers'
registries at each call, not imported by name: a release (or a user) that registers another
function under "sdpa" changes what a model loaded with "sdpa" runs, and "qk_sniff" runs the same.
"""

from __future__ import annotations

import sys

from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qk_attn.capture import active


def eager_forward(module, *args, **kwargs):
    """The model's own eager attention (each modeling file defines `eager_attention_forward`)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        name = active.current_config().setting_name("backend")
        raise ValueError(f"{name}=eager: {type(module).__module__} defines no eager_attention_forward; use {name}=sdpa")
    return fn(module, *args, **kwargs)


def flash_forward(module, *args, **kwargs):
    """Flash attention cannot be wrapped under another name: transformers takes its flash-only
    branches (generate()'s mask handling, chunked-attention guards) by the implementation's
    name, and loads flash kernels only for the names `flash_attention_{2,3,4}`."""
    raise ValueError(
        f"{active.current_config().setting_name('backend')}=flash_attention_2: flash attention is recorded under "
        'its own name: call qk_attn.wrap_flash_attention() and load the model with attn_implementation="flash_attention_2"'
    )


_OWN_FORWARDS = {"eager": eager_forward, "flash_attention_2": flash_forward}


def attention_forward(backend: str):
    """What a model loaded with `backend` calls: the registered function (sdpa), its modeling file's
    own (eager, the default transformers falls back to), or the flash refusal."""
    own = _OWN_FORWARDS.get(backend)
    return own if own is not None else ALL_ATTENTION_FUNCTIONS[backend]


def mask_function(backend: str):
    """The mask function transformers builds `backend`'s masks with."""
    return ALL_MASK_ATTENTION_FUNCTIONS[backend]
