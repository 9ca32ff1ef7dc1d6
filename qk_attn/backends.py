"""The attention backends "qk_sniff" wraps, and the mask function that goes with each.

Attention is computed by transformers' own functions, untouched, so logits are the
wrapped backend's bit for bit.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import weakref

from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, flash_attention_mask, sdpa_mask

MASKS = {"sdpa": sdpa_mask, "eager": eager_mask, "flash_attention_2": flash_attention_mask}


def eager_forward(module, *args, **kwargs):
    """The model's own eager attention (each modeling file defines `eager_attention_forward`)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"QK_SNIFF_BACKEND=eager: {type(module).__module__} defines no eager_attention_forward; "
            "use QK_SNIFF_BACKEND=sdpa"
        )
    return fn(module, *args, **kwargs)


class _FlashView:
    """The attention module as flash attention should see it: transformers' flash integration
    looks its kernel up by `module.config._attn_implementation`, which is "qk_sniff" here."""

    def __init__(self, module):
        self._module = module
        self.config = copy.copy(module.config)
        self.config._attn_implementation = "flash_attention_2"

    def __getattr__(self, name):
        return getattr(self._module, name)


_flash_views: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def flash_forward(module, *args, **kwargs):
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "QK_SNIFF_BACKEND=flash_attention_2 needs the flash-attn package (pip install 'qk-attn[flash]'); "
            "use QK_SNIFF_BACKEND=sdpa or eager otherwise"
        )
    from transformers.integrations.flash_attention import flash_attention_forward

    view = _flash_views.get(module)
    if view is None:
        view = _flash_views[module] = _FlashView(module)
    return flash_attention_forward(view, *args, **kwargs)


FORWARDS = {"sdpa": sdpa_attention_forward, "eager": eager_forward, "flash_attention_2": flash_forward}
