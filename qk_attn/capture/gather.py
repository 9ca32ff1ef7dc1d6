"""Sampler mask -> compaction -> gather, in plain torch: the reference the Triton kernel matches.

Nothing here reads a device value on the host: selection is compacted with
`nonzero_static` into a fixed-capacity buffer and the true count travels with the rows.
`select_rows` is the entry point of the attention path: it dispatches to the fused kernel
(`qk_attn.kernels.select_gather`) where it can run and to `gather_rows` elsewhere.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from qk_attn.sampler import Sampler

logger = logging.getLogger(__name__)


class Selection(NamedTuple):
    """Which new tokens one call keeps, compacted into `capacity` slots (filler where fewer)."""

    count: torch.Tensor  # () tokens selected (may exceed the capacity: flagged downstream)
    row: torch.Tensor  # (cap,) batch row, -1 for filler
    batch: torch.Tensor  # (cap,) batch row, 0 for filler (safe to index with)
    token: torch.Tensor  # (cap,) index among the T new tokens
    position: torch.Tensor  # (cap,) int32
    bucket: torch.Tensor  # (cap,) int32


def select_tokens(keep: torch.Tensor, positions: torch.Tensor, sampler: Sampler, capacity: int) -> Selection:
    """Compact the (B, T) keep mask into token-major (row, t) order, without a host read."""
    num_tokens = positions.shape[1]
    flat = keep.reshape(-1)
    index = torch.nonzero_static(flat, size=capacity, fill_value=-1).squeeze(1)
    safe = index.clamp(min=0)
    batch = safe // num_tokens
    position = positions.reshape(-1)[safe]
    return Selection(flat.sum(), torch.where(index >= 0, batch, -1), batch, safe % num_tokens,
                     position.to(torch.int32), sampler.bucket_of(position).to(torch.int32))


def gather_selected(states: torch.Tensor, selection: Selection, token_offset: int | torch.Tensor,
                    heads: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(Hs, cap, D) vectors of `heads` (None: every head, in order) at the selected tokens;
    `states` is (B, H, K, D) and the new tokens start at `token_offset` along K."""
    vectors = states[selection.batch, :, selection.token + token_offset]  # (cap, H, D)
    if heads is not None:
        vectors = vectors[:, heads]
    return vectors.transpose(0, 1).to(out_dtype).contiguous()


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
    keep: torch.Tensor | None = None,
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
        keep:         (B, T) bool, the sampler's decision already made for this call (and
                      `valid`), or None to make it here.

    Returns (count (), row (cap,), position (cap,) int32, bucket (cap,) int32,
    vectors (Hs, cap, D) in `out_dtype`), token-major in (row, t) order.
    """
    if keep is None:
        keep = sampler.keep(example_ids, layer, kind, positions) & valid
    selection = select_tokens(keep, positions, sampler, capacity)
    vectors = gather_selected(states, selection, token_offset, heads, out_dtype)
    return selection.count, selection.row, selection.position, selection.bucket, vectors


def select_rows(
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
    *,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    interleaved: bool = False,
    query_scale: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gather_rows` on the fastest path available: what the attention call uses.

    Same arguments and outputs as `gather_rows`, plus the optional inverse RoPE of
    `qk_attn.kernels.select_gather.gather_rows_triton` (cos/sin/interleaved/query_scale;
    fp32 math, then `out_dtype`). Dispatch (see `uses_kernel`):

        CUDA tensors, Triton importable     -> the fused Triton kernel (one launch)
        CPU tensors with TRITON_INTERPRET=1 -> the same kernel in Triton's interpreter (tests)
        anything else                       -> `gather_rows` (+ the torch inverse-RoPE reference)

    Rows `[0, min(count, capacity))` are identical on every path; rows past `count` are
    filler and differ between paths.
    """
    args = (states, token_offset, heads, positions, valid, example_ids, sampler, layer, kind, capacity, out_dtype)
    rope = dict(cos=cos, sin=sin, interleaved=interleaved, query_scale=query_scale)
    if uses_kernel(states, out_dtype):
        from qk_attn.kernels.select_gather import gather_rows_triton

        return gather_rows_triton(*args, **rope)
    if cos is None and query_scale is None:
        return gather_rows(*args, keep=keep)
    from qk_attn.kernels.select_gather import gather_rows_reference

    return gather_rows_reference(*args, **rope)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_kernel(states: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether `select_rows` runs the Triton kernel for these inputs (decided without a device sync)."""
    if states.dtype not in _KERNEL_DTYPES or out_dtype not in _KERNEL_DTYPES:
        return False
    if states.device.type == "cuda":
        return _triton_available(warn=True)
    if states.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _triton_available(warn=False)
    return False


@functools.lru_cache(maxsize=None)
def _triton_available(warn: bool) -> bool:
    """Import the kernel module once; without Triton the torch path serves (a soft no)."""
    from qk_attn.kernels import select_gather

    if not select_gather.HAS_TRITON and warn:
        logger.warning(
            "qk-attn: Triton is not installed, so capture uses the torch path on CUDA "
            "(correct, a few extra launches per attention call); pip install 'qk-attn[triton]' for the fused kernel"
        )
    return select_gather.HAS_TRITON
