"""Add "qk_sniff" to transformers' attention and mask registries (idempotent)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .backends import MASKS
from .capture import qk_sniff_attention

NAME = "qk_sniff"


@torch.compiler.disable
def qk_sniff_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask of the wrapped backend. Without a registered mask, transformers would hand
    "qk_sniff" no mask at all, silently losing padding and sliding windows.

    transformers calls it once per forward and mask kind before any layer: the capture
    context of the forward is established here (qk_attn.context). Kept out of compiled
    graphs so that it runs every forward, not once at trace time."""
    from .session import current_config, current_session

    session = current_session()
    if session is not None:
        session.on_mask(kwargs.get("config"), batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask)
    return MASKS[current_config().backend](batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                           q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                                           **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, qk_sniff_attention)
    AttentionMaskInterface.register(NAME, qk_sniff_mask)
