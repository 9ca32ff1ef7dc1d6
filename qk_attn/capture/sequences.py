"""The commit protocol's recorder side: the examples begun since the last commit are committed, aborted,
or dropped when they may be incomplete (stopped between two forwards, a model call that raised after
its decoder stack returned, a cache cropped below what was recorded).

Which examples a forward's rows belong to: `qk_attn.capture.sequence_ids`. When forwards start and
end: `qk_attn.capture.forwards`, `qk_attn.capture.forward_ends`. Sequence identity and the commit
protocol: docs/architecture.md.
"""

from __future__ import annotations

import logging
import threading

from qk_attn.capture import active
from qk_attn.capture.sequence_ids import SequenceIds
from qk_attn.capture.sequence_table import key_of

logger = logging.getLogger(__name__)


class SequenceTracker(SequenceIds):
    """The forwards and sequences of a recorder (`Session` is one), and the examples begun since the last commit:
    committed, aborted, or dropped when they may be incomplete. The ids of a forward's rows: `SequenceIds`
    (qk_attn.capture.sequence_ids).
    """

    def commit(self) -> None:
        """Every example begun so far is complete: the sink makes it durable. Except those a generate()
        that still runs (in another thread, or this one: a commit from its callback) is extending, with
        their cache alive: they stay begun, for a commit after it returns, never committed part-way."""
        self._end_forwards("commit")
        self._drop_rolled_back()
        self._commits += 1
        running = active.running_generations(self)
        later = set(self._extended_since(running, live_cache=True)) if running else set()
        self._begun_sequences = [s for s in self._begun_sequences if later.intersection(s.ids)]
        begun = [i for i in self._begun if i not in later]
        self._begun = {i: n for i, n in self._begun.items() if i in later}
        try:
            self.sink.commit(begun)  # may raise a refusal found after a forward: they are committed or refused anyway
        except BaseException:
            # Interrupted before the sink took them (or it failed): they are discarded, never left committed
            # here and unwritten there; a new begin() may record them again.
            lost = sorted(set(begun) - self.sink.committed_among(begun))
            if lost:
                self.sink.discard(lost)
            raise

    def abort(self) -> None:
        """Forget the examples begun since the last commit: they may be incomplete, so their rows are
        dropped (an in-memory table no longer shows them) and they are never committed."""
        ids, self._begun = sorted(self._begun), {}
        self._begun_sequences = []
        self._sequences.forget(ids)
        if ids:
            self.sink.discard(ids)

    def drop_open_sequences(
        self, why: str, since: int | None = None, other_threads: bool = False, generations=None, kept=()
    ) -> None:
        """Forget the uncommitted examples that were stopped between forwards, so they may be incomplete:
        those whose cache is still alive, so that a later forward could have continued them (with
        `other_threads`, only those another thread that is still alive was extending: a daemon thread
        at interpreter exit); with `since` (a `generation_started()` number), those this thread extended
        since then (a generate() of this thread raised: not another thread's examples); with `generations`
        ((thread, since) of each generate() recording here that still runs), those with a live cache that
        such a thread extended since its generate() started (the session closes under it). They are never
        committed. `kept`: ranges of `generation_started()` numbers whose examples stay (a nested generate()
        that returned made them)."""
        # An unfinished forward is discarded first, with its own warning (with `since`, this thread's only:
        # another thread may be inside a forward of its own examples, which this drop leaves alone). The
        # examples are forgotten though that fails (a hand-off that raised): committing them is never right.
        try:
            self._end_forwards("drop_open_sequences", this_thread=since is not None)
        finally:
            self._forget_open(why, since, other_threads, generations, kept)

    def _forget_open(self, why: str, since: int | None, other_threads: bool, generations, kept) -> None:
        if generations is not None:
            ids = self._extended_since(generations, live_cache=True)
        elif since is not None:
            ids = self._extended_since([(threading.current_thread(), since)], live_cache=False)
            ids = [i for i in ids if not any(start < self._begun[i] <= end for start, end in kept)]
        else:
            ids = sorted(self._sequences.open_ids(other_threads) & self._begun.keys())
        if not ids:
            return
        self._forget_begun(ids)
        where = (
            "could still be continued (their cache is alive) when" if since is None else "stopped between two forwards:"
        )
        logger.warning(
            "qk-attn: example(s) %s %s %s; they may be incomplete, so their rows are discarded and they are not committed",
            ids,
            where,
            why,
        )

    def on_call_raised(self, config, since: int) -> None:
        """A call of the model of `config` (calls.watch_call) raised after its decoder stack returned (in its
        loss, its head, a hook): the forward it ran, if it ended after `since` (`serial_mark`) in this
        thread, is stopped as a forward that raised inside is: its examples are not committed."""
        ended = self._ended.pop(id(config), None)
        if ended is None or ended[0] <= since or ended[1] is not threading.current_thread():
            return
        ids = sorted(set(ended[2] or ()) & self._begun.keys())
        if ids:
            cache = ended[3]() if ended[3] is not None else None  # a later forward on it is told why
            self._forget_begun(
                ids, key_of(config, cache), cache, "raised in its model call after its decoder stack returned"
            )
            logger.warning(
                "qk-attn: the model call that recorded example(s) %s raised after its decoder stack returned; their "
                "rows are discarded and they are not committed",
                ids,
            )

    def _extended_since(self, runs, live_cache: bool) -> list[int]:
        """Uncommitted ids of the sequences whose latest forward ran in one of `runs`' threads, after its
        `since` (a `generation_started()` number); with `live_cache`, only those whose cache is alive."""
        ids: set[int] = set()
        for sequence in self._begun_sequences:
            if live_cache and sequence.cache() is None:
                continue
            for thread, since in runs:
                if sequence.thread is thread:
                    ids.update(i for i in sequence.ids if self._begun.get(i, since) > since)
        return sorted(ids)

    def _drop_rolled_back(self) -> None:
        """Forget the begun examples whose cache a crop left shorter than their recorded end: the rows
        of the removed tokens (rejected drafts) were recorded, and no later forward told."""
        for sequence in self._begun_sequences:
            ids = sorted(set(sequence.ids) & self._begun.keys())
            if ids and sequence.rolled_back():
                self._forget_rolled_back(sequence, ids)

    def generation_started(self) -> int:
        """A generate() starts: the number `drop_open_sequences(since=...)` takes if it raises."""
        return self._forward_number
