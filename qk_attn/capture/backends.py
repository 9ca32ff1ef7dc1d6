"""The attention backends "qk_sniff" wraps, and the mask function that goes with each.

Attention is computed by transformers' own functions, untouched, so logits are the
wrapped backend's bit for bit.
"""

from __future__ import annotations

import sys

from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, flash_attention_mask, sdpa_mask

from qk_attn.capture import active

MASKS = {"sdpa": sdpa_mask, "eager": eager_mask, "flash_attention_2": flash_attention_mask}


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


FORWARDS = {"sdpa": sdpa_attention_forward, "eager": eager_forward, "flash_attention_2": flash_forward}
