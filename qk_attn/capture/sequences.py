"""Which forward is running, when it ends, and which examples (sequences) its rows belong to.

The forward and sequence lifecycle of a recorder: the mask and decoder-stack hooks report a
forward's start and end here; a forward's batch rows get their example ids here (named by
`begin`, continued over the same cache, or fresh); unfinished forwards are discarded. Sequence
identity, forward start and end, and the commit protocol: docs/architecture.md.
"""

from __future__ import annotations

import logging
import operator
import threading

import torch

from qk_attn.capture import forward as forward_module
from qk_attn.capture.caches import refuse_rounding_cache, row_moves
from qk_attn.capture.facts import require as require_facts
from qk_attn.capture.forward import ForwardContext, host_int
from qk_attn.capture.frames import (
    cache_length,
    decoder_stack,
    model_forward,
    refuse_unrecordable_generation,
    running_in,
)
from qk_attn.capture.hooks import watch_forward
from qk_attn.capture.sequence_table import SequenceTable, key_of
from qk_attn.capture.staging import OffsetCheck
from qk_attn.errors import CaptureError

logger = logging.getLogger(__name__)


class SequenceTracker:
    """The forwards and sequences of a recorder (`Session` is one), and the examples begun since the last commit.

    Sequence identity is explicit: `begin(ids)` names the batch rows of the next forward; a
    later forward over the same cache (chunked prefill, decoding) continues them; a forward over
    an empty cache without `begin` gets fresh ids (after the largest committed id). Each model
    has its own current forward and sequences.
    """

    def __init__(self, sink, example_ids=None):
        self.sink = sink
        self._pending_ids = None if example_ids is None else integer_ids(example_ids)
        self._forwards: dict[int, object] = {}  # id(model config) -> its current forward (or _Started)
        self._sequences = SequenceTable()
        committed = self.committed_ids()
        self._next_auto_id = max(committed) + 1 if committed else 0
        self._begun: dict[int, int] = {}  # uncommitted example id -> number of its latest forward, in begin order
        self._forward_number = 0  # forwards given example ids so far
        self._commits = 0  # commits so far: a sequence's ids are checked against the committed ones once per commit

    def begin(self, example_ids) -> None:
        """Ids for the batch rows of the next forward; later forwards over its cache continue them."""
        self._pending_ids = integer_ids(example_ids)

    def _take_begun_ids(self) -> list[int] | None:
        """`begin()`'s ids, taken by the forward that starts now: used up by it even if it fails or is
        refused, so that they never name a later forward's rows."""
        ids, self._pending_ids = self._pending_ids, None
        return ids

    def commit(self) -> None:
        """Every example begun so far is complete: the sink makes it durable."""
        self._end_forwards("commit")
        self._commits += 1
        begun, self._begun = list(self._begun), {}
        self.sink.commit(begun)  # may raise a refusal found after a forward: they are committed or refused anyway

    def abort(self) -> None:
        """Forget the examples begun since the last commit: they may be incomplete, so their rows are
        dropped (an in-memory table no longer shows them) and they are never committed."""
        ids, self._begun = sorted(self._begun), {}
        self._sequences.forget(ids)
        if ids:
            self.sink.discard(ids)

    def drop_open_sequences(self, why: str, since: int | None = None) -> None:
        """Forget the uncommitted examples that were stopped between forwards, so they may be incomplete:
        those whose cache is still alive, so that a later forward could have continued them, or with
        `since` (a `generation_started()` number), those a generate() that raised has extended. They are
        never committed."""
        self._end_forwards("drop_open_sequences")  # an unfinished forward is discarded first, with its own warning
        if since is None:
            ids = sorted(self._sequences.open_ids() & self._begun.keys())
        else:
            ids = sorted(i for i, number in self._begun.items() if number > since)
        if not ids:
            return
        self._sequences.forget(ids)
        self._begun = {i: n for i, n in self._begun.items() if i not in ids}
        self.sink.discard(ids)
        where = (
            "could still be continued (their cache is alive) when" if since is None else "stopped between two forwards:"
        )
        logger.warning(
            "qk-attn: example(s) %s %s %s; they may be incomplete, so their rows are discarded and they are not committed",
            ids,
            where,
            why,
        )

    def committed_ids(self) -> set[int]:
        return set(self.sink.committed_ids())

    def generation_started(self) -> int:
        """A generate() starts: the number `drop_open_sequences(since=...)` takes if it raises."""
        return self._forward_number

    def _current(self, config) -> ForwardContext | None:
        """The forward of the model of `config` that is running now (its mask was built), if any."""
        entry = self._forwards.get(id(config))
        return entry if isinstance(entry, ForwardContext) and entry.config is config else None

    # ---- a forward's start and end, and its mask: once per forward and mask kind ------
    def on_mask(self, config, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask) -> None:
        require_facts()  # what the capture reads of transformers' internals holds (checked once)
        entry = self._forwards.get(id(config))
        forward = entry if isinstance(entry, ForwardContext) and entry.config is config else None
        _refuse_concurrent(forward)
        if forward is not None and not forward.used:
            forward.add_mask_kind(kv_length, kv_offset)  # another mask kind of the same forward
            return
        if forward is not None:
            self._retire(forward)
        self._end_forward()  # the previous forward is over: back-pressure belongs here, not in a layer
        begun_ids = entry.begun_ids if isinstance(entry, _Started) else self._take_begun_ids()
        caller = model_forward(batch_size, q_length)
        try:
            generation = refuse_unrecordable_generation()
            refuse_rounding_cache(caller.cache)
        except CaptureError:
            self._discard(None, "was refused", config, caller.cache)
            raise
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        try:
            past, check = self._past(config, caller.cache, q_offset, begun_ids is not None)
        except CaptureError:
            self._discard(None, "was refused", config, caller.cache)
            raise
        forward = ForwardContext(
            config, batch_size, q_length, past, mask, caller.input_ids, caller.position_ids, caller.cache
        )
        forward.offset_check, forward.begun_ids, forward.builder = check, begun_ids, caller.module
        forward.unfinished, forward.decode_step, forward.draft = generation
        if caller.images and caller.position_ids is not None and caller.position_ids.dim() == 3:
            self._discard(None, "was refused", config, caller.cache)
            raise CaptureError(
                "qk_sniff: this forward has images and multimodal RoPE (mrope), whose positions repeat "
                "across an image's tokens, so rows could not be keyed by position; record text-only "
                "inputs of this model (no pixel_values)"
            )
        if isinstance(entry, _Started):  # the decoder stack's start was reported: its end will be too
            forward.armed, forward.finished = True, False
        else:
            self._find_end(forward, caller.module, config)
        self._forwards[id(config)] = forward
        forward.add_mask_kind(kv_length, kv_offset)

    @staticmethod
    def _find_end(forward: ForwardContext, module, config) -> None:
        """What will tell the end of a forward whose decoder stack did not report its start (the
        stack found by structure from `module`, the one building the mask)."""
        owner, last_layer = decoder_stack(module, config)
        if owner is None:
            forward.finished = None  # nothing tells this forward's end
        elif watch_forward(owner, last_layer, config) and running_in(owner):
            forward.finished = False  # the first forward: its last layer's return is its end
        else:  # built before the decoder stack runs (generate(), a wrapper): its start adopts it
            forward.state, forward.finished = "pending", False

    def _past(self, config, cache, q_offset, begun: bool) -> tuple[int, OffsetCheck | None]:
        """Tokens already in the cache. A static cache gives a device scalar: reading it would stop the
        host from running ahead, so a forward that continues this cache's sequence takes the
        sequence's end instead, and the sink checks it against the device value with the rows. A
        sequence's first forward (or one after `begin`) reads it."""
        if not isinstance(q_offset, torch.Tensor):
            past = int(q_offset or 0)
            held = cache_length(cache)
            if held is not None and held != past:
                raise CaptureError(
                    f"qk_sniff: a {getattr(config, 'model_type', '')} model built this forward's mask for new tokens "
                    f"at cache position {past}, but its cache holds {held} tokens, so its new keys could not be "
                    "found in the cache (BertLMHeadModel without is_decoder does so; so would a transformers release "
                    "that passes the mask's offsets under other names); not recorded"
                )
            return past, None
        sequence = self._sequences.of(key_of(config, cache), cache) if cache is not None else None
        if sequence is None or begun:
            return host_int(q_offset), None
        # A snapshot (no host read): the cache may advance the tensor in place as the layers run.
        check = OffsetCheck(q_offset.detach().clone(), sequence.end, tuple(sequence.ids))
        if forward_module.builds_on_host(q_offset.device):  # reading it costs nothing: refused in the forward
            check.verify()
            check = None
        return sequence.end, check

    def on_forward_start(self, config, kwargs: dict) -> None:
        """The decoder stack of `config` starts a forward (registration.watch_forward). Whatever an
        earlier forward left is over: discarded unless it ended, never reused. A mask built for this
        forward before it started (passed in as prepared masks) is adopted."""
        entry = self._forwards.get(id(config))
        if isinstance(entry, ForwardContext):
            _refuse_concurrent(entry)
            mask = kwargs.get("attention_mask")
            prepared = mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2)
            unused = entry.state == "pending" and not entry.used
            if unused and prepared:
                entry.adopt(kwargs)
                return
            self._retire(entry)
            if unused and entry.begun_ids is not None:
                # Its mask was prepared for this forward, which did not get it (sdpa drops a mask that
                # is causal only): this forward takes the ids that one took.
                self._forwards[id(config)] = _Started(entry.begun_ids)
                return
        self._forwards[id(config)] = _Started(self._take_begun_ids())

    def on_forward_end(self, config) -> None:
        """The decoder stack of `config` returned: its forward is complete and over."""
        entry = self._forwards.get(id(config))
        if isinstance(entry, ForwardContext) and entry.state == "running":
            entry.finished = True
            self._refuse_unattended(entry)  # as `_retire` does for a model's first forward
            self._hand_off(entry)
            del self._forwards[id(config)]

    def on_layers_done(self, config) -> None:
        """The last decoder layer of a forward whose stack's own end is not reported (its first) returned:
        its end, unless the stack runs a module after it (`on_tail_start`)."""
        entry = self._first_forward(config)
        if entry is not None:
            entry.layers_done = entry.finished = True

    def on_tail_start(self, config) -> None:
        """A module of that stack starts; after the last layer (the final norm) the forward is not over."""
        entry = self._first_forward(config)
        if entry is not None and entry.layers_done:
            entry.finished = False

    def on_tail_end(self, config) -> None:
        """That module returned: the forward's end again, unless another one starts after it."""
        entry = self._first_forward(config)
        if entry is not None and entry.layers_done:
            entry.finished = True

    def _first_forward(self, config) -> ForwardContext | None:
        entry = self._forwards.get(id(config))
        if isinstance(entry, ForwardContext) and entry.state == "running" and not entry.armed:
            return entry
        return None

    def _retire(self, forward: ForwardContext) -> None:
        """A forward is over: its rows go to the sink in one hand-off, unless it stopped part-way."""
        self._refuse_unattended(forward)
        self._discard_if_unfinished(forward)
        self._hand_off(forward)

    def _refuse_unattended(self, forward: ForwardContext) -> None:
        """A forward over which nothing could be recorded, refused once when it is over, instead of a
        session that runs with no rows: a model that builds its mask through qk_sniff but whose layers
        never call qk_sniff's attention (Bloom, MPT, XGLM: their attention does not go through
        transformers' attention interface), or full_attention_only on a model whose every layer has a
        sliding window (Mistral, Phi-3, Starcoder2)."""
        if forward.state != "running" or forward.finished is False or forward.discarded:
            return
        if not forward.used:
            why = (
                f"qk_sniff: a {getattr(forward.config, 'model_type', '')} model built its attention mask through "
                "qk_sniff but none of its layers called qk_sniff's attention with a layer_idx (its attention modules "
                "do not go through transformers' attention interface, or set no self.layer_idx), so nothing could be "
                "recorded; qk-attn records models whose attention modules have a layer_idx and call "
                "ALL_ATTENTION_FUNCTIONS"
            )
        elif forward.skipped_sliding and not forward.recorded:
            why = (
                f"qk_sniff: full_attention_only=True, but every layer of this {getattr(forward.config, 'model_type', '')} "
                "model that ran has a sliding window, so nothing would be recorded; set full_attention_only=False "
                "(QK_SNIFF_FULL_ATTENTION_ONLY=0)"
            )
        else:
            return
        if self._forwards.get(id(forward.config)) is forward:
            del self._forwards[id(forward.config)]
        raise CaptureError(why)

    def _hand_off(self, forward: ForwardContext) -> None:
        """The forward's staged rows to the sink, once (qk_attn.capture.staging)."""
        staging, forward.staging = forward.staging, None
        if staging is None:
            return
        if forward.offset_check is not None:
            staging.check(forward.offset_check)
        if staging.calls or staging.checks:
            self.sink.put_forward(staging)
        staging.handed_off()

    def _discard_if_unfinished(self, forward: ForwardContext) -> None:
        """A forward that stopped part-way (an exception inside the model, caught by the caller, or
        an interrupt in a notebook) recorded some layers only: its sequences are discarded, never
        committed, and cannot be continued."""
        if forward.finished is not False or forward.example_ids is None or forward.discarded:
            return
        self._discard(forward, "stopped before its end (an exception inside the model)")

    def _discard(self, forward: ForwardContext | None, why: str, config=None, cache=None) -> None:
        """Forget the sequences `forward` extends (or, before it has a context, the one of `cache` of the
        model of `config`): their rows are dropped and they are neither committed nor continued."""
        if forward is not None:
            forward.staging = None  # its staged rows are dropped, never handed off
            forward.discarded = True
        ids = set(forward.example_ids or ()) if forward is not None else set()
        if forward is not None:
            config, cache = forward.config, forward.cache
        key = key_of(config, cache)
        for sequence in (getattr(forward, "sequence", None), self._sequences.get(key)):
            if sequence is not None:
                ids |= set(sequence.ids)
        self._sequences.forget(ids, key, cache, why)  # a later forward on its cache is told why
        if not ids:
            return
        self._begun = {i: n for i, n in self._begun.items() if i not in ids}
        self.sink.discard(sorted(ids))
        logger.warning(
            "qk-attn: a forward of example(s) %s %s; their rows are discarded and they are not committed",
            sorted(ids),
            why,
        )

    def _end_forwards(self, caller: str) -> None:
        """Outside every forward (`caller`: commit, flush, table): discard what an unfinished forward
        recorded. Refused while a forward is still running: it would be discarded part-way, or handed
        off with the layers it has not run yet missing."""
        forwards = [f for f in self._forwards.values() if isinstance(f, ForwardContext)]
        for forward in forwards:
            if in_progress(forward):
                where = (
                    "from inside it (a hook or callback)"
                    if forward.thread is threading.current_thread()
                    else f"in thread {forward.thread.name!r}"
                )
                raise RuntimeError(
                    f"qk_attn: {caller}() was called while a forward of this session is running {where}; call it "
                    "between forwards"
                )
        for forward in forwards:
            self._retire(forward)
        self._end_forward()

    def _end_forward(self) -> None:
        """Between forwards: the sink sends what waited on the device (waiting for pool space)."""
        self.sink.end_forward()

    def _start_sequence(self, forward: ForwardContext) -> None:
        """Give this forward its example ids, once (the rules: the class docstring). A
        sequence belongs to its cache: a forward continues the sequence of the cache it extends."""
        if forward.example_ids is not None:
            return
        batch = forward.batch_size
        key = key_of(forward.config, forward.cache)
        sequence = self._sequences.of(key, forward.cache)  # None for a cache that is gone, whose id a new one took
        gone = self._sequences.discarded(key, forward.cache) if sequence is None else None
        if forward.begun_ids is not None:
            ids = forward.begun_ids
            if len(ids) != batch:
                raise ValueError(f"example_ids has {len(ids)} ids but the forward has batch size {batch}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"example_ids {ids} repeats an id: every batch row is its own example")
            again = sorted(set(ids) & self._begun.keys())
            if again:
                raise ValueError(
                    f"example ids {again} were begun already and are not committed yet: an example is begun once "
                    "(later forwards over its cache continue it without begin); use new ids, or commit() first"
                )
            sequence = None
        elif forward.past == 0:
            ids, sequence = list(range(self._next_auto_id, self._next_auto_id + batch)), None
        elif gone is not None:
            raise CaptureError(
                f"qk_sniff: this forward continues the cache of examples {gone[0]}, which were discarded when a "
                f"forward of theirs {gone[1]}; nothing more of them is recorded: call session.begin(ids) before it "
                "to record its tokens under new ids"
            )
        elif sequence is None or sequence.end != forward.past or len(sequence.ids) != batch:
            where = (
                "no sequence of this model was started on this cache"
                if sequence is None
                else (f"the sequence {list(sequence.ids)} of this cache is at position {sequence.end}")
            )
            raise CaptureError(
                f"qk_sniff: this forward continues a cache at position {forward.past} but {where} (a rolled-back or "
                "different cache); call session.begin(ids) before it to name its sequences"
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
        # Once per sequence and commit: the committed ids are copied to be read, O(committed) per forward.
        if sequence is None or sequence.checked != self._commits:
            committed = set(ids) & self._committed_now()
            if committed:
                raise ValueError(
                    f"example ids {sorted(committed)} are already committed in this output; "
                    "rows of a committed example are never added (use new ids)"
                )
        if sequence is None:
            sequence = self._sequences.start(key, ids, forward.cache)
        else:
            forward.continues_from = sequence.next_position
            if forward.decode_step:  # rows of a batched generate() that had finished before this step's tokens
                forward.alive = sequence.unfinished
        sequence.unfinished = forward.unfinished
        sequence.row_moves = row_moves(forward.cache)
        sequence.end = forward.past + forward.num_new
        sequence.checked = self._commits
        forward.sequence = sequence
        forward.example_ids = tuple(ids)
        self._next_auto_id = max(self._next_auto_id, max(ids) + 1)
        self._forward_number += 1
        self._begun.update(dict.fromkeys(ids, self._forward_number))
        self.sink.check_examples(forward.example_ids)  # refused after an earlier forward of theirs

    def _committed_now(self) -> set[int]:
        return self.committed_ids()


def _refuse_concurrent(forward: ForwardContext | None) -> None:
    """A forward of a model that starts while another thread is in the middle of one of the same model
    (the hooks and the session's forward context are per model): refused before it records anything,
    so that the running one is recorded exactly. A forward that raised in a thread still running is
    is over."""
    if forward is not None and forward.thread is not threading.current_thread() and in_progress(forward):
        raise CaptureError(
            f"qk_sniff: this model is in the middle of a forward in thread {forward.thread.name!r}; a session "
            "records one forward of a model at a time, and tells models apart by their config object: give each "
            "thread its own copy of the model with its own config (copy.deepcopy(model); each is recorded exactly), "
            "or run the forwards one after the other"
        )


def integer_ids(example_ids) -> list[int]:
    """Example ids as Python ints; ValueError for one that is not an integer (9.7 is not example 9)."""
    ids = []
    for i in example_ids:
        try:
            ids.append(operator.index(i))
        except TypeError:
            raise ValueError(f"example_ids {list(example_ids)!r} holds {i!r}: example ids are integers") from None
    return ids


def in_progress(forward: ForwardContext) -> bool:
    """Whether `forward` is still running: not ended, and its thread is inside the forward of the module
    that built its mask (the decoder stack, a wrapper, or generate()'s model, which encloses the forwards
    it prepares). One that raised is over."""
    if forward.finished is not False or forward.discarded or forward.builder is None:
        return False
    return forward.thread.is_alive() and running_in(forward.builder, forward.thread)


class _Started:
    """Session._forwards entry: the decoder stack started a forward, no mask yet."""

    def __init__(self, begun_ids: list[int] | None):
        self.begun_ids = begun_ids  # `begin()`'s ids, which this forward took at its start
