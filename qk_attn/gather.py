"""Sampler mask -> compaction -> gather, in plain torch: the reference the Triton kernel matches.

Nothing here reads a device value on the host: selection is compacted with
`nonzero_static` into a fixed-capacity buffer and the true count travels with the rows.
"""

from __future__ import annotations

import torch

from .sampler import Sampler


def gather_rows(
    states: torch.Tensor,
    token_offset: int | torch.Tensor,
    heads: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    example_ids: torch.Tensor,
    sampler: Sampler,
    layer: int,
    kind: str,
    capacity: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select and gather the kept tokens of one attention call for one kind.

    Args:
        states:       (B, H, K, D) query or key states as the attention function got them.
        token_offset: index along K of the first new token (a device scalar is fine).
        heads:        (Hs,) int64 head ids to keep, on the device of `states`.
        positions:    (B, T) int64 RoPE positions of the T new tokens.
        valid:        (B, T) bool, False for padding.
        example_ids:  (B,) int64 on the device.
        capacity:     rows reserved; the selected count may exceed it (flagged downstream).

    Returns (count (), row (cap,), position (cap,) int32, bucket (cap,) int32,
    vectors (Hs, cap, D) in `out_dtype`), token-major in (row, t) order.
    """
    num_tokens = positions.shape[1]
    keep = sampler.keep(example_ids, layer, kind, positions) & valid
    flat = keep.reshape(-1)
    count = flat.sum()
    index = torch.nonzero_static(flat, size=capacity, fill_value=-1).squeeze(1)
    in_range = index >= 0
    safe = index.clamp(min=0)
    row = torch.where(in_range, safe // num_tokens, -1)
    token = safe % num_tokens
    position = positions.reshape(-1)[safe]
    bucket = sampler.bucket_of(position)
    vectors = states[safe // num_tokens, :, token + token_offset][:, heads]  # (cap, Hs, D)
    vectors = vectors.transpose(0, 1).to(out_dtype).contiguous()
    return count, row, position.to(torch.int32), bucket.to(torch.int32), vectors
