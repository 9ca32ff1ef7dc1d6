"""The saver thread: accepts rows into per-segment buffers, seals segments, drops what is never committed.

    capturing thread  put(batch)      pieces into the host pool (qk_attn.storage.sink.ParquetSink)
                      commit(ids)     these examples are complete
    saver thread      piece           -> rows into the open segment's per-(layer, kind) buffers
                      commit          -> the open segment is *sealed* once every example in it is complete
                      timer           -> sealed segments are *finalised* at most `commit_every_s` after
                                         the first commit waiting in them (qk_attn.storage.commit):
                                         buffers written by the writer threads as `.tmp` shards,
                                         fsync'd, renamed; then the manifest replaces the old one

So a committed example is durable `commit_every_s` (default 2 s) plus one finalise after
`commit()`; a SIGKILL loses only examples in flight and those. Buffers over `buffer_mb` are
spilled to `.tmp` shards of the open segment. Folders that collect many small shards are
merged into shards of about `shard_mb` when they pass COMPACT_AT shards and at close. The
protocol is described in docs/architecture.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np

from qk_attn.capture.batch import CaptureBatch, HostReader, HostRows
from qk_attn.capture.refusals import REFUSALS
from qk_attn.storage.commit import Committer
from qk_attn.storage.examples import write_examples
from qk_attn.storage.layout import key_names
from qk_attn.storage.manifest import write_json_atomic
from qk_attn.storage.segment import Segment
from qk_attn.storage.shards import CallBuffer, write_buffer
from qk_attn.storage.transfer import ForwardPiece, Piece

logger = logging.getLogger(__name__)

COMPACT_AT_CLOSE = 16


EXPORT_EVERY_S = 60.0  # OUT/examples.parquet is rewritten at most this often while running (and at close)


class _Flush:
    def __init__(self, final: bool) -> None:
        self.final = final
        self.done = threading.Event()


_STOP = object()


class SaverThread(Committer):
    """The saver thread's half of a ParquetSink: everything here runs on that thread (its state
    is set up by ParquetSink.__init__)."""

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
                if isinstance(item, _Flush):
                    item.done.set()
                for piece in item if isinstance(item, list) else [item]:
                    if isinstance(piece, (Piece, ForwardPiece)):
                        piece.release()

    def _handle(self, item) -> None:
        if isinstance(item, list):  # forward pieces (ForwardPiece) the sink held back and sent together
            for piece in item:
                piece.wait()
                self._checked(piece.example_ids, lambda: self._accept_forward(piece.checks, piece.calls, piece.unseen))
                piece.release()  # its pool region is free now, not after the whole list
        elif isinstance(item, Piece):
            item.wait()
            self._checked(item.host.example_ids, lambda: self._accept(item.rows(), item.first))
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
                self._ready.update(i for i in item[1] if i not in self._durable and i not in self.refusals.ids)
            self._seal_and_schedule()
        elif item[0] == "written":
            self._complete(wait=False)
            if self._waiting_since is not None and time.monotonic() - self._waiting_since >= self.commit_every_s:
                self._finalize()
        elif item[0] == "describe":
            self._described[item[1]] = item[2:]
        elif item[0] == "discard":
            self._drop(set(item[1]) - self._ready - self._durable)
            self._seal_and_schedule()  # the segment may have waited for them only

    def _seal_and_schedule(self) -> None:
        """Seal the open segment once it is complete, and keep the clock of the first commit waiting
        to be durable (stopped when nothing is committable); finalise once it has waited long enough."""
        self._seal()
        if not self._committable():
            self._waiting_since = None  # nothing committable: examples wait for their segment to complete
        elif self._waiting_since is None:
            self._waiting_since = time.monotonic()
        if self._waiting_since is not None and time.monotonic() - self._waiting_since >= self.commit_every_s:
            self._finalize()

    def _checked(self, example_ids, accept) -> None:
        """`accept()` rows of these examples. A check of theirs that fails refuses them
        (qk_attn.capture.refusals): what they hold is dropped, and so are rows of refused examples
        that arrive later."""
        try:
            accept()
        except REFUSALS as error:
            self.refusals.refuse(example_ids, error)
        refused = self.refusals.ids.intersection(example_ids)
        if refused:
            self._drop(set(refused))
            self._seal_and_schedule()  # the segment may have waited for them only

    def _accept_forward(self, checks: list, calls: list, unseen: list) -> None:
        """A forward's offset checks, then its calls (host batches, or empty calls:
        qk_attn.capture.staging.EmptyCall) and the queries layers did not get into the open segment.
        Columns the calls share are read once, and calls that share their per-row counts are counted
        together: a decode step's calls cost a few list appends here."""
        for check in checks:
            check.verify()
        for example, layer, start, stop in unseen:
            self._open.unseen[example].setdefault(layer, []).append([start, stop])
        reader = HostReader()
        empty: dict[tuple, tuple[dict, dict]] = {}  # per-row counts of empty calls, by their tokens
        groups: dict[tuple, tuple[dict, dict, list]] = {}  # calls by the per-row counts they share
        for call in calls:
            if isinstance(call, CaptureBatch):
                rows = call.host_rows(reader=reader)
                self._add_rows(rows)
                valid, first = rows.valid, rows.first_position
            else:
                image_keys = call.cross_attention and call.kind == "k"  # vision tokens: no text position
                per_row = empty.get((id(call.tokens), image_keys))
                if per_row is None:
                    tokens = call.tokens
                    first = None if image_keys else tokens.first_position
                    per_row = reader.per_row(call.example_ids, tokens.valid_count, first, tokens.misnumbered)
                    empty[(id(tokens), image_keys)] = per_row
                valid, first = per_row
            # The reader returns the same dicts for the same columns: one group per forward, mostly.
            groups.setdefault((id(valid), id(first)), (valid, first, []))[2].append(call)
        for valid, first, members in groups.values():
            self._open.count_calls(members, valid, first)
        self._keep_in_budget()

    def _accept(self, rows: HostRows, first: bool) -> None:
        """A streamed piece's rows (`first`: the first piece of its call, which counts it)."""
        if first:
            self._open.count_calls([rows], rows.valid, rows.first_position)
        self._add_rows(rows)
        self._keep_in_budget()

    def _add_rows(self, rows: HostRows) -> None:
        """Rows into the open segment's buffer of their (layer, kind): one copy out of the host pool,
        whose region is reused after this returns."""
        if not len(rows):
            return
        key = (rows.layer, rows.kind, rows.heads)
        buffer = self._open.buffers.get(key)
        if buffer is None:
            buffer = self._open.buffers[key] = CallBuffer(
                rows.layer, rows.kind, rows.heads, rows.sliding_window, rows.vectors.shape[-1]
            )
        vectors = np.array(rows.vectors, dtype=self.vector_type.to_pandas_dtype(), order="C")
        buffer.add(rows.example_id, rows.position, rows.bucket, vectors, rows.token_id)
        self.rows_written += len(rows) * len(rows.heads)
        if self.vocabulary is not None and rows.token_id is not None and not self._warned_vocabulary:
            self._warn_past_vocabulary(rows.token_id)

    def _warn_past_vocabulary(self, token_id: np.ndarray) -> None:
        """Once per sink: a token id past the end of `vocabulary` gets token_str null (its token_id is
        kept). A warning, not a refusal: the model's vocab_size is no bound (Qwen's embedding has rows
        no tokenizer id reaches, so a whole vocabulary is shorter than it), only the ids that occur are."""
        largest = int(token_id.max())
        if largest >= len(self.vocabulary):
            self._warned_vocabulary = True
            logger.warning(
                "qk-sniff: token id %d is past the end of the vocabulary given (%d strings, ids 0-%d): rows of ids past "
                "its end get token_str null (their token_id is kept); pass a vocabulary of every id, e.g. "
                "tokenizer.convert_ids_to_tokens(range(len(tokenizer)))",
                largest,
                len(self.vocabulary),
                len(self.vocabulary) - 1,
            )

    def _keep_in_budget(self) -> None:
        seg = self._open
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
    def _new_segment(self) -> Segment:
        seg = Segment(self._next_segment)
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

    def _submit(self, seg: Segment, buffer: CallBuffer, segments: list[int]) -> list:
        """One shard per head of `buffer` to the writer threads: their Futures of `Written`."""
        futures = []
        for index, key in enumerate(key_names(buffer.layer, buffer.heads, buffer.kind)):
            name = self.files.shard(seg.number, seg.next_part)
            seg.next_part += 1
            futures.append(
                self._writers.submit(
                    write_buffer,
                    self.output / key,
                    name,
                    key,
                    buffer,
                    index,
                    segments,
                    self.vector_type,
                    self.token_ids,
                    self.vocabulary,
                    False,
                )  # fsync'd together at commit
            )
        return futures

    def _spill(self, until: int) -> None:
        """Write the open segment's largest buffers to `.tmp` shards until at most `until` bytes stay."""
        seg = self._open
        if seg.buffers:
            self._check_folder()  # no shard goes into a folder that replaced OUT
        for buffer_bytes, key in sorted(((b.nbytes, k) for k, b in seg.buffers.items()), reverse=True):
            if seg.nbytes <= until and until > 0:
                break
            buffer = seg.buffers.pop(key)
            futures = self._submit(seg, buffer, [seg.number])
            seg.parts += futures
            self._spilling += [(future, buffer.nbytes // len(futures)) for future in futures]

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
        self._open.drop(incomplete, self.output, self.fsync)

    def _write_manifest(self, export: bool = False, previous_too: bool = False) -> None:
        """The manifest (the commit point). Before it, at most every EXPORT_EVERY_S and at close,
        OUT/examples.parquet: an export of the manifest's examples for `datasets` (qk_attn
        readers use the manifest itself), so a large capture does not rewrite it every commit.
        Neither is written when OUT is no longer the folder this sink opened (`_check_folder`)."""
        self._check_folder()  # the commit point: never a manifest in a folder that replaced OUT
        with self._manifest_lock:
            manifest = self._manifest
            if export or time.monotonic() - self._exported_at >= EXPORT_EVERY_S:
                write_examples(self.output, manifest, self.files.examples, self.fsync)
                self._exported_at = time.monotonic()
            write_json_atomic(
                self.output / self.files.manifest, manifest, self.fsync, keep_previous=True, previous_too=previous_too
            )

    def _finish(self) -> None:
        """At close: the examples export, and the card (single writer) or the part's completion flag (ranks)."""
        if self.files.rank is not None:  # the card is written when the parts are merged
            with self._manifest_lock:
                self._manifest["part"]["complete"] = self.complete
                if self.complete and self.documents is not None:  # merge compares the ranks' lists
                    self._manifest["part"]["documents"] = self.documents
        self._write_manifest(export=True)
        manifest = self.manifest
        if self.files.rank is None:
            from qk_attn.storage.card import write_card  # huggingface_hub and yaml: imported at close only

            write_card(self.output, manifest)
