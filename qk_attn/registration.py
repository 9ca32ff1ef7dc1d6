"""Add "qk_sniff" to transformers' attention and mask registries (idempotent)."""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .backends import MASKS
from .capture import qk_sniff_attention

NAME = "qk_sniff"


def qk_sniff_mask(*args, **kwargs):
    """The mask of the wrapped backend. Without a registered mask, transformers would hand
    "qk_sniff" no mask at all, silently losing padding and sliding windows."""
    from .session import current_config

    return MASKS[current_config().backend](*args, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, qk_sniff_attention)
    AttentionMaskInterface.register(NAME, qk_sniff_mask)
