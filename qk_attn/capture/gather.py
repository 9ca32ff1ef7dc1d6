"""Select and gather one call's kept tokens: the selection spec, the torch path, the kernel dispatch.

Nothing here reads a device value on the host: selection is compacted with
`nonzero_static` into a fixed-capacity buffer and the true count travels with the rows.
`select_rows` is the entry point of the attention path: it runs the fused kernel
(`qk_attn.kernels.select_gather`) where it can and `gather_rows` elsewhere; rows are
identical on both (docs/architecture.md).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from qk_attn.sampler import Sampler

logger = logging.getLogger(__name__)


class SelectionSpec(NamedTuple):
    """What one attention call selects for one kind (q or k), and from which states.

    The fields every path takes (torch, kernel, tests); `spec._replace(states=..., heads=...)`
    gathers another per-token table (token ids, cos/sin) by the same selection.
    """

    states: torch.Tensor  # (B, H, K, D) query or key states as the attention function got them
    token_offset: int | torch.Tensor  # index along K of the first new token (a device scalar is fine)
    heads: torch.Tensor  # (Hs,) int64 head ids to keep, on the device of `states`
    positions: torch.Tensor  # (B, T) int64 RoPE positions of the T new tokens
    valid: torch.Tensor  # (B, T) bool, False for padding (never selected)
    example_ids: torch.Tensor  # (B,) int64, on the device
    sampler: Sampler
    layer: int
    kind: str  # "q" or "k"
    capacity: int  # rows reserved; the selected count may exceed it (flagged downstream)
    out_dtype: torch.dtype  # dtype of the gathered vectors
    keep: torch.Tensor | None = None  # (B, T) bool: the sampler's decision (and `valid`) already made, or None

    def decide(self) -> torch.Tensor:
        """(B, T) bool: the sampler's keep decision for these tokens, `valid` ones only."""
        if self.keep is not None:
            return self.keep
        return self.sampler.keep(self.example_ids, self.layer, self.kind, self.positions) & self.valid


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
    return Selection(
        flat.sum(),
        torch.where(index >= 0, batch, -1),
        batch,
        safe % num_tokens,
        position.to(torch.int32),
        sampler.bucket_of(position).to(torch.int32),
    )


def gather_selected(
    states: torch.Tensor,
    selection: Selection,
    token_offset: int | torch.Tensor,
    heads: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(Hs, cap, D) vectors of `heads` (None: every head, in order) at the selected tokens;
    `states` is (B, H, K, D) and the new tokens start at `token_offset` along K."""
    tokens = selection.token if isinstance(token_offset, int) and token_offset == 0 else selection.token + token_offset
    if states.shape[0] == 1:  # one row: a single index_select gives (H, cap, D) in order (a decode step)
        vectors = states[0].index_select(1, tokens)
    else:
        vectors = states[selection.batch, :, tokens].transpose(0, 1)  # (H, cap, D)
    if heads is not None:
        vectors = vectors[heads]
    return vectors.to(out_dtype).contiguous()


def selected_token_ids(selection: Selection, tokens) -> tuple[Selection, torch.Tensor | None]:
    """`selection` and the token id (int32) of each selected token, from the forward's TextTokens."""
    if tokens.token_ids is None:
        return selection, None
    return selection, tokens.token_ids[selection.batch, 0, selection.token, 0].to(torch.int32)


def as_states(table: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """A per-token table (B|1, T, R) as one-head attention states (B, 1, T, R), so that the same
    selection gathers it (cos/sin under rope="pre")."""
    table = table.to(device)
    table = table if table.dim() == 3 else table[None]
    return table[:, None].expand(batch_size, 1, *table.shape[1:])


def gather_rows(spec: SelectionSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select and gather the kept tokens of one attention call for one kind, in torch.

    Returns (count (), row (cap,), position (cap,) int32, bucket (cap,) int32,
    vectors (Hs, cap, D) in `spec.out_dtype`), token-major in (row, t) order.
    """
    selection = select_tokens(spec.decide(), spec.positions, spec.sampler, spec.capacity)
    vectors = gather_selected(spec.states, selection, spec.token_offset, spec.heads, spec.out_dtype)
    return selection.count, selection.row, selection.position, selection.bucket, vectors


def select_rows(spec: SelectionSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gather_rows` on the fastest path available: what the attention call uses.

    Dispatch (see `uses_kernel`):

        CUDA tensors, Triton importable     -> the fused Triton kernel (one launch)
        CPU tensors with TRITON_INTERPRET=1 -> the same kernel in Triton's interpreter (tests)
        anything else                       -> `gather_rows`

    Rows `[0, min(count, capacity))` are identical on every path; rows past `count` are
    filler and differ between paths.
    """
    if uses_kernel(spec.states, spec.out_dtype):
        from qk_attn.kernels.select_gather import gather_rows_triton

        return gather_rows_triton(spec)
    return gather_rows(spec)


def kernel_rows(spec: SelectionSpec, token_ids: torch.Tensor | None, new=None) -> tuple:
    """One call on the kernel path, in one launch: (count, row, position, bucket, vectors, token_id),
    written into tensors made by `new(dtype, shape)` (views of the forward's staging buffer; None:
    new tensors); `token_id` is None without `token_ids` ((B, 1, T, 1) ids of the new tokens)."""
    from qk_attn.kernels.select_gather import gather_rows_triton

    if new is None:
        device = spec.states.device
        new = lambda dtype, shape: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731

    cap, heads, dim = spec.capacity, spec.heads.shape[0], spec.states.shape[-1]
    out = (
        new(torch.int64, ()),
        new(torch.int64, (cap,)),
        new(torch.int32, (cap,)),
        new(torch.int32, (cap,)),
        new(spec.out_dtype, (heads, cap, dim)),
    )
    token_id = None if token_ids is None else new(torch.int32, (cap,))
    gather_rows_triton(spec, out=out, token_ids=token_ids, token_out=token_id)
    return (*out, token_id)


class DeviceTables:
    """Small host tables (example ids, head ids) as int64 device tensors, copied once per value
    (asynchronously from pinned memory on CUDA), not once per attention call."""

    def __init__(self, limit: int = 256) -> None:
        self._tables: dict[tuple, torch.Tensor] = {}
        self.limit = limit

    def get(self, what: str, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (what, tuple(values), device)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > self.limit:
                self._tables.clear()
            host = torch.tensor(values, dtype=torch.int64)
            if device.type == "cuda":
                host = host.pin_memory()
            table = self._tables[key] = host.to(device, non_blocking=True)
        return table


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_kernel(states: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether `select_rows` runs the Triton kernel for these inputs (decided without a device sync)."""
    if states.dtype not in _KERNEL_DTYPES or out_dtype not in _KERNEL_DTYPES:
        return False
    # is_cuda / is_cpu: called twice per attention call, and `tensor.device` builds an object each time
    if states.is_cuda:
        return _triton_available(warn=True)
    if states.is_cpu and _interpreting():
        return _triton_available(warn=False)
    return False


@functools.cache
def _interpreting() -> bool:
    """TRITON_INTERPRET, read once: Triton reads it when the kernel module is imported, and an
    environment lookup per attention call costs more than the rest of this check."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_available(warn: bool) -> bool:
    """Import the kernel module once; without Triton the torch path serves (a soft no)."""
    from qk_attn.kernels import select_gather

    if not select_gather.HAS_TRITON and warn:
        logger.warning(
            "qk-attn: Triton is not installed, so capture uses the torch path on CUDA "
            "(correct, a few extra launches per attention call); pip install 'qk-attn[triton]' for the fused kernel"
        )
    return select_gather.HAS_TRITON
