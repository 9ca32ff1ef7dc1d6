"""`ParquetSink`: capture batches -> transfer -> saver thread -> Parquet shards + manifest (DESIGN §5).

The files and the commit protocol's primitives are in qk_attn.storage.manifest, the Parquet writing in
qk_attn.storage.shards; this module decides *when* rows are written and committed.

    capturing thread  put(batch)      pieces into the host pool, never waiting inside an attention
                                      call (what does not fit waits on the device for end_forward)
                      commit(ids)     these examples are complete
    saver thread      piece           -> rows into the open segment's per-(layer, head, kind) buffers
                      commit          -> the open segment is *sealed* once every example in it is complete
                      timer           -> sealed segments are *finalised* at most `commit_every_s` after
                                         the first commit waiting in them: buffers written by the writer
                                         threads as `.tmp` shards, fsync'd, renamed; then the manifest
                                         (listing the shards and the examples) replaces the old one

So a committed example is durable `commit_every_s` (default 2 s) plus one finalise (the write of
what is buffered) after `commit()`; a SIGKILL loses only examples in flight and those. A shard
the manifest does not list is an orphan of a killed run and is deleted when the folder is opened
again: a re-run redoes exactly the examples that were not committed and never duplicates a row.
Buffers over `buffer_mb` are spilled to `.tmp` shards of the open segment. Folders that collect
many small shards (one per finalise) are merged into shards of about `shard_mb`, with the same
rename-then-manifest order, when they pass COMPACT_AT shards and at close.

Ranks (qk_attn.run.distributed). With `rank=(r, n)` the sink is one of n writers into the same
OUT and touches only its own files (qk_attn.storage.manifest.Files); it writes no card. The parts are
merged into `qk_sniff.json` and the card once every rank has finished.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from qk_attn.storage import compact
from qk_attn.config import SniffConfig
from qk_attn.storage.manifest import (  # noqa: F401 - re-exported: other modules import these from qk_attn.storage.saver
    EXAMPLES,
    LOCK,
    MANIFEST,
    Files,
    add_shard,
    check_same_model,
    key_name,
    now,
    open_capture,
    parse_key,
    part_files,
    read_manifest,
    release_lock,
    take_lock,
    write_json_atomic,
)
from qk_attn.capture.batch import CaptureBatch, HostRows, warn_not_from_zero
from qk_attn.errors import CaptureOverflow, CommittedExampleError, CorruptShard, SaverError, StorageError
from qk_attn.storage.shards import KeyBuffer, Writers, Written, write_buffer, write_table
from qk_attn.storage.transfer import Piece, Sender, Transfer

logger = logging.getLogger(__name__)

# Small shards (< shard_mb / 2) in one folder that trigger a merge while running, and at close.
# A session of a few minutes keeps its shards as they are (no close-time rewrite); a long dense
# capture rewrites each row once more, in the writer threads.
COMPACT_AT = 64
COMPACT_AT_CLOSE = 16
NO_POSITION = np.iinfo(np.int64).max
EXPORT_EVERY_S = 60.0  # OUT/examples.parquet is rewritten at most this often while running (and at close)


def _empty_call(layer, kind, heads, example_ids, sliding_window, cross_attention, tokens) -> CaptureBatch:
    """The CaptureBatch of an attention call that selected nothing: no rows, the forward's valid
    counts and first positions (and its packed flags, checked by host_rows like any batch's)."""
    empty = torch.zeros(0, dtype=torch.int64)
    return CaptureBatch(layer, kind, heads, example_ids, sliding_window, cross_attention,
                        count=torch.zeros(1, dtype=torch.int64), row=empty, position=empty, bucket=empty,
                        vectors=torch.zeros(len(heads), 0, 1), valid=tokens.valid_count,
                        first_position=None if cross_attention and kind == "k" else tokens.first_position,
                        packed=tokens.packed)


@dataclass
class _Segment:
    number: int
    buffers: dict[str, KeyBuffer] = field(default_factory=dict)
    parts: list = field(default_factory=list)  # Futures of Written: spilled .tmp shards
    next_part: int = 0
    examples: set[int] = field(default_factory=set)  # every example seen in this segment
    valid: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))  # example -> (layer, kind) -> tokens
    first: dict[int, int] = field(default_factory=dict)  # example -> smallest first position
    calls: Counter = field(default_factory=Counter)  # key -> attention calls seen
    cross_attention_layers: set[int] = field(default_factory=set)  # layers whose keys are vision tokens

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


@dataclass
class _Inflight:
    """A finalise whose shards the writer threads are writing."""

    sealed: list[_Segment]
    commit: set[int]
    number: int
    futures: list
    nbytes: int


class _Flush:
    def __init__(self, final: bool) -> None:
        self.final = final
        self.done = threading.Event()


_STOP = object()


class ParquetSink:
    """Writes capture batches of one model into OUT as a Parquet dataset with a manifest and card.

    Thread model: `put`/`commit`/`describe`/`end_forward`/`flush`/`close` are called by the
    capturing thread; `put` only issues copies into the bounded host pool (never waiting for
    space: see qk_attn.storage.transfer) and enqueues them. One saver thread buffers rows and commits;
    `writer_threads` threads encode and write shards. The first error is re-raised by every
    later `put`/`commit`/`check`/`flush`/`close`.
    """

    # A committed example is durable this long after commit() plus one write (bench/durability.py).
    DEFAULT_COMMIT_EVERY_S = 2.0

    def __init__(
        self,
        output: str | os.PathLike,
        config: SniffConfig,
        overwrite: bool = False,
        source: dict | None = None,
        *,
        buffer_mb: int = 512,
        commit_every_s: float | None = None,
        shard_mb: int = 128,
        fsync: bool = True,
        rank: tuple[int, int] | None = None,
        writer_threads: int = 2,
        vocabulary: list[str] | None = None,
        token_ids: bool | None = None,
    ) -> None:
        self.output = Path(output)
        self.config = config
        self.files = Files() if rank is None else Files(*rank)
        self.complete = False  # set by a runner that went through every document it owns (rank parts record it)
        self.vector_type = pa.float16() if config.vector_dtype == "float16" else pa.float32()
        self.vocabulary = None if vocabulary is None else pa.array(vocabulary, pa.string())
        # One schema per dataset: token ids are a column of every shard or of none. New captures
        # have them; a capture resumed from before token ids keeps its schema.
        if token_ids is None:
            existing = read_manifest(self.output, self.files.manifest) if self.output.is_dir() else None
            resumed = existing is not None and existing.get("examples")
            token_ids = existing.get("columns", {}).get("token_id", False) if resumed else True
        self.token_ids = token_ids or vocabulary is not None
        self.buffer_bytes = buffer_mb << 20
        self.commit_every_s = self.DEFAULT_COMMIT_EVERY_S if commit_every_s is None else commit_every_s
        self.shard_bytes = shard_mb << 20
        self.fsync = fsync
        self.rows_written = 0  # rows accepted by the saver (all heads), for progress bars
        self.max_buffered_bytes = 0  # high-water mark of rows held in host memory (bounded by buffer_mb)
        if self.output.exists() and not self.output.is_dir():
            raise StorageError(f"output {self.output} is a file, not a folder; choose a folder for the capture")
        self.output.mkdir(parents=True, exist_ok=True)
        self._lock_fd = take_lock(self.output, self.files.lock)
        try:
            columns = {"token_id": self.token_ids, "token_str": self.token_ids and vocabulary is not None}
            manifest, self.removed_orphans = open_capture(self.output, self.files, config, source, overwrite, columns, fsync)
        except BaseException:
            release_lock(self.output, self._lock_fd, self.files.lock)
            raise
        self._manifest = manifest
        self._manifest_lock = threading.Lock()
        self._committed = {int(i) for i in manifest["examples"]}  # capturing thread: durable or commit() called
        self._durable = set(self._committed)  # saver thread
        self._ready: set[int] = set()  # saver thread: committed, not durable yet
        self._described: dict[int, tuple] = {}  # saver thread: example -> (source_id, source_index)
        self._warned_start: set[int] = set()  # saver thread: see rows.warn_not_from_zero
        self._next_segment = manifest["next_segment"]
        self._open = self._new_segment()
        self._sealed: list[_Segment] = []
        self._waiting_since: float | None = None  # first commit() not yet durable
        self._inflight: _Inflight | None = None  # the finalise being written
        self._exported_at = float("-inf")  # last write of OUT/examples.parquet
        self._spilling: list = []  # (future, bytes) of spills being written
        self._transfer = Transfer(config.pinned_mb << 20)
        self._writers = Writers(writer_threads)
        self._queue: queue.Queue = queue.Queue()
        self._sender = Sender(self._transfer, self._queue.put, self.check)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qk-sniff-saver", daemon=True)
        self._thread.start()
        from qk_attn.dataset.verify import check_examples_file

        if manifest["examples"] and check_examples_file(self.output, manifest, self.files.examples):
            self._write_manifest(export=True)  # a killed run left the examples table behind the manifest

    # ---- the capturing thread ----------------------------------------------------------
    def committed_ids(self) -> set[int]:
        """Examples already committed (by this run or an earlier one): a resuming run skips them."""
        return set(self._committed)

    def max_committed_id(self) -> int | None:
        """The largest committed example id (automatic ids continue after it), None if none."""
        return max(self._committed, default=None)

    def bind_model(self, model_config, plan) -> None:
        """Record the model and head plan (first captured call); refuse a different model than OUT holds."""
        model = {
            "id": getattr(model_config, "_name_or_path", None) or None,
            "revision": getattr(model_config, "_commit_hash", None),
            "dtype": str(getattr(model_config, "dtype", None) or "").replace("torch.", "") or None,
            "model_type": getattr(model_config, "model_type", None),
        }
        plan_dict = plan.to_dict()
        with self._manifest_lock:
            if self._manifest["examples"]:
                check_same_model(self.output, self._manifest, model, plan_dict)
            self._manifest["model"] = model
            self._manifest["plan"] = plan_dict

    def put(self, batch: CaptureBatch) -> None:
        """Hand one batch on (called inside the attention call; never reads device values and
        never waits for pool space: what does not fit stays on the device until `end_forward`)."""
        self.check()
        if self._closed:
            raise RuntimeError(f"the qk-sniff sink for {self.output} is closed")
        if not self._committed.isdisjoint(batch.example_ids):
            done = sorted(self._committed.intersection(batch.example_ids))
            raise CommittedExampleError(
                f"rows for example(s) {done[:5]} arrived, but they are already committed in {self.output}; "
                "skip committed examples (committed_ids()) or give new examples new ids (after max_committed_id())"
            )
        self._sender.put(batch)

    def put_empty(self, layer: int, kind: str, heads, example_ids, sliding_window, cross_attention: bool, tokens) -> None:
        """An attention call of which the sampler keeps nothing, known on the CPU before any
        selection (the session skips its gather): it ran, its heads count as heads that ran with 0
        rows, and its valid tokens count towards the examples' lengths. `tokens` is the forward's
        TextTokens (CPU tensors). A few microseconds here: the saver thread does the rest."""
        self.check()
        self._queue.put(("empty", layer, kind, tuple(heads), example_ids, sliding_window, cross_attention, tokens))

    def end_forward(self) -> None:
        """Called once after every model forward, outside attention calls: sends what waited on
        the device, waiting for pool space (this is where back-pressure happens)."""
        self.check()
        self._sender.drain()

    def discard(self, example_ids) -> None:
        """Drop the rows of these uncommitted examples (their forward stopped part-way)."""
        self.check()
        self._sender.drain()  # their rows are queued before the discard
        self._queue.put(("discard", [int(i) for i in example_ids]))

    def describe(self, example_id: int, source_id: str | None, source_index: int | None) -> None:
        """Where example `example_id` came from: the source dataset's own id and its row index
        (recorded in the manifest's `example_info` and OUT/examples.parquet)."""
        self._queue.put(("describe", int(example_id), None if source_id is None else str(source_id),
                         None if source_index is None else int(source_index)))

    def commit(self, example_ids) -> None:
        """These examples are complete; they become durable within `commit_every_s` (plus one write)."""
        self.check()
        self._sender.drain()  # their rows must be queued before the commit
        ids = [int(i) for i in example_ids]
        self._committed.update(ids)
        self._queue.put(("commit", ids))

    def flush(self, timeout: float | None = None) -> None:
        """Make every committed example durable now, and wait for it (re-raises saver errors)."""
        self.check()
        self._sender.drain()
        self._wait(_Flush(final=False), timeout)

    def check(self) -> None:
        """Re-raise the saver thread's error, if it had one."""
        error = self._error
        if error is None:
            return
        if isinstance(error, (CaptureOverflow, CommittedExampleError)):
            raise type(error)(str(error)) from error
        raise SaverError(
            f"qk-sniff saver for {self.output} failed: {type(error).__name__}: {error}. Examples committed before "
            "the failure are safe in the manifest; re-run the same command to resume the rest."
        ) from error

    def close(self) -> None:
        """Commit everything committed so far, write the card, stop the threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._error is None:
                self._sender.drain()
                self._wait(_Flush(final=True), None)
        finally:
            self._sender.clear()
            self._queue.put(_STOP)
            self._thread.join()
            self._writers.close()
            release_lock(self.output, self._lock_fd, self.files.lock)
        self.check()

    @property
    def manifest(self) -> dict:
        with self._manifest_lock:
            return json.loads(json.dumps(self._manifest))

    def _wait(self, flush: _Flush, timeout: float | None) -> None:
        self._queue.put(flush)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not flush.done.wait(0.05):
            self.check()
            if not self._thread.is_alive():
                raise SaverError(f"qk-sniff saver thread for {self.output} is not running")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"qk-sniff saver did not finish flushing {self.output} within {timeout} s")
        self.check()

    # ---- the saver thread --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            timeout = None  # a finalise in flight reports its end through the queue ("written")
            if self._waiting_since is not None and self._inflight is None and self._error is None:
                timeout = max(0.0, self._waiting_since + self.commit_every_s - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None  # the durability deadline of a waiting commit
            if item is _STOP:
                return
            try:
                if self._error is None:
                    self._handle(item)
            except BaseException as error:  # noqa: BLE001 - surfaced in the caller by check()
                logger.error("qk-sniff saver failed: %r", error)
                self._error = error
            finally:
                # Free pool space and wake waiters even after an error: a producer must never hang.
                if isinstance(item, Piece):
                    item.release()
                elif isinstance(item, _Flush):
                    item.done.set()

    def _handle(self, item) -> None:
        if isinstance(item, Piece):
            item.wait()
            self._accept(item.rows(), item.first)
        elif isinstance(item, _Flush):
            self._complete(wait=True)
            if item.final:
                self._drop_incomplete()
            self._seal()
            self._finalize()
            self._complete(wait=True)
            if not self._seal_ready():  # flush() with examples in flight: write them now, commit later
                self._spill(until=0)
                self._wait_spills()  # surfaces I/O errors now
            if item.final:
                self._compact(COMPACT_AT_CLOSE)
                self._finish()
        elif item is None or item[0] == "commit":
            if item is not None:
                self._ready.update(i for i in item[1] if i not in self._durable)
                self._seal()
            if not self._committable():
                self._waiting_since = None  # nothing committable: examples wait for their segment to complete
            elif self._waiting_since is None:
                self._waiting_since = time.monotonic()
            if self._waiting_since is not None and time.monotonic() - self._waiting_since >= self.commit_every_s:
                self._finalize()
        elif item[0] == "written":
            self._complete(wait=False)
            if self._waiting_since is not None and time.monotonic() - self._waiting_since >= self.commit_every_s:
                self._finalize()
        elif item[0] == "empty":
            self._accept(_empty_call(*item[1:]).host_rows(), True)
        elif item[0] == "describe":
            self._described[item[1]] = item[2:]
        elif item[0] == "discard":
            self._drop(set(item[1]) - self._ready - self._durable)
            self._seal()  # the segment may have waited for them only

    def _accept(self, rows: HostRows, first: bool) -> None:
        seg = self._open
        if first:
            seg.examples.update(int(i) for i in rows.valid)
            for example, position in rows.first_position.items():
                seg.first[int(example)] = min(seg.first.get(int(example), NO_POSITION), int(position))
            if rows.cross_attention:
                seg.cross_attention_layers.add(rows.layer)
            else:  # cross-attention keys are image tokens, not text length
                for example, valid in rows.valid.items():
                    seg.valid[int(example)][(rows.layer, rows.kind)] += int(valid)
        storage = self.vector_type.to_pandas_dtype()
        dim = rows.vectors.shape[-1]
        for index, head in enumerate(rows.heads):
            key = key_name(rows.layer, head, rows.kind)
            if first:
                seg.calls[key] += 1
            if not len(rows):
                continue
            buffer = seg.buffers.get(key)
            if buffer is None:
                buffer = seg.buffers[key] = KeyBuffer(rows.layer, head, rows.kind, rows.sliding_window, dim)
            # The one copy: out of the host pool, whose region is reused after this returns.
            vectors = np.array(rows.vectors[index], dtype=storage, order="C").reshape(-1)
            buffer.add(rows.example_id, rows.position, rows.bucket, vectors, rows.token_id)
        self.rows_written += len(rows) * len(rows.heads)
        buffered = self._buffered()
        self.max_buffered_bytes = max(self.max_buffered_bytes, buffered)
        if buffered > self.buffer_bytes * 3 // 4:
            # Start writing early (sealed segments first: they are complete examples), so the
            # writers are busy while rows keep arriving; wait only when over the whole budget.
            self._finalize()
            if seg.nbytes > self.buffer_bytes // 2:  # one long example: sealing cannot help
                self._spill(until=self.buffer_bytes // 4)
            while self._buffered() > self.buffer_bytes:
                if self._spilling:
                    self._spilling.pop(0)[0].result()
                elif self._inflight is not None:
                    self._complete(wait=True)
                    self._finalize()
                elif self._sealed:
                    self._finalize()
                elif seg.buffers:
                    self._spill(until=0)
                else:
                    break

    def _buffered(self) -> int:
        """Bytes of rows held: buffers of the open and sealed segments, and what writers hold."""
        return self._open.nbytes + sum(s.nbytes for s in self._sealed) + self._writing_bytes()

    # ---- segments ----------------------------------------------------------------------
    def _new_segment(self) -> _Segment:
        seg = _Segment(self._next_segment)
        self._next_segment += 1
        return seg

    def _committable(self) -> bool:
        """Something a finalise would commit that no finalise in flight already holds."""
        holding = self._inflight.commit if self._inflight else set()
        return bool(self._sealed or self._ready - self._open.examples - holding)

    def _seal_ready(self) -> bool:
        return not (self._open.examples - self._ready - self._durable)

    def _seal(self) -> None:
        """Close the open segment to new rows once every example in it is complete."""
        seg = self._open
        if (seg.examples or seg.parts) and self._seal_ready():
            self._sealed.append(seg)
            self._open = self._new_segment()

    def _submit(self, seg: _Segment, key: str, buffer: KeyBuffer, segments: list[int]):
        name = self.files.shard(seg.number, seg.next_part)
        seg.next_part += 1
        return self._writers.submit(write_buffer, self.output / key, name, key, buffer, segments, self.vector_type,
                                    self.token_ids, self.vocabulary, False)  # fsync'd together at commit

    def _spill(self, until: int) -> None:
        """Write the open segment's largest buffers to `.tmp` shards until at most `until` bytes stay."""
        seg = self._open
        for buffer_bytes, key in sorted(((b.nbytes, k) for k, b in seg.buffers.items()), reverse=True):
            if seg.nbytes <= until and until > 0:
                break
            buffer = seg.buffers.pop(key)
            seg.parts.append(self._submit(seg, key, buffer, [seg.number]))
            self._spilling.append((seg.parts[-1], buffer.nbytes))

    def _wait_spills(self) -> None:
        for future, _ in self._spilling:
            future.result()
        self._spilling.clear()

    def _writing_bytes(self) -> int:
        """Bytes the writer threads still hold (spills and the finalise in flight)."""
        self._spilling = [(f, n) for f, n in self._spilling if not f.done()]
        return sum(n for _, n in self._spilling) + (self._inflight.nbytes if self._inflight else 0)

    def _drop_incomplete(self) -> None:
        """At close: rows of examples that were never committed are not kept."""
        incomplete = self._open.examples - self._ready - self._durable
        if incomplete:
            logger.warning("qk-sniff: %d example(s) were never committed; their rows are not kept", len(incomplete))
            self._drop(incomplete)

    def _drop(self, incomplete: set[int]) -> None:
        """Remove uncommitted examples' rows from the open segment (buffers and .tmp shards)."""
        seg = self._open
        incomplete = incomplete & seg.examples
        if not incomplete:
            return
        drop = np.array(sorted(incomplete), np.int64)
        for key, buffer in list(seg.buffers.items()):
            buffer.drop(drop)
            if not buffer.rows:
                del seg.buffers[key]
        kept = []
        for future in seg.parts:
            written: Written = future.result()
            path = self.output / written.key / f".{written.name}.tmp"
            table = pq.read_table(path)
            kept_rows = ~np.isin(table.column("example_id").to_numpy(), drop)
            if kept_rows.all():
                kept.append(future)
                continue
            table = table.filter(kept_rows)
            if not table.num_rows:
                path.unlink()
                continue
            size, digest = write_table(table, path, self.fsync)
            buckets = Counter({int(b): int(n) for b, n in enumerate(np.bincount(table.column("bucket").to_numpy())) if n})
            kept.append(_Done(Written(written.key, written.name, table.num_rows, size, digest, buckets, written.segments)))
        seg.parts = kept
        for example in incomplete:
            seg.valid.pop(example, None)
            seg.first.pop(example, None)
        seg.examples -= incomplete

    def _finalize(self) -> None:
        """Start committing the sealed segments (see the module docstring): their buffers go to
        the writer threads, one shard per folder; `_complete` renames and writes the manifest
        when every write is done. One finalise is in flight at a time."""
        if self._inflight is not None:
            return  # the next one starts when this one completes ("written")
        sealed, self._sealed = self._sealed, []
        commit = self._ready - self._open.examples  # examples whose rows (if any) are all in sealed segments
        late = any(e in self._durable for e in self._described)  # describe() after the commit
        if not sealed and not commit and not late:
            return
        self._waiting_since = None  # commits from now on wait for the next finalise
        merged: dict[str, tuple[KeyBuffer, list[int]]] = {}
        for seg in sealed:
            for key, buffer in seg.buffers.items():
                if key in merged:
                    merged[key][0].extend(buffer)
                    merged[key][1].append(seg.number)
                else:
                    merged[key] = (buffer, [seg.number])
        first = sealed[0] if sealed else self._new_segment()
        futures = [f for seg in sealed for f in seg.parts]
        futures += [self._submit(first, key, buffer, segments) for key, (buffer, segments) in sorted(merged.items())]
        self._inflight = _Inflight(sealed, commit, first.number, futures, sum(b.nbytes for b, _ in merged.values()))
        pending = [len(futures)]
        lock = threading.Lock()

        def done(_future) -> None:  # in a writer thread: tell the saver thread once all are written
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                self._queue.put(("written",))

        if not futures:
            self._queue.put(("written",))
        for future in futures:
            future.add_done_callback(done)

    def _complete(self, wait: bool) -> None:
        """Finish the finalise in flight: rename its shards, write the manifest (the commit point)."""
        job = self._inflight
        if job is None or (not wait and not all(f.done() for f in job.futures)):
            return
        self._inflight = None
        written: list[Written] = [f.result() for f in job.futures]
        sealed, commit = job.sealed, job.commit
        if self.fsync:  # data on disk before the names that commit it
            self._writers.fsync([self.output / w.key / f".{w.name}.tmp" for w in written])
        for w in written:
            os.replace(self.output / w.key / f".{w.name}.tmp", self.output / w.key / w.name)
        if self.fsync:
            self._writers.fsync({self.output / w.key for w in written})
        segment_of = {e: seg.number for seg in sealed for e in seg.examples}
        valid = {e: c for seg in sealed for e, c in seg.valid.items()}
        first_position = {e: p for seg in sealed for e, p in seg.first.items()}
        # Edited in place, not copied (a large capture's manifest is megabytes): only this thread
        # changes what it commits, and after a failed write the sink is in error for good.
        with self._manifest_lock:
            manifest = self._manifest
            for w in written:
                add_shard(manifest, w)
            for seg in sealed:
                for key, n in seg.calls.items():
                    manifest["calls"][key] = manifest["calls"].get(key, 0) + n
                if seg.cross_attention_layers:
                    layers = set(manifest.get("cross_attention_layers", [])) | seg.cross_attention_layers
                    manifest["cross_attention_layers"] = sorted(layers)
            for example in sorted(commit):
                counts = valid.get(example)
                manifest["examples"][str(example)] = counts[min(counts)] if counts else 0
                position = first_position.get(example, NO_POSITION)
                warn_not_from_zero(example, position, self._warned_start)
                manifest["example_info"][str(example)] = {
                    "source_id": None, "source_index": None, "segment": segment_of.get(example, job.number),
                    "first_position": None if position == NO_POSITION else position,
                }
            for example, (source_id, source_index) in list(self._described.items()):
                info = manifest["example_info"].get(str(example))
                if info is not None:  # described before or after its commit: both are kept
                    info.update(source_id=source_id, source_index=source_index)
                    del self._described[example]
            manifest["next_segment"] = self._next_segment  # above every number in use (open, merged)
            manifest["updated"] = now()
        self._write_manifest()
        self._durable |= commit
        self._ready -= commit
        self._compact(COMPACT_AT)

    def _write_manifest(self, export: bool = False, previous_too: bool = False) -> None:
        """The manifest (the commit point). Before it, at most every EXPORT_EVERY_S and at close,
        OUT/examples.parquet: an export of the manifest's examples for `datasets` (qk_attn
        readers use the manifest itself), so a large capture does not rewrite it every commit."""
        from qk_attn.dataset.verify import examples_table

        with self._manifest_lock:
            manifest = self._manifest
            if export or time.monotonic() - self._exported_at >= EXPORT_EVERY_S:
                path = self.output / self.files.examples
                size, digest = write_table(examples_table(manifest), path.with_name(f".{path.name}.tmp"), self.fsync)
                os.replace(path.with_name(f".{path.name}.tmp"), path)
                manifest["examples_file"] = {"name": path.name, "bytes": size, "sha256": digest}
                self._exported_at = time.monotonic()
            write_json_atomic(self.output / self.files.manifest, manifest, self.fsync, keep_previous=True,
                              previous_too=previous_too)

    def _compact(self, at_least: int) -> None:
        """Merge small committed shards (qk_attn.storage.compact) in the writer threads; one manifest update."""
        manifest = self._manifest  # only this thread changes shards; the merges only read it
        jobs = compact.plan(manifest, self.output, self.shard_bytes, at_least)
        if not jobs:
            return
        seg = self._new_segment()  # a fresh number for the merged shards' names
        futures = []
        for key, group in jobs:
            name = self.files.shard(seg.number, seg.next_part)
            seg.next_part += 1
            futures.append((key, group, self._writers.submit(compact.merge, self.output / key, group, name, key, manifest)))
        merged = []
        for key, group, future in futures:
            try:
                merged.append((key, group, future.result()))
            except CorruptShard as error:  # left as it is: verify names it, repair drops what it holds
                logger.warning("qk-sniff: not compacting %s: %s; run `qk-sniff repair %s`", key, error, self.output)
        if not merged:
            return
        jobs = [(key, group) for key, group, _ in merged]
        if self.fsync:
            self._writers.fsync([self.output / key / f".{w.name}.tmp" for key, _, w in merged])
        for key, _, written in merged:
            os.replace(self.output / key / f".{written.name}.tmp", self.output / key / written.name)
        if self.fsync:
            self._writers.fsync({self.output / key for key, _ in jobs})
        with self._manifest_lock:
            replaced = compact.apply(manifest, self.output, merged)
            manifest["next_segment"] = max(manifest["next_segment"], self._next_segment)
        self._write_manifest(previous_too=True)  # the old manifest lists the parts deleted next
        for path in replaced:  # orphans from here on: a crash now only leaves files the next open removes
            path.unlink()

    def _finish(self) -> None:
        """At close: the examples export, and the card (single writer) or the part's completion flag (ranks)."""
        if self.files.rank is not None:  # the card is written when the parts are merged
            with self._manifest_lock:
                self._manifest["part"]["complete"] = self.complete
        self._write_manifest(export=True)
        manifest = self.manifest
        if self.files.rank is None:
            from qk_attn.storage.card import write_card
            from qk_attn.storage.manifest import card_is_ours

            if card_is_ours(self.output):
                write_card(self.output, manifest)
            else:
                logger.warning("qk-sniff: %s/README.md was not written by qk-sniff; the dataset card is not written",
                               self.output)


class _Done:
    """A finished write in place of a Future."""

    def __init__(self, written: Written) -> None:
        self._written = written

    def result(self) -> Written:
        return self._written
