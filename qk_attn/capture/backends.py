"""The attention backends "qk_sniff" wraps, and the mask function that goes with each.

Attention is computed by transformers' own functions, untouched, so logits are the
wrapped backend's bit for bit. The sdpa function and every mask are looked up in transformers'
registries at each call, not imported by name: a release (or a user) that registers another
function under "sdpa" changes what a model loaded with "sdpa" runs, and "qk_sniff" runs the same.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap

from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qk_attn.capture import active
from qk_attn.capture.frames import running_encoder_decoder
from qk_attn.capture.parsing import parse
from qk_attn.errors import CaptureError

# The class flag transformers reads before it runs a model with a backend (named in qk_attn.capture.facts).
SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def eager_forward(module, *args, **kwargs):
    """The model's own eager attention: what its attention forward falls back to for "eager"."""
    return _eager_attention_of(type(module))(module, *args, **kwargs)


@functools.cache
def _eager_attention_of(cls):
    """The function `cls.forward` passes to `ALL_ATTENTION_FUNCTIONS.get_interface` (or `.get`) as its
    default (what transformers runs for "eager"), read from the forward's source and looked up in the forward's
    own module; the module's `eager_attention_forward` when the forward names none."""
    forward = inspect.unwrap(cls.forward)
    try:
        tree = parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):  # no source to read: the modeling file's convention
        tree = ast.Module(body=[], type_ignores=[])
    defaults = {ast.unparse(node.args[1]) for node in ast.walk(tree) if _registry_lookup(node) and len(node.args) > 1}
    name = next(iter(defaults)) if defaults else "eager_attention_forward"
    fn = getattr(sys.modules.get(forward.__module__), name, None)
    if fn is None or len(defaults) > 1:
        setting = active.current_config().setting_name("backend")
        found = f"names several: {sorted(defaults)}" if len(defaults) > 1 else f"names {name}, which its module lacks"
        raise ValueError(
            f"{setting}=eager: the eager attention of {cls.__qualname__} ({forward.__module__}) cannot be told: "
            f"its forward {found}; use {setting}=sdpa"
        )
    return fn


def _registry_lookup(node: ast.AST) -> bool:
    """`X.get_interface(name, default)`, or `ALL_ATTENTION_FUNCTIONS.get(name, default)` (a mapping lookup
    a release might use instead): a call whose second argument is what "eager" runs."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return False
    return node.func.attr == "get_interface" or (
        node.func.attr == "get" and ast.unparse(node.func.value).endswith("ATTENTION_FUNCTIONS")
    )


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


def check_backend_support(model, backend: str) -> None:
    """CaptureError (one line) for a model class that transformers would not run with `backend`
    (`_supports_sdpa` is False: GPT-OSS, whose sdpa would drop its attention sinks): "qk_sniff"
    would compute another attention than the model's, capture on or off."""
    flag = SUPPORT_FLAGS.get(backend)
    if model is None or flag is None or getattr(type(model), flag, True):
        return
    name = type(model).__name__
    # Where eager could not be recorded either, advising it would lead to a second, other refusal.
    outer = running_encoder_decoder()  # (T5Gemma's encoder has a config of its own, not an encoder-decoder's)
    if outer is not None:
        raise CaptureError(
            f"qk_sniff: {name} belongs to an encoder-decoder model ({type(outer).__name__}); qk-attn records "
            "decoder-only models"
        )
    if not hasattr(sys.modules.get(type(model).__module__), "ALL_ATTENTION_FUNCTIONS"):
        raise CaptureError(
            f"qk_sniff: {name}'s attention does not go through transformers' attention interface (its modeling "
            'file never looks up ALL_ATTENTION_FUNCTIONS), so no backend of "qk_sniff" can record it; qk-attn records '
            "models whose attention modules call it"
        )
    setting = active.current_config().setting_name("backend")
    raise CaptureError(
        f"qk_sniff: {name} does not support {backend} in transformers ({flag} is False), so "
        f"{setting}={backend} would compute another attention than the model's; use {setting}=eager"
    )


def mask_function(backend: str):
    """The mask function transformers builds `backend`'s masks with."""
    return ALL_MASK_ATTENTION_FUNCTIONS[backend]
