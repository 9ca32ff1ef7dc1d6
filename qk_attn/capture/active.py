"""Which recorder an attention call records into: this thread's innermost session, else the
process's latest one, else the default session configured by QK_SNIFF_* (None: capture off).

A leaf of the capture layer, so that the hooks find the recorder without importing the public API;
`qk_attn.session` opens and closes sessions here and says how a default session is made.

A process forked while sessions are open (os.fork, a multiprocessing or DataLoader worker) inherits
copies of them, whose saver thread, lock and folder are the parent's: in the child they are inert.
Closing one there (leaving its with-block, the exit handler) does nothing, and a forward that would
record into one is refused (`_refuse_forked`).

A generate() records into one session from its first step to its last: the one its thread records
into when it starts (or, when there is none yet, where its first forward records). A thread that
opened no session keeps that one for the whole call, though another thread opens a newer one mid-way
(`_Generation`). A session closed while such a generate() runs (close(), its with-block, reload_env())
discards the examples it was extending rather than commit them part-way
(`SequenceTracker.drop_open_sequences(generations=...)`), and the generate()'s next forward is refused
(`refuse_closed`), as is any forward that would record into a closed session.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from collections.abc import Callable

from qk_attn.config import SniffConfig
from qk_attn.errors import CaptureError

# A thread that opened sessions uses its own innermost one. A thread that opened none (a
# worker running the model, the streamer pattern of generate()) uses the most recently
# opened session of the process, so it records into the session its caller opened.
_opened: list = []  # every open session() of the process, in opening order
_local = threading.local()  # .stack: the sessions this thread opened
_stacks: dict[int, list] = {}  # id(open session) -> the stack of the thread that opened it
_lock = threading.Lock()
_env_config: SniffConfig = SniffConfig.from_env()
_default = None  # the env-configured default session, made on first use
_exit_registered = False
make_default: Callable[[SniffConfig], object] | None = None  # set by qk_attn.session
check_env_output: Callable[[SniffConfig], None] | None = None  # set by qk_attn.session: QK_SNIFF_OUTPUT's folder
# Sessions (held, so that their ids are never reused) that were open in the process this one was
# forked from, or in one before it: their copies here write nothing.
_inherited: list = []
_reloaded: weakref.WeakSet = weakref.WeakSet()  # default sessions that reload_env() closed


class _Generation:
    """A generate() call running in a thread: the session it records into (`settled`: known; a generate()
    that starts with none takes what its first forward finds, None when capture is off), that session's
    `generation_started()` number when it started recording there, and the ranges of those numbers of
    the generate() calls nested in it (a guide model's, from a logits processor) that returned."""

    __slots__ = ("session", "settled", "since", "thread", "inner_done")

    def __init__(self, session) -> None:
        self.session, self.settled = session, session is not None
        self.since = session.generation_started() if session is not None else 0
        self.thread = threading.current_thread()
        self.inner_done: list[tuple[int, int]] = []


# thread -> the generate() calls it is inside now, outermost first (its _local.generations list)
_generations: dict[threading.Thread, list[_Generation]] = {}


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    _inherited.extend(s for s in (*_opened, _default) if s is not None and not inherited(s))


os.register_at_fork(after_in_child=_after_fork_in_child)


def inherited(session) -> bool:
    """Whether `session` was opened in another process, of which this one is a fork (its copy is inert)."""
    return any(session is s for s in _inherited)


def _refuse_forked(session) -> None:
    what = (
        f"the default session of QK_SNIFF_OUTPUT={session.config.output}"
        if session is _default
        else "the session this forward would record into"
    )
    raise CaptureError(
        f"qk_sniff: this process (pid {os.getpid()}) was forked from the one that opened {what}, whose saver, "
        "lock and files stay that process's; nothing is recorded here: open a session in the child (with "
        "its own output), or run the model in the parent"
    )


def opened(session) -> None:
    """`session` is this thread's innermost from now on, and the process's latest."""
    if not hasattr(_local, "stack"):
        _local.stack = []
    with _lock:
        _local.stack.append(session)
        _opened.append(session)
        _stacks[id(session)] = _local.stack


def closed(session) -> None:
    """`session` ends, also when another thread than the one that opened it ends it."""
    with _lock:
        _opened.remove(session)
        _stacks.pop(id(session)).remove(session)


def _active():
    own = getattr(_local, "stack", None)
    if own:
        return own[-1]
    generations = getattr(_local, "generations", None)
    if generations and generations[-1].settled:  # a generate() keeps the session it started in (or none)
        return generations[-1].session
    opened_now = _opened
    return opened_now[-1] if opened_now else None


def current_config() -> SniffConfig:
    active = _active()
    return active.config if active is not None else _env_config


def current_session():
    """This thread's innermost `session()`, else the process's latest one, else the
    env-configured default (None when capture is off)."""
    global _default, _exit_registered
    own = getattr(_local, "stack", None)
    if own:  # (nothing to settle: a session this thread opened wins inside a generate() too)
        if _inherited and inherited(own[-1]):
            _refuse_forked(own[-1])
        return own[-1]
    active = _active()
    if active is not None:
        if _inherited and inherited(active):
            _refuse_forked(active)
        found = active
    elif _env_config.output is None:
        _settle(None)  # capture is off for a generate() whose first forward this is, to its end
        return None
    else:
        if _inherited and _default is not None and inherited(_default):
            _refuse_forked(_default)
        with _lock:
            if _default is None:
                _default = make_default(_env_config)
                if not _exit_registered:
                    _exit_registered = True
                    atexit.register(_close_default_at_exit)
        found = _default
    _settle(found)
    return found


def note_uncaptured_forward(config, frame) -> None:
    """A forward of the model of `config` builds its mask with capture off, in the module forward whose frame is
    `frame`: should another thread open a session before it ends, its attention calls are none of that
    session's (`started_uncaptured`). Kept by the frame's id and code, not the frame (its locals would live on)."""
    marks = getattr(_local, "uncaptured", None)
    if marks is None:
        marks = _local.uncaptured = {}
    marks[id(config)] = (id(frame), frame.f_code)


def started_uncaptured(config) -> bool:
    """Whether this thread runs, right now, a forward of `config`'s model that built its mask with capture off."""
    mark = getattr(_local, "uncaptured", {}).get(id(config))
    if mark is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if id(frame) == mark[0] and frame.f_code is mark[1]:
            return True
        frame = frame.f_back
    return False


def _settle(found) -> None:
    """A generate() that found no session when it started keeps what its first forward finds (None:
    nothing is recorded of it, though another thread opens a session mid-way), unless it is a session
    this thread opened (inside the generate(): a callback's, which ends before the next step)."""
    generations = getattr(_local, "generations", None)
    if generations and not generations[-1].settled and not getattr(_local, "stack", None):
        for generation in generations:
            if not generation.settled:
                generation.session, generation.settled = found, True
                generation.since = found.generation_started() if found is not None else 0


def _close_default_at_exit() -> None:
    """Interpreter exit: the default session commits and closes (in the process that made it: a forked
    child's copy is inert)."""
    if _default is None or inherited(_default):
        return
    try:
        settle_at_exit(_default)
    finally:
        _default.close()


def settle_at_exit(session) -> None:
    """What a session still open at interpreter exit drops before it closes (the default session, or a
    `session()` entered by hand and never exited). A daemon thread may still be inside a forward: that
    forward's examples (and the sequences it extends) are discarded with one warning, and the examples
    whose forwards ended are committed. When an uncaught exception ends the process (sys.last_value), it
    may have stopped an example between two of its forwards (prefill chunks, generate() steps): the
    sequences a later forward could still continue are not committed."""
    session.discard_running("was still running in thread {thread} when the interpreter exited")
    # a thread still alive may be between two forwards of its sequence (prefill chunks, decode steps)
    session.drop_open_sequences("the interpreter exited while their thread ran", other_threads=True)
    if getattr(sys, "last_value", None) is not None:
        session.drop_open_sequences("the process ended with an uncaught exception")


def generation_starts() -> _Generation:
    """A generate() starts in this thread (`hooks.watch_generate`): it records into the session this
    thread records into now (not made here: a model without qk_sniff must not start one), or, if
    there is none yet, into the one its first forward finds. Pair with `generation_ends`."""
    generation = _Generation(existing_session())
    if not hasattr(_local, "generations"):
        _local.generations = []
    with _lock:
        _local.generations.append(generation)
        _generations[generation.thread] = _local.generations
    return generation


def generation_ends(generation: _Generation, returned: bool) -> None:
    """The generate() ends; one nested in another of this thread recording into the same session tells
    it which examples it made if it `returned`, and those of the generate() calls that returned inside it
    (complete: not the outer one's to drop if that one raises)."""
    with _lock:
        running = _local.generations
        running.remove(generation)
        if not running:
            _generations.pop(generation.thread, None)
    session = generation.session
    if running and session is not None and running[-1].session is session:
        outer = running[-1]
        outer.inner_done.extend(generation.inner_done)  # complete, also when this one raised
        if returned:
            outer.inner_done.append((generation.since, session.generation_started()))


def running_generations(session) -> list[tuple[threading.Thread, int]]:
    """(thread, since) of each generate() that records into `session` and runs now, in any thread (a
    thread that is gone runs none): the examples their thread extended since are still being extended."""
    with _lock:
        running = [g for calls in _generations.values() for g in calls]
    return [(g.thread, g.since) for g in running if g.session is session and g.thread.is_alive()]


def refuse_closed(session) -> None:
    """A forward (its mask, or its decoder stack's start: before any layer) that would record into
    `session`, which was closed: refused, never recorded into a closed session. Inside a generate() that
    was recording into it, the examples it was extending were discarded when it closed."""
    by = " by qk_attn.reload_env()" if session in _reloaded else ""
    generations = getattr(_local, "generations", None) or ()
    if any(g.session is session for g in generations):
        then = (
            "call reload_env() between generate() calls"
            if by
            else "keep the session open until generate() returns (join its thread before leaving the with block)"
        )
        raise CaptureError(
            f"qk_sniff: the session this generate() records into was closed{by} while it ran; the examples it was "
            f"extending were discarded, never committed part-way, and nothing more is recorded into it: {then}"
        )
    raise CaptureError(
        f"qk_sniff: this forward would record into a session that was closed{by}; nothing is recorded into a "
        "closed session: run the forward before close() (or before leaving its with block), or open a new session()"
    )


def open_sessions() -> list:
    """The sessions open in this process now: every open session() and the default one (copies inherited
    from a parent process excluded)."""
    with _lock:
        found = [*_opened, *([_default] if _default is not None else [])]
    return [s for s in found if not inherited(s)]


def existing_session():
    """`current_session()` without making the env-configured default (None if there is none yet, or if
    it is a copy inherited from the process this one was forked from)."""
    active = _active()
    found = active if active is not None else _default
    return None if found is None or inherited(found) else found


def env_config() -> SniffConfig:
    """The QK_SNIFF_* settings read at import (or at the latest `reload_env`)."""
    return _env_config


def default_session():
    """The env-configured default session, if this process made one (a forked child's copy: None)."""
    return None if _default is None or inherited(_default) else _default


def reload_env() -> SniffConfig:
    """Re-read QK_SNIFF_*, then close a running default session (a forked child's copy is dropped unclosed).
    A bad value raises ConfigError first and leaves the running default session open and in force."""
    global _env_config, _default
    config = SniffConfig.from_env()
    if check_env_output is not None:
        check_env_output(config)
    if _default is not None:
        if not inherited(_default):
            _reloaded.add(_default)  # a generate() still recording into it is told why at its next forward
            _default.close()
        _default = None
    _env_config = config
    return _env_config
