"""Which examples (sequences) a forward's rows belong to: example ids named by `begin`, continued over
the same cache, or fresh, checked at the forward's mask before any layer writes its cache; and the
sequences of a forward that is discarded, forgotten. Committing and dropping the examples begun:
`SequenceTracker` (qk_attn.capture.sequences). Sequence identity: docs/architecture.md.
"""

from __future__ import annotations

import logging
import operator

from qk_attn.capture.caches import resets, rollback_of, row_moves
from qk_attn.capture.forward import ForwardContext
from qk_attn.capture.forwards import ForwardTracker
from qk_attn.capture.sequence_table import Sequence, SequenceTable, key_of
from qk_attn.errors import CaptureError

logger = logging.getLogger("qk_attn.capture.sequences")  # one logger for a recorder's sequences (SequenceTracker's)

ID_RANGE = (-(2**63), 2**63 - 1)  # the example_id column is int64


class SequenceIds(ForwardTracker):
    """The ids of a recorder's forwards' rows: the sequence each forward extends, and the examples begun since
    the last commit (what becomes of those: `SequenceTracker`).

    Sequence identity is explicit: `begin(ids)` names the batch rows of the next forward; a
    later forward over the same cache (chunked prefill, decoding) continues them; a forward over
    an empty cache without `begin` gets fresh ids (from 0, after the largest id used or committed). Each model
    has its own current forward and sequences.
    """

    def __init__(self, sink, example_ids=None):
        super().__init__(sink)
        self._pending_ids = None if example_ids is None else integer_ids(example_ids)
        self._sequences = SequenceTable()
        committed = self.committed_ids()
        self._next_auto_id = max(0, max(committed) + 1) if committed else 0  # never negative, as in a session
        self._begun: dict[int, int] = {}  # uncommitted example id -> number of its latest forward, in begin order
        self._forward_number = 0  # forwards given example ids so far
        self._commits = 0  # commits so far: a sequence's ids are checked against the committed ones once per commit
        self._begun_sequences: list = []  # the sequences of the examples begun since the last commit

    def begin(self, example_ids) -> None:
        """Ids for the batch rows of the next forward; later forwards over its cache continue them."""
        ids = integer_ids(example_ids)
        self._refuse_taken(ids)  # refused here, where the ids are named (the forward checks them again)
        committed = self.sink.committed_among(ids)
        if committed:
            raise ValueError(_COMMITTED.format(ids=sorted(committed)))
        self._pending_ids = ids

    def _refuse_taken(self, ids: list[int]) -> None:
        """ValueError for ids that repeat, or that name an example begun and not committed yet."""
        if len(set(ids)) != len(ids):
            raise ValueError(f"example_ids {ids} repeats an id: every batch row is its own example")
        again = sorted(set(ids) & self._begun.keys())
        if again:
            raise ValueError(
                f"example ids {again} were begun already and are not committed yet: an example is begun once "
                "(later forwards over its cache continue it without begin); use new ids, or commit() first"
            )

    def _take_begun_ids(self) -> list[int] | None:
        """`begin()`'s ids, taken by the forward that starts now: used up by it even if it fails or is
        refused, so that they never name a later forward's rows."""
        ids, self._pending_ids = self._pending_ids, None
        return ids

    def _sequence_of(self, config, cache):
        """The sequence the cache of the model of `config` holds (None: none, or one that is gone)."""
        return self._sequences.of(key_of(config, cache), cache)

    def _forget_rolled_back(self, sequence, ids: list[int]) -> None:
        self._forget_begun(ids)
        logger.warning(
            "qk-attn: the cache of example(s) %s was cropped (Cache.crop) below the %d tokens recorded for them, so "
            "rows of tokens it no longer holds were taken; their rows are discarded and they are not committed",
            ids,
            sequence.end,
        )

    def _forget_begun(self, ids: list[int], key: tuple | None = None, cache=None, why: str = "") -> None:
        """Forget sequences holding `ids`, which are never committed: their rows in the sink go (a later forward
        on `cache` is told `why`)."""
        self._sequences.forget(ids, key, cache, why)
        self._begun = {i: n for i, n in self._begun.items() if i not in ids}
        self.sink.discard(ids)

    def committed_ids(self) -> set[int]:
        return set(self.sink.committed_ids())

    def _discard(self, forward: ForwardContext | None, why: str, config=None, cache=None, past: int = 0) -> None:
        """Forget the sequences `forward` extends (or, before it has a context, the one of `cache` of the
        model of `config`, `past` tokens in): their rows are dropped and they are neither committed nor
        continued. A forward from position 0 without a cache continues nothing: the model's earlier
        cacheless forwards are complete examples."""
        if forward is not None:
            forward.staging = None  # its staged rows are dropped, never handed off
            forward.discarded = True
        ids = set(forward.example_ids or ()) if forward is not None else set()
        if forward is not None:
            config, cache, past = forward.config, forward.cache, forward.past
        key = key_of(config, cache)
        held = self._sequences.of(key, cache) if cache is not None or past > 0 else None
        if held is not None and held.resets != resets(cache):
            held = None  # emptied since its last forward: complete, not this forward's
        for sequence in (getattr(forward, "sequence", None), held):
            if sequence is not None:
                ids |= set(sequence.ids)
        self._sequences.forget(ids, key, cache, why)  # a later forward on its cache is told why
        ids -= self.sink.committed_among(ids)  # committed: complete, whatever a later forward does
        if not ids:
            return
        self._begun = {i: n for i, n in self._begun.items() if i not in ids}
        self.sink.discard(sorted(ids))
        logger.warning(
            "qk-attn: a forward of example(s) %s %s; their rows are discarded and they are not committed",
            sorted(ids),
            why,
        )

    def _start_sequence(self, forward: ForwardContext) -> None:
        """Give this forward its example ids, once (the rules: the class docstring). A
        sequence belongs to its cache: a forward continues the sequence of the cache it extends."""
        if forward.example_ids is not None:
            return
        ids, sequence = self._sequence_ids(forward)
        if sequence is None:
            sequence = self._sequences.start(key_of(forward.config, forward.cache), ids, forward.cache)
            self._begun_sequences.append(sequence)
        else:
            forward.continues_from = sequence.next_position
            if forward.decode_step:  # rows of a batched generate() that had finished before this step's tokens
                forward.alive = sequence.unfinished
        sequence.unfinished = forward.unfinished
        sequence.thread = forward.thread
        sequence.row_moves = row_moves(forward.cache)
        sequence.resets = resets(forward.cache)
        sequence.rollback = rollback_of(forward.cache)
        sequence.rollbacks_seen = len(sequence.rollback.lengths) if sequence.rollback is not None else 0
        sequence.end = forward.past + forward.num_new
        sequence.checked = self._commits
        forward.sequence = sequence
        forward.example_ids = tuple(ids)
        self._next_auto_id = max(self._next_auto_id, max(ids) + 1)
        self._forward_number += 1
        self._begun.update(dict.fromkeys(ids, self._forward_number))
        self.sink.check_examples(forward.example_ids)  # refused after an earlier forward of theirs

    def _check_sequence(self, forward: ForwardContext) -> None:
        self._sequence_ids(forward)

    def _sequence_ids(self, forward: ForwardContext) -> tuple[list[int], Sequence | None]:
        """The ids this forward's rows get, and the sequence it continues (None: a new one), or the
        refusal. Also run at the forward's mask (`_check_sequence`), before any layer writes its cache."""
        batch = forward.batch_size
        key = key_of(forward.config, forward.cache)
        sequence = self._sequences.of(key, forward.cache)  # None for a cache that is gone, whose id a new one took
        if sequence is not None and sequence.resets != resets(forward.cache):
            sequence = None  # emptied since its last forward (Cache.reset()): complete, continued by none
        gone = self._sequences.discarded(key, forward.cache) if sequence is None else None
        if sequence is not None and sequence.rolled_back():
            rolled_back = sorted(set(sequence.ids) & self._begun.keys())
            if rolled_back:
                self._forget_rolled_back(sequence, rolled_back)
        if forward.begun_ids is not None:
            ids = forward.begun_ids
            if len(ids) != batch:
                raise ValueError(f"example_ids has {len(ids)} ids but the forward has batch size {batch}")
            self._refuse_taken(ids)
            sequence = None
        elif forward.past == 0:
            if self._next_auto_id + batch - 1 > ID_RANGE[1]:
                raise CaptureError(
                    f"qk_sniff: no automatic example ids are left after {self._next_auto_id - 1} (ids are int64); "
                    "call session.begin(ids) to name this forward's examples"
                )
            ids, sequence = list(range(self._next_auto_id, self._next_auto_id + batch)), None
        elif gone is not None:
            raise CaptureError(
                f"qk_sniff: this forward continues the cache of examples {gone[0]}, which were discarded when a "
                f"forward of theirs {gone[1]}; nothing more of them is recorded: call session.begin(ids) before it "
                "to record its tokens under new ids"
            )
        elif sequence is not None and sequence.end == forward.past and len(sequence.ids) != batch:
            raise CaptureError(
                f"qk_sniff: this forward of batch {batch} continues a cache that holds {len(sequence.ids)} "
                f"sequence(s), examples {list(sequence.ids)} (as generate(num_return_sequences=...) over a cache "
                "prefilled for one prompt); run as many rows as the cache holds, or call session.begin(ids) before "
                "it to name its sequences"
            )
        elif sequence is None or sequence.end != forward.past:
            where = (
                "no sequence of this model was started on this cache"
                if sequence is None
                else (f"the sequence {list(sequence.ids)} of this cache is at position {sequence.end}")
            )
            raise CaptureError(
                f"qk_sniff: this forward continues a cache at position {forward.past} but {where} (a rolled-back or "
                "different cache, or forwards that ran on it without qk_sniff, outside this session or in training mode); call "
                "session.begin(ids) before it to name its sequences"
            )
        elif sequence.row_moves != row_moves(forward.cache):
            raise CaptureError(
                f"qk_sniff: the rows of the cache that holds examples {list(sequence.ids)} were moved since their "
                "last forward (Cache.reorder_cache, batch_select_indices or batch_repeat_interleave: beam search or a "
                "custom decoding loop), so a row's new tokens could belong to another example; not recorded "
                "(record decoding that keeps each example in its batch row: greedy or sampling)"
            )
        else:
            ids = list(sequence.ids)
        # Once per sequence and commit (a set lookup per id in the sinks qk-attn has: `Sink.committed_among`).
        if sequence is None or sequence.checked != self._commits:
            committed = self.sink.committed_among(ids)
            if committed and sequence is not None:  # env mode names no ids: say where they came from
                raise ValueError(
                    f"this forward continues the cache of examples {sorted(committed)}, which a commit() or "
                    "flush() since its last forward committed: a committed example is complete, so rows are "
                    "never added to it; commit or flush after a sequence's last forward, or call "
                    "session.begin(ids) before this one to record it under new ids"
                )
            if committed:
                raise ValueError(_COMMITTED.format(ids=sorted(committed)))
        return ids, sequence


_COMMITTED = (
    "example ids {ids} are already committed in this output; rows of a committed example are never added (use new ids)"
)


def integer_ids(example_ids) -> list[int]:
    """Example ids as Python ints; ValueError for one that is not an integer (9.7 is not example 9, True
    is not example 1) or does not fit the example_id column (int64), or for ids that are not a list."""
    if getattr(example_ids, "ndim", 1) == 1 and hasattr(example_ids, "tolist"):  # a numpy array, a tensor
        example_ids = example_ids.tolist()  # (bool elements become bools, refused below)
    if not isinstance(example_ids, (list, tuple, range)):  # a set or dict has no batch-row order
        raise ValueError(f"example_ids={example_ids!r}: give a list of integer ids, one per batch row")
    example_ids = list(example_ids)
    ids = []
    for i in example_ids:
        try:
            if isinstance(i, bool):
                raise TypeError
            ids.append(operator.index(i))
        except TypeError:
            raise ValueError(f"example_ids {example_ids!r} holds {i!r}: example ids are integers") from None
        if not ID_RANGE[0] <= ids[-1] <= ID_RANGE[1]:
            raise ValueError(
                f"example_ids {example_ids!r} holds {i}: example ids fit int64 ({ID_RANGE[0]} to {ID_RANGE[1]})"
            )
    return ids
