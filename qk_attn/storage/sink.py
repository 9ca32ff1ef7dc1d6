"""`ParquetSink`: the capturing thread's side of writing OUT (put, commit, flush, close).

`put_forward` and `put` only issue copies into the bounded host pool (qk_attn.storage.transfer)
and enqueue them (forward pieces HOLD_FORWARDS at a time); the saver thread
(qk_attn.storage.saver) buffers rows and commits them (qk_attn.storage.commit); a shard the
manifest does not list is an orphan of a killed run and is deleted when the folder is opened
again (qk_attn.storage.folder), so a re-run redoes exactly the examples that were not committed
and never duplicates a row.

Ranks (qk_attn.run.distributed). With `rank=(r, n)` the sink is one of n writers into the same
OUT and touches only its own files (qk_attn.storage.layout.Files); it writes no card. The parts are
merged into `qk_sniff.json` and the card once every rank has finished.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import pyarrow as pa

from qk_attn.arguments import check_flag, check_source, check_vocabulary
from qk_attn.capture.batch import CaptureBatch
from qk_attn.capture.refusals import REFUSALS, LateRefusals
from qk_attn.capture.schema import TokenStrings
from qk_attn.capture.sinks import Sink
from qk_attn.config import SniffConfig
from qk_attn.errors import CaptureError, CaptureOverflow, CommittedExampleError, SaverError, StorageError
from qk_attn.storage.examples import check_examples_file
from qk_attn.storage.folder import open_capture
from qk_attn.storage.interrupts import interrupts_held
from qk_attn.storage.layout import Files
from qk_attn.storage.lock import lock_taken_here, release_lock, take_lock
from qk_attn.storage.manifest import read_manifest, vocabulary_digest
from qk_attn.storage.model_record import model_record
from qk_attn.storage.saver import _STOP, SaverThread, _Flush
from qk_attn.storage.sender import Sender
from qk_attn.storage.settings import check_same_model
from qk_attn.storage.shards import Writers
from qk_attn.storage.transfer import Transfer

# Forward pieces the sink hands the saver together (fewer if they hold more than 1/HOLD_FORWARDS of
# the pool): one wake-up of the saver per batch of decode steps, with its code and data still warm.
# Its Python holds the GIL against the model, so this is measured in the model's own time.
HOLD_FORWARDS = 16


class ParquetSink(SaverThread, Sink):
    """Writes capture batches of one model into OUT as a Parquet dataset with a manifest and card.

    Thread model: `put`/`commit`/`describe`/`end_forward`/`flush`/`close` are called by the
    capturing thread; `put` only issues copies into the bounded host pool (never waiting for
    space: see qk_attn.storage.transfer) and enqueues them. One saver thread buffers rows and commits;
    `writer_threads` threads encode and write shards. The first error is re-raised by every
    later `put`/`commit`/`check`/`flush`/`close`.
    """

    one_model = True  # OUT holds one model's dataset
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
        # Checked before the folder is touched: overwrite="no" is true by its truth value.
        overwrite, fsync = check_flag("overwrite", overwrite), check_flag("fsync", fsync)
        if token_ids is not None:
            check_flag("token_ids", token_ids)
        source, vocabulary = check_source(source), check_vocabulary(vocabulary)
        self.output = Path(os.path.abspath(output))  # the saver thread writes later: a chdir must not move it
        self.config = config
        self.files = Files() if rank is None else Files(*rank)
        self.complete = False  # set by a runner that went through every document it owns (rank parts record it)
        self.documents: dict | None = None  # with `complete`: the document list it went through ({"count", "sha256"})
        self.vector_type = pa.float16() if config.vector_dtype == "float16" else pa.float32()
        self.vocabulary = None if vocabulary is None else TokenStrings(vocabulary)
        # One schema per dataset: token ids are a column of every shard or of none. New captures
        # have them; a capture resumed from before token ids keeps its schema.
        if token_ids is None:
            # (under overwrite the old capture, readable or not, is deleted: new captures have them)
            existing = (
                read_manifest(self.output, self.files.manifest) if self.output.is_dir() and not overwrite else None
            )
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
        # who holds the lock, should this process try to take it again (the default session of QK_SNIFF_OUTPUT)
        holder = f"{config.setting_name('output') if config.output is not None else 'output'}={str(self.output)!r}"
        self._lock_fd = take_lock(self.output, self.files.lock, holder)
        try:
            columns = {"token_id": self.token_ids, "token_str": self.token_ids and vocabulary is not None}
            manifest, self.removed_orphans = open_capture(
                self.output, self.files, config, source, overwrite, columns, fsync, vocabulary_digest(vocabulary)
            )
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
        self._warned_vocabulary = False  # saver thread: a token id past the vocabulary's end (token_str null)
        self._next_segment = manifest["next_segment"]
        self._open = self._new_segment()
        self._sealed: list = []  # of Segment
        self._waiting_since: float | None = None  # first commit() not yet durable
        self._inflight = None  # the finalise being written
        self._exported_at = float("-inf")  # last write of OUT/examples.parquet
        self._spilling: list = []  # (future, bytes) of spills being written
        self._transfer = Transfer(config.pinned_mb << 20)
        # A forward's rows are staged whole when they fit half the pool: the saver can hold the
        # previous forward's piece while the next one is copied in.
        self.staging_limit = (config.pinned_mb << 20) // 2
        self._writers = Writers(writer_threads)
        # C-level, no Python lock: an interrupt in the capturing (main) thread cannot leave it held for the saver.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held: list = []  # forward pieces not queued yet: the saver takes them together
        self._held_bytes = 0  # the bytes of their pool regions
        self._sender = Sender(self._transfer, self._enqueue, self._check_waiting)
        self._error: BaseException | None = None
        self.refusals = LateRefusals()  # examples the saver refused after their forward
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qk-sniff-saver", daemon=True)
        self._thread.start()
        if manifest["examples"] and check_examples_file(self.output, manifest):
            self._write_manifest(export=True)  # a killed run left the examples table behind the manifest

    # ---- the capturing thread ----------------------------------------------------------
    def committed_ids(self) -> set[int]:
        """Examples already committed (by this run or an earlier one): a resuming run skips them."""
        return set(self._committed)

    def committed_among(self, example_ids) -> set[int]:
        return {i for i in example_ids if i in self._committed}

    def max_committed_id(self) -> int | None:
        """The largest committed example id (automatic ids continue after it), None if none."""
        return max(self._committed, default=None)

    def bind_model(self, model_config, plan) -> None:
        """Record the model and head plan (first captured call); refuse a different model than OUT holds."""
        model = model_record(model_config, plan)
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
        self._refuse_committed(batch.example_ids)
        self._sender.put(batch)

    def _refuse_committed(self, example_ids) -> None:
        if not self._committed.isdisjoint(example_ids):
            done = sorted(self._committed.intersection(example_ids))
            raise CommittedExampleError(
                f"rows for example(s) {done[:5]} arrived, but they are already committed in {self.output}; "
                "skip committed examples (committed_ids()) or give new examples new ids (after max_committed_id())"
            )

    @property
    def pool(self):
        """The host pool (qk_attn.storage.pool.HostPool; None before the first recorded call): its
        `waits` and `waited_s` say how far the saver held capture back."""
        return self._transfer.pool

    def prepare(self, device) -> None:
        """The pinned pool, allocated at the first forward's first recorded call."""
        self._transfer.prepare(device)

    def put_forward(self, staging) -> None:
        """A forward's rows at its end: one copy into the pool (waiting for space here, between
        forwards) and one piece to the saver."""
        self.check()
        if self._closed:
            raise RuntimeError(f"the qk-sniff sink for {self.output} is closed")
        self._refuse_committed(staging.example_ids)
        self._sender.drain()  # streamed calls of an earlier forward go first
        piece = self._transfer.send_forward(staging, self._check_waiting)  # may send the held list
        self._held.append(piece)  # so: appended to the list held after it, never to one already sent
        self._held_bytes += piece.region[1] - piece.region[0]
        if len(self._held) >= HOLD_FORWARDS or self._held_bytes > self._transfer.pool.nbytes // HOLD_FORWARDS:
            self._send_held()

    def check_examples(self, example_ids) -> None:
        self._report_refused(example_ids)

    def _report_refused(self, example_ids=None) -> None:
        """Raise the refusals (qk_attn.capture.refusals) of these examples (None: any) not reported yet."""
        try:
            self.refusals.raise_for(example_ids)
        except REFUSALS:
            self._committed -= self.refusals.ids  # commit() may have named them before the saver refused them
            raise

    def _check_waiting(self) -> None:
        """Called while a forward waits for pool space: the held pieces go first (they hold some)."""
        self._send_held()
        self.check()

    def _send_held(self) -> None:
        if self._held:
            held, self._held, self._held_bytes = self._held, [], 0
            self._queue.put(held)

    def _enqueue(self, item) -> None:
        """Queue `item` for the saver after the forward pieces held back, in the order they came."""
        self._send_held()
        self._queue.put(item)

    def end_forward(self) -> None:
        """Called once after every model forward, outside attention calls: sends what waited on
        the device, waiting for pool space (this is where back-pressure happens)."""
        self.check()
        self._sender.drain()

    def discard(self, example_ids) -> None:
        """Drop the rows of these uncommitted examples (their forward stopped part-way)."""
        self.check()
        self._sender.drain()  # their rows are queued before the discard
        self._enqueue(("discard", [int(i) for i in example_ids]))

    def describe(self, example_id: int, source_id: str | None, source_index: int | None) -> None:
        """Where example `example_id` came from: the source dataset's own id and its row index
        (recorded in the manifest's `example_info` and OUT/examples.parquet)."""
        self._enqueue(
            (
                "describe",
                int(example_id),
                None if source_id is None else str(source_id),
                None if source_index is None else int(source_index),
            )
        )

    def commit(self, example_ids) -> None:
        """These examples are complete; they become durable within `commit_every_s` (plus one write)."""
        self.check()
        self._sender.drain()  # their rows must be queued before the commit
        ids = [int(i) for i in example_ids]
        with interrupts_held():  # queued and listed committed together, or neither (Ctrl-C)
            self._enqueue(("commit", ids))
            self._committed.update(set(ids) - self.refusals.ids)
        self._report_refused(ids)

    def flush(self, timeout: float | None = None) -> None:
        """Make every committed example durable now, and wait for it (re-raises saver errors)."""
        self.check()
        self._sender.drain()
        self._wait(_Flush(final=False), timeout)
        self._report_refused()

    def check(self) -> None:
        """Re-raise the saver thread's error, if it had one."""
        error = self._error
        if error is None:
            return
        if isinstance(error, (CaptureError, CaptureOverflow, CommittedExampleError, SaverError)):
            raise type(error)(str(error)) from error  # (a SaverError says itself what became of the rows)
        where = ""
        if isinstance(error, (FileExistsError, NotADirectoryError)):  # as a user's file named like a folder is
            where = " (a file sits where the capture needs a folder: move it out of the way)"
        raise SaverError(
            f"qk-sniff saver for {self.output} failed: {type(error).__name__}: {error}{where}. The examples its "
            "manifest lists (those whose commit the saver had finished) are safe; re-run the same command (or open a "
            "session on the same output again) to resume the rest."
        ) from error

    def close(self) -> None:
        """Commit everything committed so far, write the card, stop the threads. Idempotent. In a process
        forked from the one that opened the sink it only closes this copy of the lock's descriptor: the
        saver thread, the lock and the folder are the parent's, which goes on writing them."""
        if self._closed:
            return
        self._closed = True
        if not lock_taken_here(self._lock_fd):
            release_lock(self.output, self._lock_fd, self.files.lock)  # the descriptor only (folder.release_lock)
            return
        final = _Flush(final=True)
        queued = False
        try:
            if self._error is None:
                self._sender.drain()
                self._enqueue(final)
                queued = True
                self._wait_for(final, None)
        finally:
            self._sender.clear()
            if not queued and self._error is None:  # interrupted before it: what was committed is still written
                self._enqueue(final)
            self._enqueue(_STOP)
            self._thread.join()
            self._writers.close()
            if self._error is not None:  # no writer runs now
                self._clean_after_failure()
            release_lock(self.output, self._lock_fd, self.files.lock)
        self.check()
        self._report_refused()

    @property
    def manifest(self) -> dict:
        with self._manifest_lock:
            return json.loads(json.dumps(self._manifest))

    def _wait(self, flush: _Flush, timeout: float | None) -> None:
        self._enqueue(flush)
        self._wait_for(flush, timeout)

    def _wait_for(self, flush: _Flush, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not flush.done.wait(0.05):
            self.check()
            if not self._thread.is_alive():
                raise SaverError(f"qk-sniff saver thread for {self.output} is not running")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"qk-sniff saver did not finish flushing {self.output} within {timeout} s")
        self.check()
