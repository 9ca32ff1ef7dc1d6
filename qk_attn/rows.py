"""The unit that leaves the attention call: one `CaptureBatch` per (call, kind), and its schema.

A batch is still on the compute device when it is handed to a sink: the attention call
never waits for it. Only the sink (transfer/saver) reads `count`, after an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

KINDS = ("q", "k")


class CaptureOverflow(RuntimeError):
    """More tokens were selected in one attention call than its staging capacity holds."""


class PackedSequences(RuntimeError):
    """A batch row holds several documents (positions restart): refused, never recorded with repeats."""


@dataclass
class CaptureBatch:
    """Selected rows of one attention call for one kind, laid out head-major.

    Shapes (cap = staging capacity, H = len(heads), D = head_dim):
        count      ()          int64   rows selected; count > cap means overflow
        row        (cap,)      int64   batch row of each selected token (-1 past count)
        position   (cap,)      int32   position the model used (RoPE position)
        bucket     (cap,)      int32   sampler bucket of that position
        vectors    (H, cap, D) float   vectors[i, j] = head heads[i] of token j
        valid      (B,)        int64   valid (non-pad) new tokens per batch row in this call
        packed     (B,) | None bool    the row's positions restart: packed documents (refused on the host)
    """

    layer: int
    kind: str
    heads: tuple[int, ...]
    example_ids: tuple[int, ...]
    sliding_window: int | None
    cross_attention: bool
    count: torch.Tensor
    row: torch.Tensor
    position: torch.Tensor
    bucket: torch.Tensor
    vectors: torch.Tensor
    valid: torch.Tensor
    packed: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.row.shape[0]

    @property
    def head_dim(self) -> int:
        return self.vectors.shape[-1]

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "CaptureBatch":
        """A copy of every tensor on `device` (the saver calls this on host buffers)."""
        moved = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("count", "row", "position", "bucket", "vectors", "valid", "packed")
            if getattr(self, name) is not None
        }
        return CaptureBatch(
            self.layer, self.kind, self.heads, self.example_ids, self.sliding_window, self.cross_attention, **moved
        )

    def host_rows(self, first_row: int = 0, staging_capacity: int | None = None, with_valid: bool = True) -> "HostRows":
        """Trim to `count` on the host. Raises `CaptureOverflow` instead of dropping rows.

        A transfer piece holds rows [first_row, first_row + capacity) of a batch whose whole
        staging buffer had `staging_capacity` rows; only its first piece reports `valid`.
        `vectors` may stay a view of this batch's memory; the small columns are copies.
        """
        count = int(self.count.reshape(-1)[0])
        if self.packed is not None and bool(self.packed.any()):
            packed = [self.example_ids[i] for i in self.packed.nonzero().flatten().tolist()]
            raise PackedSequences(
                f"examples {packed}: positions restart inside a batch row (packed documents), so positions would "
                "repeat within one example; run one document per batch row (pad instead of packing)")
        staging_capacity = self.capacity if staging_capacity is None else staging_capacity
        if count > staging_capacity:
            raise CaptureOverflow(
                f"layer {self.layer} kind {self.kind}: {count} tokens selected but the staging buffer holds "
                f"{staging_capacity}; no rows of this call were dropped silently. Use a sparser sampler or "
                f"a smaller batch, or report this (the capacity bound is mean + 8 sd)."
            )
        n = min(max(count - first_row, 0), self.capacity)
        row = self.row[:n].cpu().numpy()
        ids = np.asarray(self.example_ids, dtype=np.int64)
        return HostRows(
            layer=self.layer,
            kind=self.kind,
            heads=self.heads,
            sliding_window=self.sliding_window,
            cross_attention=self.cross_attention,
            example_id=ids[row] if n else np.zeros(0, np.int64),
            position=self.position[:n].cpu().numpy().astype(np.int32, copy=True),
            bucket=self.bucket[:n].cpu().numpy().astype(np.int32, copy=True),
            vectors=self.vectors[:, :n].cpu().numpy(),
            valid=dict(zip(self.example_ids, self.valid.cpu().tolist())) if with_valid else {},
        )


@dataclass
class HostRows:
    """A `CaptureBatch` trimmed to its rows, as numpy arrays (vectors: (H, N, D))."""

    layer: int
    kind: str
    heads: tuple[int, ...]
    sliding_window: int | None
    cross_attention: bool
    example_id: np.ndarray
    position: np.ndarray
    bucket: np.ndarray
    vectors: np.ndarray
    valid: dict[int, int]

    def __len__(self) -> int:
        return len(self.position)

    def table(self, head_index: int, vector_type: pa.DataType = pa.float32()) -> pa.Table:
        """The rows of one head as an Arrow table in the dataset schema, built without row loops."""
        n, dim = len(self), self.vectors.shape[-1]
        flat = np.ascontiguousarray(self.vectors[head_index], dtype=vector_type.to_pandas_dtype()).reshape(-1)
        columns = [
            pa.array(self.example_id, pa.int64()),
            pa.array(self.position, pa.int32()),
            pa.array(self.bucket, pa.int32()),
            pa.array(np.full(n, self.layer, np.int16)),
            pa.array(np.full(n, self.heads[head_index], np.int16)),
            pa.repeat(pa.scalar(self.kind, pa.string()), n),
            pa.nulls(n, pa.int32()) if self.sliding_window is None else pa.array(np.full(n, self.sliding_window, np.int32)),
            pa.FixedSizeListArray.from_arrays(pa.array(flat, vector_type), dim),
        ]
        return pa.Table.from_arrays(columns, schema=arrow_schema(dim, vector_type))


def arrow_schema(head_dim: int, vector_type: pa.DataType = pa.float32()) -> pa.Schema:
    """Columns of every shard (DESIGN §5)."""
    return pa.schema(
        [
            ("example_id", pa.int64()),
            ("position", pa.int32()),
            ("bucket", pa.int32()),
            ("layer", pa.int16()),
            ("head", pa.int16()),
            ("kind", pa.string()),
            ("sliding_window", pa.int32()),
            ("vector", pa.list_(vector_type, head_dim)),
        ]
    )


class Sink(Protocol):
    """Where capture batches go. `put` is called inside the attention call and must not block
    on the device; `commit` marks whole examples durable; `close` commits and releases."""

    def put(self, batch: CaptureBatch) -> None: ...

    def commit(self, example_ids: list[int]) -> None: ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps every batch's rows on the host; for tests and small interactive runs."""

    def __init__(self) -> None:
        self.rows: list[HostRows] = []
        self.committed: list[int] = []

    def put(self, batch: CaptureBatch) -> None:
        self.rows.append(batch.host_rows())

    def commit(self, example_ids: list[int]) -> None:
        self.committed.extend(example_ids)

    def close(self) -> None:
        pass

    def table(self) -> pa.Table:
        """Every captured row of every head, in the dataset schema (vectors as float32)."""
        tables = [rows.table(i) for rows in self.rows for i in range(len(rows.heads))]
        return pa.concat_tables(tables) if tables else None
