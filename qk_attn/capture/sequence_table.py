"""The sequences of a recorder: which examples each cache holds, and why a cache's were discarded.

A sequence is the examples one cache holds (one per batch row). Sequences are keyed by (model
config, cache object) and hold their cache weakly: a cache that is gone cannot be continued, and a
new cache that takes a gone one's id starts its own sequence. The rules that give a forward its
sequence are `SequenceTracker._start_sequence`'s (qk_attn.capture.sequences).
"""

from __future__ import annotations

import threading
import weakref

PRUNE_AT = 16  # sequences held before those of caches that are gone are forgotten


class Sequence:
    """The examples one cache holds (one per batch row), and how far they go."""

    def __init__(self, ids: list[int], cache):
        self.ids = ids
        self.cache = weakref.ref(cache) if cache is not None else (lambda: None)
        self.end = 0  # cache position after the last recorded forward
        self.unfinished = None  # generate()'s unfinished rows after the last step (device), if any
        self.next_position = None  # (B,) the position after each row's last token (-1: none yet)
        self.cross_done: set[int] = set()  # cross-attention layers whose vision keys are recorded
        self.decisions = None  # the sampler's decisions for its next decode steps (decisions.DecisionWindow)
        self.checked = -1  # the tracker's commit count when its ids were last checked against the committed ones
        self.row_moves = 0  # its cache's row moves (qk_attn.capture.caches) at its last forward
        self.resets = 0  # its cache's resets at its last forward
        self.thread = threading.current_thread()  # that ran its last forward
        self.rollback = None  # its cache's caches.Rollback
        self.rollbacks_seen = 0  # how many crops of it its last forward had seen

    def rolled_back(self) -> bool:
        """Whether a crop since its last forward left its cache shorter than the tokens recorded for it."""
        return self.rollback is not None and self.rollback.below(self.end, self.rollbacks_seen, self.resets)


def key_of(config, cache) -> tuple:
    """Sequences are keyed by model and cache; those begun without a known cache by model only."""
    return id(config), None if cache is None else id(cache)


class SequenceTable:
    """The live sequences by (config, cache) key, and the last discard on each cache."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, Sequence] = {}
        self._discarded: dict[tuple, tuple] = {}  # key -> (weak ref to the cache, ids, why) of its last discard
        self._prune_at = PRUNE_AT  # size of _by_key at which those of caches that are gone are forgotten

    def __len__(self) -> int:
        return len(self._by_key)

    def of(self, key: tuple, cache) -> Sequence | None:
        """The sequence of `cache` under `key` (None when the cache of that id is another one)."""
        sequence = self._by_key.get(key)
        return sequence if sequence is not None and sequence.cache() is cache else None

    def start(self, key: tuple, ids: list[int], cache) -> Sequence:
        self._forget_gone_caches()
        sequence = self._by_key[key] = Sequence(ids, cache)
        return sequence

    def open_ids(self, other_threads: bool = False) -> set[int]:
        """Ids of the sequences whose cache is alive: a later forward could continue them (with
        `other_threads`, only those whose last forward ran in another thread that is still alive)."""
        here = threading.current_thread()
        return {
            i
            for s in self._by_key.values()
            if s.cache() is not None and (not other_threads or (s.thread is not here and s.thread.is_alive()))
            for i in s.ids
        }

    def forget(self, ids, key: tuple | None = None, cache=None, why: str = "") -> None:
        """Forget the sequences holding any of `ids`; with `cache`, remember why they went (`discarded`)."""
        ids = set(ids)
        self._by_key = {k: v for k, v in self._by_key.items() if not ids & set(v.ids)}
        if cache is not None and ids:  # a later forward on it is told why its examples are gone
            self._discarded[key] = (weakref.ref(cache), sorted(ids), why)

    def discarded(self, key: tuple, cache) -> tuple[list[int], str] | None:
        """(ids, why) of the last discard of the sequence of `cache`, if its sequence was discarded."""
        entry = self._discarded.get(key)
        if entry is None or cache is None or entry[0]() is not cache:
            return None
        return entry[1], entry[2]

    def _forget_gone_caches(self) -> None:
        """Forget the sequences whose cache is gone: no forward can continue them (a new cache that
        takes a gone one's id starts its own). Each forward over a new cache (a document, a generate()
        call) adds one, so a long session would otherwise hold one per example; pruned when the dict
        has doubled, O(1) per new sequence."""
        if len(self._by_key) < self._prune_at:
            return
        self._by_key = {k: s for k, s in self._by_key.items() if k[1] is None or s.cache() is not None}
        self._discarded = {k: entry for k, entry in self._discarded.items() if entry[0]() is not None}
        self._prune_at = 2 * len(self._by_key) + PRUNE_AT
