"""The unit that leaves the attention call: one `CaptureBatch` per (call, kind), and the sinks it goes to.

A batch is still on the compute device when it is handed to a sink: the attention call
never waits for it. Only the sink (transfer/saver) reads `count`, after an event.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from qk_attn.capture.schema import columns_table
from qk_attn.errors import CaptureOverflow, PackedSequences

logger = logging.getLogger(__name__)

KINDS = ("q", "k")


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
    token_id: torch.Tensor | None = None
    first_position: torch.Tensor | None = None
    packed: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.row.shape[0]

    @property
    def head_dim(self) -> int:
        return self.vectors.shape[-1]

    def to(self, device: str | torch.device, non_blocking: bool = False) -> CaptureBatch:
        """A copy of every tensor on `device` (the saver calls this on host buffers)."""
        moved = {
            name: None if getattr(self, name) is None else getattr(self, name).to(device, non_blocking=non_blocking)
            for name in (
                "count",
                "row",
                "position",
                "bucket",
                "vectors",
                "valid",
                "token_id",
                "first_position",
                "packed",
            )
        }
        return CaptureBatch(
            self.layer, self.kind, self.heads, self.example_ids, self.sliding_window, self.cross_attention, **moved
        )

    def host_rows(
        self, first_row: int = 0, staging_capacity: int | None = None, with_valid: bool = True, per_row=None
    ) -> HostRows:
        """Trim to `count` on the host. Raises `CaptureOverflow` instead of dropping rows.

        A transfer piece holds rows [first_row, first_row + capacity) of a batch whose whole
        staging buffer had `staging_capacity` rows; only its first piece reports `valid`.
        `per_row`: its (valid, first position) dicts, already read (`PerRow`).
        `vectors` may stay a view of this batch's memory; the small columns are copies.
        """
        count = int(_host(self.count, None).reshape(-1)[0])
        if per_row is None:
            per_row = PerRow().read(self.example_ids, self.valid, self.first_position, self.packed)
        staging_capacity = self.capacity if staging_capacity is None else staging_capacity
        if count > staging_capacity:
            raise CaptureOverflow(
                f"layer {self.layer} kind {self.kind}: {count} tokens selected but the staging buffer holds "
                f"{staging_capacity}; no rows of this call were dropped silently. Use a sparser sampler or "
                f"a smaller batch, or report this (the capacity bound is mean + 8 sd)."
            )
        n = min(max(count - first_row, 0), self.capacity)
        row = _host(self.row, n)
        ids = np.asarray(self.example_ids, dtype=np.int64)
        valid, first = per_row if with_valid else ({}, {})
        return HostRows(
            layer=self.layer,
            kind=self.kind,
            heads=self.heads,
            sliding_window=self.sliding_window,
            cross_attention=self.cross_attention,
            example_id=ids[row] if n else np.zeros(0, np.int64),
            position=_host(self.position, n).astype(np.int32, copy=True),
            bucket=_host(self.bucket, n).astype(np.int32, copy=True),
            vectors=self.vectors[:, :n].numpy(force=True),
            valid=valid,
            token_id=None if self.token_id is None else _host(self.token_id, n).astype(np.int32, copy=True),
            first_position=first,
        )


def _host(tensor: torch.Tensor, n: int | None) -> np.ndarray:
    """The first `n` entries (None: all) as numpy: sliced in numpy on the host (a torch op costs
    more than the copy for a decode step's few rows), in torch on a device (only what is needed moves)."""
    if n is None:
        return tensor.numpy(force=True)
    if tensor.device.type == "cpu":
        return tensor.numpy()[:n]
    return tensor[:n].numpy(force=True)


class PerRow:
    """The per-batch-row columns of calls on the host, read once per tensor: a forward's calls share
    them (valid counts, first positions), and a row whose positions restart is refused here."""

    def __init__(self) -> None:
        self._read: dict[tuple, tuple] = {}

    def read(self, example_ids, valid, first_position, packed) -> tuple[dict, dict]:
        key = (id(valid), id(first_position), id(packed))
        cached = self._read.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], (valid, first_position, packed))):
            return cached[1]
        if packed is not None and packed.any():
            rows = [example_ids[i] for i in packed.nonzero().flatten().tolist()]
            raise PackedSequences(
                f"examples {rows}: positions restart inside a batch row (packed documents), so positions would "
                "repeat within one example; run one document per batch row (pad instead of packing)"
            )
        first = {} if first_position is None else dict(zip(example_ids, first_position.tolist()))
        result = dict(zip(example_ids, valid.tolist())), first
        self._read[key] = ((valid, first_position, packed), result)
        return result


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
        vocabulary: pa.Array | None = None,
    ) -> pa.Table:
        """The rows of one head as an Arrow table in the dataset schema, built without row loops.

        `token_ids`: whether the schema has `token_id` (None: when this batch has token ids);
        `vocabulary` (string array) adds `token_str`."""
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


class Sink:
    """Where capture batches go: every method the recorder calls, each with a working default
    (keep nothing, wait for nothing), so a sink overrides only what it does. `put` is called
    inside the attention call and must not block on the device; `commit` marks whole examples
    complete; `close` commits and releases. Subclasses: MemorySink, qk_attn.storage.sink.ParquetSink."""

    one_model = False  # writes one model's dataset: the recorder refuses a second model in the session
    rows_written = 0  # rows handed on (all heads), for progress bars
    complete = False  # set by a runner that went through every document it owns
    staging_limit: int | None = None  # bytes of one forward's rows staged whole; larger forwards stream

    def prepare(self, device) -> None:
        """At a forward's first recorded call, before any rows: set up what the hand-off needs."""

    def put_forward(self, staging) -> None:
        """One forward's rows at its end, on the device (`qk_attn.capture.staging.Staging`): its calls
        in order, and cache offsets the host derived, to check. This default checks them (a host read)
        and hands each call to `put` or `put_empty`."""
        for check in staging.checks:
            check.verify()
        for call in staging.calls:
            if isinstance(call, CaptureBatch):
                self.put(call)
            else:
                self.put_empty(*call)

    def put(self, batch: CaptureBatch) -> None:
        """One attention call's selected rows of one kind (still on the device)."""

    def put_empty(
        self, layer: int, kind: str, heads, example_ids, sliding_window, cross_attention: bool, tokens
    ) -> None:
        """An attention call of which the sampler keeps nothing (known on the CPU): it ran, with 0 rows."""

    def end_forward(self) -> None:
        """Called once after every model forward, outside attention calls: the one place
        where a sink may wait (back-pressure)."""

    def commit(self, example_ids: list[int]) -> None:
        """These examples are complete."""

    def discard(self, example_ids: list[int]) -> None:
        """Drop the rows of these uncommitted examples (their forward stopped part-way); the
        session never commits them."""

    def committed_ids(self) -> set[int]:
        """Examples committed so far (a resuming run skips them)."""
        return set()

    def describe(self, example_id: int, source_id: str | None, source_index: int | None) -> None:
        """Where an example came from (its source dataset's id and row)."""

    def bind_model(self, model_config, plan) -> None:
        """The model and head plan of the first captured call."""

    def flush(self, timeout: float | None = None) -> None:
        """Make what was committed durable now."""

    def check(self) -> None:
        """Re-raise an error of the sink's background work, if any."""

    def close(self) -> None:
        """Commit what was committed and release what the sink holds."""

    def table(self) -> pa.Table | None:
        """Every row kept, when the sink keeps rows in memory."""
        return None


class _BareSink(Sink):
    """A sink object that does not subclass Sink, used through the minimum a custom sink must
    have (put, commit, close); every other method is the base's default."""

    def __init__(self, sink) -> None:
        self.sink = sink

    def put(self, batch: CaptureBatch) -> None:
        self.sink.put(batch)

    def commit(self, example_ids: list[int]) -> None:
        self.sink.commit(example_ids)

    def close(self) -> None:
        self.sink.close()


def as_sink(sink) -> Sink:
    """`sink` itself when it subclasses Sink, else it wrapped in one (put, commit, close used)."""
    return sink if isinstance(sink, Sink) else _BareSink(sink)


def warn_not_from_zero(example_id: int, first_position: int, warned: set) -> None:
    """Once per sink (`warned` is its memo): a document whose first token is not at position 0 (a
    left-padded batch run without position_ids rotates it by its index in the padded row)."""
    if 0 < first_position < np.iinfo(np.int64).max and not warned:
        warned.add(example_id)
        logger.warning(
            "qk-attn: example %d starts at position %d, not 0: `position` is what RoPE used, and this batch was "
            "left-padded without position_ids; pass position_ids (as generate() and qk-sniff run do) to start at 0",
            example_id,
            first_position,
        )


class MemorySink(Sink):
    """Keeps every batch's rows; for tests and small interactive runs. Batches on a GPU stay there
    until `table()` or `discard` reads them: capturing never waits for the device."""

    def __init__(self) -> None:
        self._rows: list[HostRows] = []
        self.committed: list[int] = []
        self._pending: list = []  # CaptureBatch and OffsetCheck, in the order they came
        self._warned: set[int] = set()
        self._seen: set[int] = set()

    @property
    def rows(self) -> list[HostRows]:
        """Every batch's rows on the host (reads what is pending)."""
        self._read()
        return self._rows

    def put(self, batch: CaptureBatch) -> None:
        self._pending.append(batch)
        if batch.count.device.type == "cpu":  # reading host tensors waits for nothing: refusals surface now
            self._read()

    def put_forward(self, staging) -> None:
        self._pending += staging.checks
        self._pending += [call for call in staging.calls if isinstance(call, CaptureBatch)]
        if staging.device.type == "cpu":
            self._read()

    def _read(self) -> None:
        """The pending batches as host rows (the device is read here, not while capturing)."""
        pending, self._pending = self._pending, []
        for item in pending:
            if not isinstance(item, CaptureBatch):
                item.verify()
                continue
            rows = item.host_rows()
            for example, position in rows.first_position.items():
                if example not in self._seen:  # its first forward (later ones continue the sequence)
                    self._seen.add(example)
                    warn_not_from_zero(example, position, self._warned)
            self._rows.append(rows)

    def commit(self, example_ids: list[int]) -> None:
        self.committed.extend(example_ids)

    def committed_ids(self) -> set[int]:
        return set(self.committed)

    def discard(self, example_ids: list[int]) -> None:
        """Rows of these examples are dropped (a forward that stopped part-way)."""
        drop = np.asarray(example_ids, np.int64)
        self._rows = [rows.without(drop) for rows in self.rows]

    def table(self) -> pa.Table | None:
        """Every captured row of every head, in the dataset schema (vectors as float32; `token_id`
        null where a row has none, e.g. vision keys)."""
        tables = [rows.table(i, token_ids=True) for rows in self.rows for i in range(len(rows.heads))]
        return pa.concat_tables(tables) if tables else None
