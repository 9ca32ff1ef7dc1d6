"""The unit that leaves the attention call: one `CaptureBatch` per (call, kind), and its rows on the host.

A batch is still on the compute device when it is handed to a sink (qk_attn.capture.sinks): the
attention call never waits for it. Only the sink (transfer/saver) reads `count`, after an event.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from qk_attn.capture.schema import TokenStrings, columns_table
from qk_attn.errors import CaptureError, CaptureOverflow, MisnumberedPositions

KINDS = ("q", "k")
TENSORS = ("count", "row", "position", "bucket", "vectors", "valid", "token_id", "first_position", "misnumbered")


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
        token_id   (cap,)      int32   token id of each selected token, or None (e.g. vision keys)
        first_position (B,)    int64   smallest position among valid new tokens of each batch row
                                       in this call (int64 max when none), or None
        misnumbered (B,) | None bool   the row's positions do not count up by one (refused on the host:
                                       qk_attn.capture.tokens.misnumbered_rows)
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
    token_id: torch.Tensor | None = None
    first_position: torch.Tensor | None = None
    misnumbered: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.row.shape[0]

    @property
    def head_dim(self) -> int:
        return self.vectors.shape[-1]

    def map_tensors(self, fn) -> CaptureBatch:
        """This batch with every tensor `t` replaced by `fn(t)` (None stays None)."""
        return dataclasses.replace(self, **{name: _apply(fn, getattr(self, name)) for name in TENSORS})

    def host_rows(
        self, first_row: int = 0, staging_capacity: int | None = None, with_valid: bool = True, reader=None
    ) -> HostRows:
        """Trim to `count` on the host. Raises `CaptureOverflow` instead of dropping rows.

        A transfer piece holds rows [first_row, first_row + capacity) of a batch whose whole
        staging buffer had `staging_capacity` rows; only its first piece reports `valid`.
        `reader`: the `HostReader` of this batch's forward (columns its calls share are read once).
        `vectors` may stay a view of this batch's memory; the small columns are copies.
        """
        reader = HostReader() if reader is None else reader
        count = int(_host(self.count, None).reshape(-1)[0])
        per_row = reader.per_row(self.example_ids, self.valid, self.first_position, self.misnumbered)
        staging_capacity = self.capacity if staging_capacity is None else staging_capacity
        if count > staging_capacity:
            raise CaptureOverflow(
                f"layer {self.layer} kind {self.kind}: {count} tokens selected but the staging buffer holds "
                f"{staging_capacity}; its examples are refused rather than recorded in part. Use a sparser sampler or "
                f"a smaller batch, or report this (the capacity bound is mean + 8 sd)."
            )
        n = min(max(count - first_row, 0), self.capacity)
        valid, first = per_row if with_valid else ({}, {})
        example_id, position, bucket, token_id = reader.selection(self, n)
        vectors = _host(self.vectors, n, axis=1)
        if vectors.dtype == np.float16 and _float16_non_finite(vectors):
            _refuse_float16_range(self, vectors, example_id)
        return HostRows(
            layer=self.layer,
            kind=self.kind,
            heads=self.heads,
            sliding_window=self.sliding_window,
            cross_attention=self.cross_attention,
            example_id=example_id,
            position=position,
            bucket=bucket,
            vectors=vectors,
            valid=valid,
            token_id=token_id,
            first_position=first,
        )


def _float16_non_finite(vectors: np.ndarray) -> bool:
    # inf and nan have every exponent bit set; on the bits this is 2x faster than np.isfinite
    return vectors.size > 0 and int((vectors.view(np.uint16) & 0x7C00).max()) == 0x7C00


def _refuse_float16_range(batch: CaptureBatch, vectors: np.ndarray, example_id: np.ndarray) -> None:
    """Vectors stored as float16 (vector_dtype) that are inf or nan: almost always values beyond float16's
    range (65504), which the cast turned into inf; recording them would lose the values silently."""
    bad = sorted(set(example_id[~np.isfinite(vectors).all(axis=(0, 2))].tolist()))
    raise CaptureError(
        f"qk_sniff: layer {batch.layer} kind {batch.kind}: vectors of examples {bad} are not finite in float16 "
        "(beyond its range of +-65504, or inf/nan in the model); vector_dtype='float16' cannot store them, so "
        "nothing of this forward's examples is recorded; record with vector_dtype='float32'"
    )


def _apply(fn, tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else fn(tensor)


def _host(tensor: torch.Tensor, n: int | None, axis: int = 0) -> np.ndarray:
    """The first `n` entries along `axis` (None: all) as numpy: sliced in numpy on the host (a torch
    op costs more than the copy for a decode step's few rows), in torch on a device (only what is
    needed moves)."""
    if n is None:
        return tensor.numpy(force=True)
    if tensor.device.type == "cpu":
        return tensor.numpy()[(slice(None),) * axis + (slice(n),)]
    return tensor.narrow(axis, 0, n).numpy(force=True)


class HostReader:
    """Reads the host columns of one forward's calls, each tensor once: the per-row columns every call
    shares (valid counts, first positions; a row whose positions restart is refused here) and the
    selection columns the calls of a forward share under "all" (rows, positions, token ids)."""

    def __init__(self) -> None:
        self._read: dict[tuple, tuple] = {}

    def _once(self, tensors: tuple, extra: tuple, read):
        """`read()`, memoised by the identity of `tensors` (kept alive with the result) and `extra`."""
        key = (*map(id, tensors), *extra)
        cached = self._read.get(key)
        if cached is None or not all(a is b for a, b in zip(cached[0], tensors)):
            cached = self._read[key] = (tensors, read())
        return cached[1]

    def selection(self, batch: CaptureBatch, n: int) -> tuple:
        """(example_id, position, bucket, token_id) of the batch's first `n` rows, as numpy copies (the
        source may be a pool region); token_id None when the batch has none."""
        columns = (batch.row, batch.position, batch.bucket, batch.token_id)
        return self._once(columns, (n, batch.example_ids), lambda: _selection(batch.example_ids, *columns, n))

    def per_row(self, example_ids, valid, first_position, misnumbered) -> tuple[dict, dict]:
        """({example: valid tokens}, {example: first position}) of one call."""
        return self._once(
            (valid, first_position, misnumbered),
            (),
            lambda: _per_row(example_ids, valid, first_position, misnumbered),
        )


def _selection(example_ids, row, position, bucket, token_id, n: int) -> tuple:
    if not n:
        empty = np.zeros(0, np.int32)
        return np.zeros(0, np.int64), empty, empty, None if token_id is None else empty
    example_id = np.asarray(example_ids, dtype=np.int64)[_host(row, n)]
    token_id = None if token_id is None else _host(token_id, n).astype(np.int32)
    return example_id, _host(position, n).astype(np.int32), _host(bucket, n).astype(np.int32), token_id


def _per_row(example_ids, valid, first_position, misnumbered) -> tuple[dict, dict]:
    # numpy, not torch: a torch op would let go of the GIL and wait to take it back from the model
    if misnumbered is not None and _host(misnumbered, None).any():
        raise MisnumberedPositions.of([example_ids[i] for i in _host(misnumbered, None).nonzero()[0].tolist()])
    first = {} if first_position is None else dict(zip(example_ids, first_position.tolist()))
    return dict(zip(example_ids, valid.tolist())), first


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
    token_id: np.ndarray | None = None  # (N,) int32
    first_position: dict[int, int] = field(default_factory=dict)  # example_id -> first valid position in the call

    def __len__(self) -> int:
        return len(self.position)

    @staticmethod
    def merged(parts: list[HostRows]) -> HostRows:
        """One HostRows of the rows of `parts` (calls of one layer, kind and heads), in order, in new
        arrays; their per-call counts are not kept (`valid`, `first_position`: read when they came)."""
        first = parts[0]
        token_ids = [p.token_id for p in parts]
        return dataclasses.replace(
            first,
            example_id=np.concatenate([p.example_id for p in parts]),
            position=np.concatenate([p.position for p in parts]),
            bucket=np.concatenate([p.bucket for p in parts]),
            vectors=np.concatenate([p.vectors for p in parts], axis=1),
            token_id=None if any(t is None for t in token_ids) else np.concatenate(token_ids),
            valid={},
            first_position={},
        )

    def without(self, example_ids: np.ndarray) -> HostRows:
        """These rows less those of `example_ids`."""
        keep = ~np.isin(self.example_id, example_ids)
        gone = set(example_ids.tolist())
        return dataclasses.replace(
            self,
            example_id=self.example_id[keep],
            position=self.position[keep],
            bucket=self.bucket[keep],
            vectors=self.vectors[:, keep],
            token_id=None if self.token_id is None else self.token_id[keep],
            valid={e: n for e, n in self.valid.items() if e not in gone},
            first_position={e: p for e, p in self.first_position.items() if e not in gone},
        )

    def table(
        self,
        head_index: int,
        vector_type: pa.DataType = pa.float32(),
        token_ids: bool | None = None,
        vocabulary: TokenStrings | None = None,
    ) -> pa.Table:
        """The rows of one head as an Arrow table in the dataset schema, built without row loops.

        `token_ids`: whether the schema has `token_id` (None: when this batch has token ids);
        `vocabulary` (TokenStrings) adds `token_str`."""
        token_ids = self.token_id is not None if token_ids is None else token_ids
        flat = np.ascontiguousarray(self.vectors[head_index], dtype=vector_type.to_pandas_dtype()).reshape(-1)
        return columns_table(
            [self.example_id],
            [self.position],
            [self.bucket],
            [flat],
            [self.token_id],
            self.layer,
            self.heads[head_index],
            self.kind,
            self.sliding_window,
            self.vectors.shape[-1],
            vector_type,
            token_ids,
            vocabulary,
        )
