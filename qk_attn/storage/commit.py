"""Finalising sealed segments: their shards written, fsync'd and renamed, then the manifest (the commit point).

A half of the saver thread (qk_attn.storage.saver.SaverThread inherits it): `_finalize` hands the
sealed segments' buffers to the writer threads, one shard per folder; `_complete` renames the
shards and records them and the committed examples in the manifest once every write is done;
`_compact` merges small committed shards with the same rename-then-manifest order. The order of
these steps is the commit protocol of docs/architecture.md.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from qk_attn.capture.sinks import warn_not_from_zero
from qk_attn.errors import CorruptShard, SaverError
from qk_attn.storage import compact
from qk_attn.storage.folder import remove_orphans
from qk_attn.storage.layout import key_names
from qk_attn.storage.manifest import now, read_manifest
from qk_attn.storage.records import add_shard
from qk_attn.storage.segment import NO_POSITION, unseen_queries
from qk_attn.storage.shards import CallBuffer, Written

logger = logging.getLogger("qk_attn.storage.saver")  # one logger for the saver thread (the CLI filters it)

COMPACT_AT = 64  # small committed shards in one folder that trigger a merge while running


@dataclass
class _Inflight:
    """A finalise whose shards the writer threads are writing."""

    sealed: list  # of qk_attn.storage.segment.Segment
    commit: set[int]
    number: int
    futures: list
    nbytes: int


class Committer:
    """The saver thread's commit steps (state: see SaverThread; called on the saver thread only)."""

    _lock_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the lock file this sink holds

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
        self._check_folder()  # before any write: nothing goes into a folder that replaced OUT
        self._waiting_since = None  # commits from now on wait for the next finalise
        merged: dict[tuple, tuple[CallBuffer, list[int]]] = {}
        for seg in sealed:
            for key, buffer in seg.buffers.items():
                if key in merged:
                    merged[key][0].extend(buffer)
                    merged[key][1].append(seg.number)
                else:
                    merged[key] = (buffer, [seg.number])
        first = sealed[0] if sealed else self._new_segment()
        futures = [f for seg in sealed for f in seg.parts]
        for _, (buffer, segments) in sorted(merged.items()):
            futures += self._submit(first, buffer, segments)
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
        # From the first rename to the manifest write, a failure leaves renamed shards that no manifest
        # lists (a glob reader such as datasets.load_dataset would read them): they go before it is raised.
        try:
            if self.fsync:  # data on disk before the names that commit it
                self._writers.fsync([self.output / w.key / f".{w.name}.tmp" for w in written])
            for w in written:
                os.replace(self.output / w.key / f".{w.name}.tmp", self.output / w.key / w.name)
            if self.fsync:
                self._writers.fsync({self.output / w.key for w in written})
            segment_of = {e: seg.number for seg in sealed for e in seg.examples}
            valid = {e: c for seg in sealed for e, c in seg.valid.items()}
            first_position = {e: p for seg in sealed for e, p in seg.first.items()}
            unseen = unseen_queries(sealed)
            # Edited in place, not copied (a large capture's manifest is megabytes): only this thread
            # changes what it commits, and after a failed write the sink is in error for good.
            with self._manifest_lock:
                manifest = self._manifest
                for w in written:
                    add_shard(manifest, w)
                for seg in sealed:
                    for (layer, kind, heads), n in seg.calls.items():
                        for key in key_names(layer, heads, kind):
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
                        "source_id": None,
                        "source_index": None,
                        "segment": segment_of.get(example, job.number),
                        "first_position": None if position == NO_POSITION else position,
                    }
                    if example in unseen:
                        manifest["example_info"][str(example)]["unseen_queries"] = unseen[example]
                for example, (source_id, source_index) in list(self._described.items()):
                    info = manifest["example_info"].get(str(example))
                    if info is not None:  # described before or after its commit: both are kept
                        info.update(source_id=source_id, source_index=source_index)
                        del self._described[example]
                manifest["next_segment"] = self._next_segment  # above every number in use (open, merged)
                manifest["updated"] = now()
            self._write_manifest()
        except BaseException as error:
            self._undo_commit(error)
            raise
        self._durable |= commit
        self._ready -= commit
        self._compact(COMPACT_AT)

    def _undo_commit(self, error: BaseException) -> None:
        """After a commit (or a merge) failed between its first rename and its manifest write: its
        shards go (`_remove_uncommitted`); in a folder that replaced OUT nothing is touched, and the
        error says so."""
        try:
            replaced = self._folder_replaced()
        except OSError:  # the commit's own error is the one raised
            replaced = False
        if replaced:
            if not isinstance(error, SaverError):
                raise self._replaced_error() from error
            return
        self._remove_uncommitted()

    def _clean_after_failure(self) -> None:
        """When the sink stops after a failed write (a full disk while spilling): the temporary shards it
        left go, so that the folder is what its manifest says; a folder that replaced OUT is not touched."""
        try:
            replaced = self._folder_replaced()
        except OSError:
            replaced = True
        if not replaced:
            self._remove_uncommitted()

    def _remove_examples_ahead(self, manifest: dict) -> None:
        """The examples table is exported just before the manifest: after a failed manifest write it can
        list examples the manifest does not commit, which the `examples` config would give. Such a table
        goes (verify then reports it missing; the next run or `repair` writes it again)."""
        import pyarrow.parquet as pq

        path = self.output / self.files.examples
        if path.is_file():
            ids = pq.read_table(path, columns=["example_id"]).column("example_id").to_pylist()
            if not {str(i) for i in ids} <= manifest["examples"].keys():
                path.unlink()

    def _remove_uncommitted(self) -> None:
        """After a failed commit: the shards that the manifest on disk does not list (renamed or still
        temporary) go now, so that the folder is what it says (verify passes, the card's file patterns
        read no uncommitted rows) without waiting for the next open. Best effort: the commit's own
        error is the one raised."""
        try:
            manifest = read_manifest(self.output, self.files.manifest)
            if manifest is not None:
                remove_orphans(self.output, manifest, self.files)
                self._remove_examples_ahead(manifest)
        except Exception as error:  # noqa: BLE001
            logger.warning("qk-sniff: could not remove the uncommitted shards in %s: %r", self.output, error)

    def _folder_replaced(self) -> bool:
        """Whether OUT is no longer the folder this sink opened: the lock file there is gone or is
        another file (`rm -rf OUT && mkdir OUT`, or another writer's lock since). The sink holds its
        lock file open, so its inode cannot be reused meanwhile. One stat."""
        if self._lock_identity is None:
            held = os.fstat(self._lock_fd)
            self._lock_identity = (held.st_dev, held.st_ino)
        try:
            now_there = os.stat(self.output / self.files.lock)
        except (FileNotFoundError, NotADirectoryError):
            return True
        return (now_there.st_dev, now_there.st_ino) != self._lock_identity

    def _replaced_error(self) -> SaverError:
        return SaverError(
            f"the output folder {self.output} was removed or replaced while the capture ran ({self.files.lock} "
            "there is gone or is not the lock this capture holds); nothing more was written to it, and the rows "
            "committed before went with the old folder: capture again"
        )

    def _check_folder(self) -> None:
        """Before a commit writes (its shards, its manifest): fail if OUT was removed or replaced."""
        if self._folder_replaced():
            raise self._replaced_error()

    def _compact(self, at_least: int) -> None:
        """Merge small committed shards (qk_attn.storage.compact) in the writer threads; one manifest update."""
        manifest = self._manifest  # only this thread changes shards; the merges only read it
        jobs = compact.plan(manifest, self.output, self.shard_bytes, at_least)
        if not jobs:
            return
        self._check_folder()
        seg = self._new_segment()  # a fresh number for the merged shards' names
        futures = []
        for key, group in jobs:
            name = self.files.shard(seg.number, seg.next_part)
            seg.next_part += 1
            futures.append(
                (key, group, self._writers.submit(compact.merge, self.output / key, group, name, key, manifest))
            )
        merged = []
        for key, group, future in futures:
            try:
                merged.append((key, group, future.result()))
            except CorruptShard as error:  # left as it is: verify names it, repair drops what it holds
                logger.warning("qk-sniff: not compacting %s: %s; run `qk-sniff repair %s`", key, error, self.output)
        if not merged:
            return
        jobs = [(key, group) for key, group, _ in merged]
        try:  # as in `_complete`: merged shards that no manifest lists go before the error is raised
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
        except BaseException as error:
            self._undo_commit(error)
            raise
        for path in replaced:  # orphans from here on: a crash now only leaves files the next open removes
            path.unlink()
