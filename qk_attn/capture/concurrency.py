"""One forward of a model at a time: a forward that starts while another thread is inside one of the same model
(told apart by its config object), in any session, is refused before it records anything, under a lock per
model so that two threads starting at once cannot both pass the check."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

from qk_attn.errors import CaptureError


@contextlib.contextmanager
def starting(session, config):
    """Around a forward's start in `session` (its mask, its decoder stack's start: before any layer): refused
    into a closed session, or while another thread is inside a forward of the same model; under the
    model's lock, so that two threads starting one at once cannot both pass the check."""
    if session.closed:
        from qk_attn.capture.active import refuse_closed

        refuse_closed(session)
    with _model_lock(config):
        _refuse_concurrent_elsewhere(session, config)
        yield


def _refuse_concurrent_elsewhere(session, config) -> None:
    """A forward of the model of `config` is refused while another thread is inside one of the same
    model that another session records (the decoder stack's hooks and a first forward's end are the
    model's, not a session's); within `session`, `ForwardTracker` refuses it the same way."""
    from qk_attn.capture.active import open_sessions

    for other in open_sessions():
        if other is not session:
            refuse_concurrent(other._current(config))


_model_locks: dict[int, threading.RLock] = {}  # id(model config) -> its lock, while the config lives
_model_locks_guard = threading.Lock()


def _model_lock(config) -> threading.RLock:
    """The lock under which a forward of the model of `config` is checked against other threads' and
    gets its context, so that two threads starting one at once cannot both pass the check."""
    lock = _model_locks.get(id(config))
    if lock is None:
        with _model_locks_guard:
            lock = _model_locks.get(id(config))
            if lock is None:
                lock = _model_locks[id(config)] = threading.RLock()
                if config is not None:  # its id may name another config once it is gone
                    weakref.finalize(config, _model_locks.pop, id(config), None)
    return lock


def _after_fork_in_child() -> None:
    """A thread of the parent may have held a model's lock at the fork: the child's forwards start afresh."""
    global _model_locks_guard
    _model_locks_guard = threading.Lock()
    _model_locks.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def refuse_concurrent(forward) -> None:
    """A forward of a model that starts while another thread is in the middle of `forward`, one of the
    same model (None: none), in any session: refused before it records anything, so that the running one
    is recorded exactly. A forward that raised in a thread still running is over. In the same thread, one
    that starts inside it (from a hook or callback) is refused too: both would be keyed by one config."""
    if forward is not None and forward.encloses_this_call():
        raise CaptureError(
            f"qk_sniff: a forward of this {getattr(forward.config, 'model_type', '')} model started inside another "
            "forward of it still running (called from a hook or callback inside that forward, by the same model or "
            "one sharing its config object); qk-attn records one forward of a model at a time and tells models "
            "apart by their config object: run the inner forward after the outer one returns, or give the inner "
            "model its own config (copy.deepcopy(model))"
        )
    if forward is None or forward.thread is threading.current_thread() or not forward.in_progress():
        return
    raise CaptureError(
        f"qk_sniff: this model is in the middle of a forward in thread {forward.thread.name!r}; qk-attn "
        "records one forward of a model at a time (in one session or several), and tells models apart by "
        "their config object: give each thread its own copy of the model with its own config "
        "(copy.deepcopy(model); each is recorded exactly, each in its own session and output when the session "
        "writes a folder, which holds one model's dataset), or run the forwards one after the other"
    )
