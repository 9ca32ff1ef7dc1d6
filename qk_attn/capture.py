"""The "qk_sniff" attention function: the wrapped backend's attention, plus capture.

Data path of one call (nothing here reads a device value on the host):

    attention call -> TokenContext (positions, validity, where the new keys sit)
                   -> per kind: select_rows (sampler mask, compaction, gather)
                   -> optional inverse RoPE -> CaptureBatch -> session's sink
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import FORWARDS


def qk_sniff_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered as "qk_sniff". query (B, Hq, T, D), key/value (B, Hkv, K, D), post-RoPE;
    K includes cached keys. Returns whatever the wrapped backend returns."""
    from .session import current_config, current_session

    output = FORWARDS[current_config().backend](module, query, key, value, attention_mask, **kwargs)
    session = current_session()
    # Vision towers have no layer_idx: only text attention layers are recorded.
    if session is not None and getattr(module, "layer_idx", None) is not None:
        session.capture(module, query, key, attention_mask, kwargs)
    return output


def is_cross_attention(module) -> bool:
    """Cross-attention layers (Mllama) attend text queries to vision keys."""
    explicit = getattr(module, "is_cross_attention", None)
    return bool(explicit) if explicit is not None else "CrossAttention" in type(module).__name__


def key_validity(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """(B, K) bool: key k of row b is attended by some query. None means all valid.

    mask is what the mask interface built: bool or additive float (B|1, 1|H, Q, K), or the
    2-D (B, K) padding mask that flash attention uses.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    valid = mask if mask.dim() == 2 else mask.any(-2)[:, 0]
    return valid.expand(batch, -1)


@dataclass
class TokenContext:
    """The T new tokens of one call: where they sit in K, their positions and validity."""

    offset: int | torch.Tensor  # index along K of new token 0 (a device scalar for static caches)
    positions: torch.Tensor  # (B, T) int64
    valid: torch.Tensor  # (B, T) bool

    @classmethod
    def build(cls, query, key, mask, position_ids) -> "TokenContext":
        batch, num_new, num_keys = query.shape[0], query.shape[2], key.shape[2]
        device = query.device
        key_valid = key_validity(mask, batch)
        offset = new_token_offset(key_valid, num_new, num_keys)
        if key_valid is None:
            valid = torch.ones(batch, num_new, dtype=torch.bool, device=device)
        else:
            valid = key_valid.index_select(1, torch.arange(num_new, device=device) + offset)
        if position_ids is None:
            positions = torch.arange(num_new, device=device) + offset
        else:
            positions = position_ids[0] if position_ids.dim() == 3 else position_ids  # mrope: text axis
        return cls(offset, positions.to(torch.int64).expand(batch, num_new), valid)


def new_token_offset(key_valid: torch.Tensor | None, num_new: int, num_keys: int) -> int | torch.Tensor:
    """Index along K of the first new token.

    Without a cache (K == T) it is 0. A dynamic cache appends: K - T. A static cache holds
    max_cache_len slots and the new tokens end at the last slot any query attends; with no
    mask at all and T > 1 < K, transformers is prefilling an empty static cache (its
    upper-left causal case), so the new tokens start at 0.
    """
    if num_keys == num_new:
        return 0
    if key_valid is None:
        return 0 if num_new > 1 else num_keys - num_new
    attended = key_valid.any(0)
    last = num_keys - 1 - attended.flip(0).to(torch.int8).argmax()
    return last + 1 - num_new


def cross_key_context(key, mask) -> TokenContext:
    """Vision keys of a cross-attention layer: position = vision token index."""
    batch, num_keys = key.shape[0], key.shape[2]
    valid = key_validity(mask, batch)
    if valid is None:
        valid = torch.ones(batch, num_keys, dtype=torch.bool, device=key.device)
    positions = torch.arange(num_keys, device=key.device).expand(batch, num_keys)
    return TokenContext(0, positions, valid)
