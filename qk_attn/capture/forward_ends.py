"""When a forward is over: its end reported (or found for a model's first forward), its staged rows handed
to the sink once, and one that stopped part-way discarded. The base of a recorder's lifecycle: a
forward's start and mask are `ForwardTracker`'s (qk_attn.capture.forwards), its sequences
`SequenceTracker`'s. Forward start and end: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

from qk_attn.capture.calls import settle_interrupted_calls
from qk_attn.capture.forward import ForwardContext
from qk_attn.errors import CaptureError


class ForwardEnds:
    """Each model's current forward (keyed by its config object), from its end to its hand-off, and the
    end of every forward before a commit, flush or table (`_end_forwards`).

    Forgetting the sequences of a forward that is discarded is the sequence side's (`_discard`).
    """

    def __init__(self, sink):
        self.sink = sink
        self._forwards: dict[int, object] = {}  # id(model config) -> its current forward (or _Started)
        self._ended: dict[int, tuple] = {}  # id(model config) -> (serial, thread, ids, cache) of its last ended forward

    def _discard(self, forward: ForwardContext | None, why: str, config=None, cache=None, past: int = 0) -> None:
        raise NotImplementedError

    def on_forward_end(self, config) -> None:
        """The decoder stack of `config` returned: its forward is complete and over."""
        entry = self._forwards.get(id(config))
        # (a forward of the same model in another thread, begun with capture off, ends none of this session's)
        if isinstance(entry, ForwardContext) and entry.state == "running" and entry.thread_id == threading.get_ident():
            entry.finished = True
            self._refuse_unattended(entry)  # as `_retire` does for a model's first forward
            self._hand_off(entry)
            self._let_go(entry)

    def _let_go(self, forward: ForwardContext) -> None:
        """The forward is over: it is no model's current forward any more, so the session keeps nothing of
        its model (the forward holds its decoder stack and cache); `_ended` keeps what `on_call_raised` reads."""
        key = id(forward.config)
        if self._forwards.get(key) is forward:
            del self._forwards[key]
        cache = None if forward.cache is None else weakref.ref(forward.cache)
        self._ended[key] = (forward.serial, forward.thread, forward.example_ids, cache)

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

    def _let_go_other_models(self, config) -> None:
        """A forward of the model of `config` starts in this thread: another model's first forward here (whose end
        only its last modules tell, so it stays current until that model's next forward) that is over is handed
        off and let go now. A model dropped after one forward (`del model`) is then not kept alive by the
        session's context (its decoder stack and cache) past the next forward of any model."""
        for key, entry in list(self._forwards.items()):
            if (
                key != id(config)
                and isinstance(entry, ForwardContext)
                and entry.state == "running"
                and not entry.armed
                and entry.thread_id == threading.get_ident()
                and not entry.in_progress()  # (a model run inside another's forward: that one runs on)
            ):
                self._retire(entry)
                self._let_go(entry)

    def _first_forward(self, config) -> ForwardContext | None:
        entry = self._forwards.get(id(config))
        if (
            isinstance(entry, ForwardContext)
            and entry.state == "running"
            and not entry.armed
            and entry.thread_id == threading.get_ident()
        ):
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
                "do not go through transformers' attention interface, set no self.layer_idx, or hold another config "
                "object than the model that built the mask: a config replaced after loading), so nothing could be "
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
        """The forward's staged rows to the sink, once (qk_attn.capture.staging). A hand-off that raises
        (an interrupt, no memory) may have lost some of them: the forward's sequences are discarded, so
        that none of its examples is committed without its rows."""
        staging, forward.staging = forward.staging, None
        if staging is None:
            return
        try:
            if forward.offset_check is not None:
                staging.check(forward.offset_check)
            if staging.calls or staging.checks or staging.unseen:  # (a forward that streamed has no calls here)
                self.sink.put_forward(staging)
            staging.handed_off()
        except BaseException:
            with contextlib.suppress(Exception):  # the hand-off's own error is the one to raise
                self._discard(forward, "could not hand its rows to the sink")
            raise

    def _discard_if_unfinished(self, forward: ForwardContext) -> None:
        """A forward that stopped part-way (an exception inside the model, caught by the caller, or
        an interrupt in a notebook) recorded some layers only: its sequences are discarded, never
        committed, and cannot be continued."""
        if forward.finished is not False or forward.example_ids is None or forward.discarded:
            return
        self._discard(forward, "stopped before its end (an exception inside the model)")

    def _settle_stopped_forwards(self) -> bool:
        """This thread's forwards that stopped part-way (an exception inside the model) are settled now,
        as the next model call would: their examples are discarded, so their ids may be begun again.
        Whether any was."""
        settle_interrupted_calls()
        stopped = [
            f
            for f in self._forwards.values()
            if isinstance(f, ForwardContext)
            and f.thread is threading.current_thread()
            and f.finished is False
            and not f.discarded
            and not f.in_progress()
        ]
        for forward in stopped:
            self._retire(forward)
        return bool(stopped)

    def _end_forwards(self, caller: str, this_thread: bool = False) -> None:
        """Outside every forward (`caller`: commit, flush, table): discard what an unfinished forward
        recorded. Refused while a forward is still running: it would be discarded part-way, or handed
        off with the layers it has not run yet missing. `this_thread`: only this thread's forwards (a
        generate() of it raised: another thread may be inside a forward of other examples)."""
        settle_interrupted_calls()  # a model call an interrupt stopped after its stack returned: not committed
        forwards = [f for f in self._forwards.values() if isinstance(f, ForwardContext)]
        if this_thread:
            forwards = [f for f in forwards if f.thread is threading.current_thread()]
        for forward in forwards:
            if forward.in_progress():
                where = (
                    "from inside it (a hook or callback)"
                    if forward.thread is threading.current_thread()
                    else f"in thread {forward.thread.name!r}"
                )
                raise RuntimeError(
                    f"qk_attn: {caller}() was called while a forward of this session is running {where}; call it "
                    "between forwards"
                )
        failure = None
        for forward in forwards:  # each: a hand-off that raises discards its own forward only (`_hand_off`)
            try:
                self._retire(forward)
            except BaseException as error:  # noqa: BLE001 - raised below, once every forward is over
                failure = failure or error
            self._let_go(forward)  # (a model's first forward, whose end its stack does not report)
        self._end_forward()
        if failure is not None:
            raise failure

    def discard_running(self, why: str) -> None:
        """Discard the forwards other threads are inside now (the interpreter exits while a daemon thread
        runs one; `why` names the thread as {thread}): their sequences are neither committed nor continued,
        and what the thread does next in them records nothing. Then the session can commit and close."""
        for forward in [f for f in self._forwards.values() if isinstance(f, ForwardContext)]:
            if forward.thread is not threading.current_thread() and forward.in_progress():
                self._discard(forward, why.format(thread=repr(forward.thread.name)))

    def _end_forward(self) -> None:
        """Between forwards: the sink sends what waited on the device (waiting for pool space)."""
        self.sink.end_forward()
