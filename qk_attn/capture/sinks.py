"""Where capture batches go: the `Sink` interface the recorder calls, and `MemorySink`.

`Sink` gives every method a working default, so a sink overrides only what it does; a custom
object that is not a Sink is wrapped (`as_sink`) and used through put, commit and close.
The Parquet sink is qk_attn.storage.sink.ParquetSink.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from qk_attn.capture.batch import CaptureBatch, HostReader, HostRows
from qk_attn.capture.refusals import REFUSALS, LateRefusals
from qk_attn.capture.schema import concat_rows
from qk_attn.capture.staging import EmptyCall

logger = logging.getLogger(__name__)


class Sink:
    """Where capture batches go: every method the recorder calls, each with a working default
    (keep nothing, wait for nothing), so a sink overrides only what it does. `put` is called
    inside the attention call and must not block on the device; `commit` marks whole examples
    complete; `close` commits and releases. Subclasses: MemorySink, qk_attn.storage.sink.ParquetSink."""

    one_model = False  # writes one model's dataset: the recorder refuses a second model in the session
    rows_written = 0  # rows handed on (all heads), for progress bars
    complete = False  # set by a runner that went through every document it owns
    staging_limit: int | None = None  # bytes of one forward's rows staged whole; larger forwards stream
    pool = None  # the host pool rows wait in (ParquetSink): its `waits` and `waited_s` for the run's summary

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
        """An attention call of which the sampler keeps nothing (known on the host): it ran, with 0 rows."""

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

    def committed_among(self, example_ids) -> set[int]:
        """Those of `example_ids` committed so far: asked at each new example, so a sink that keeps a set
        answers without copying it."""
        return set(example_ids) & self.committed_ids()

    def describe(self, example_id: int, source_id: str | None, source_index: int | None) -> None:
        """Where an example came from (its source dataset's id and row)."""

    def bind_model(self, model_config, plan) -> None:
        """The model and head plan of the first captured call."""

    def flush(self, timeout: float | None = None) -> None:
        """Make what was committed durable now."""

    def check(self) -> None:
        """Re-raise an error of the sink's background work, if any."""

    def check_examples(self, example_ids) -> None:
        """Raise the refusal of any of these examples that the sink found after their forward
        (qk_attn.capture.refusals); called when a forward of theirs starts."""

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


NO_TOKENS = np.iinfo(np.int64).max  # the first position of a row without a real token


def warn_not_from_zero(example_id: int, first_position: int, warned: set) -> None:
    """Once per sink (`warned` is its memo): a document whose first recorded token is not at position 0:
    position_ids given that start there, its cache filled before the session (or before `begin`), a left-padded batch ran without
    position_ids (which rotates a row by its padding), or its prompt row was all padding."""
    if 0 < first_position < NO_TOKENS and not warned:
        warned.add(example_id)
        logger.warning(
            "qk-attn: example %d starts at position %d, not 0: `position` is what RoPE used; either the "
            "position_ids passed start there, or its cache was filled before the session (or before begin()), "
            "or a left-padded batch ran without position_ids "
            "(pass them, as generate() and qk-sniff run do, to start at 0), or its prompt row was all padding "
            "(generate() numbers such a row's new tokens from 1)",
            example_id,
            first_position,
        )


MERGE_AT = 64  # HostRows a MemorySink holds before it merges them per layer and kind


class MemorySink(Sink):
    """Keeps every batch's rows; for tests and small interactive runs. Batches on a GPU stay there
    until `table()` or `discard` reads them: capturing never waits for the device."""

    def __init__(self) -> None:
        self._rows: list[HostRows] = []
        self.committed: list[int] = []
        self._committed_set: set[int] = set()
        self._pending: list = []  # CaptureBatch, EmptyCall and OffsetCheck, in the order they came
        self._warned: set[int] = set()
        self._seen: set[int] = set()
        self.refusals = LateRefusals()
        self._merge_at = MERGE_AT  # rows objects held before those of one key are merged

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
        self._pending += staging.calls  # empty calls too: their forward's positions are checked
        if staging.device.type == "cpu":
            self._read()

    def _read(self) -> None:
        """The pending batches as host rows (the device is read here, not while capturing). A check
        that fails refuses its examples (qk_attn.capture.refusals) and the reading goes on."""
        pending, self._pending = self._pending, []
        reader = HostReader()
        for item in pending:
            try:
                rows, first_positions = self._host_rows(item, reader)
            except REFUSALS as error:
                self.refusals.refuse(item.example_ids, error)
                refused = np.asarray(sorted(self.refusals.ids), np.int64)
                self._rows = [rows.without(refused) for rows in self._rows]
                continue
            for example, position in first_positions.items():  # (a call that kept no row counts too)
                if position == NO_TOKENS:  # an all-padding row: its tokens come later
                    continue
                if example not in self._seen and example not in self.refusals.ids:  # its first forward
                    self._seen.add(example)
                    warn_not_from_zero(example, position, self._warned)
            if rows is None:
                continue
            if self.refusals.ids:
                rows = rows.without(np.asarray(sorted(self.refusals.ids), np.int64))
            self._rows.append(rows)
        if len(self._rows) > self._merge_at:
            self._merge()

    def _merge(self) -> None:
        """The rows of each (layer, kind, heads) in few sets of arrays. A dense decode keeps a few tiny arrays
        per attention call for the whole session; interleaved with the cache's growing reallocations they
        fragmented the heap (memory grew with the square of the steps while the rows stayed small). Pieces
        are merged as a binary counter merges (a piece with the one before it when that is at most twice as
        long), so every row is copied O(log rows) times and a key keeps O(log rows) pieces."""
        groups: dict[tuple, list[HostRows]] = {}
        for rows in self._rows:
            if not len(rows):
                continue  # their per-call counts were read when they came
            shape = (rows.vectors.shape[-1], rows.vectors.dtype, rows.token_id is None)  # two models may share a layer
            key = (rows.layer, rows.kind, rows.heads, rows.sliding_window, rows.cross_attention, *shape)
            stack = groups.setdefault(key, [])
            stack.append(rows)
            while len(stack) > 1 and len(stack[-2]) <= 2 * len(stack[-1]):
                stack[-2:] = [HostRows.merged(stack[-2:])]
        self._rows = [rows for stack in groups.values() for rows in stack]
        self._merge_at = 2 * len(self._rows) + MERGE_AT

    @staticmethod
    def _host_rows(item, reader: HostReader) -> tuple[HostRows | None, dict]:
        """A batch's rows, and each example's first position in the call; None for what only has checks
        (an empty call's positions, a cache offset)."""
        if isinstance(item, EmptyCall):
            tokens = item.tokens
            _, first_positions = reader.per_row(
                item.example_ids, tokens.valid_count, tokens.first_position, tokens.misnumbered
            )
            return None, first_positions
        if not isinstance(item, CaptureBatch):
            item.verify()
            return None, {}
        rows = item.host_rows()
        return rows, rows.first_position

    def check_examples(self, example_ids) -> None:
        self.refusals.raise_for(example_ids)

    def commit(self, example_ids: list[int]) -> None:
        self.committed.extend(example_ids)
        self._committed_set.update(example_ids)

    def committed_ids(self) -> set[int]:
        return set(self.committed)

    def committed_among(self, example_ids) -> set[int]:
        return {i for i in example_ids if i in self._committed_set}

    def discard(self, example_ids: list[int]) -> None:
        """Rows of these examples are dropped (a forward that stopped part-way)."""
        drop = np.asarray(example_ids, np.int64)
        self._rows = [rows.without(drop) for rows in self.rows]
        self._seen.difference_update(example_ids)  # an id begun again starts anew

    def table(self) -> pa.Table | None:
        """Every captured row of every head, in the dataset schema (vectors in the stored dtype, float16
        under vector_dtype="float16" as in a folder, else float32; `token_id` null where a row has none,
        e.g. vision keys)."""
        tables = [
            rows.table(i, pa.float16() if rows.vectors.dtype == np.float16 else pa.float32(), token_ids=True)
            for rows in self.rows
            for i in range(len(rows.heads))
        ]
        self.refusals.raise_for(None)
        return concat_rows(tables) if tables else None
