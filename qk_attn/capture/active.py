"""Which recorder an attention call records into: this thread's innermost session, else the
process's latest one, else the default session configured by QK_SNIFF_* (None: capture off).

A leaf of the capture layer, so that the hooks find the recorder without importing the public API;
`qk_attn.session` opens and closes sessions here and says how a default session is made.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Callable

from qk_attn.config import SniffConfig

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
    opened_now = _opened
    return opened_now[-1] if opened_now else None


def current_config() -> SniffConfig:
    active = _active()
    return active.config if active is not None else _env_config


def current_session():
    """This thread's innermost `session()`, else the process's latest one, else the
    env-configured default (None when capture is off)."""
    global _default, _exit_registered
    active = _active()
    if active is not None:
        return active
    if _env_config.output is None:
        return None
    with _lock:
        if _default is None:
            _default = make_default(_env_config)
            if not _exit_registered:
                _exit_registered = True
                atexit.register(_close_default_at_exit)
    return _default


def _close_default_at_exit() -> None:
    """Interpreter exit: the default session commits and closes. When an uncaught exception ends the
    process (sys.last_value), it may have stopped an example between two of its forwards (prefill
    chunks, generate() steps): the sequences a later forward could still continue are not committed."""
    if _default is None:
        return
    try:
        if getattr(sys, "last_value", None) is not None:
            _default.drop_open_sequences("the process ended with an uncaught exception")
    finally:
        _default.close()


def existing_session():
    """`current_session()` without making the env-configured default (None if there is none yet)."""
    active = _active()
    return active if active is not None else _default


def default_session():
    """The env-configured default session, if one was made."""
    return _default


def reload_env() -> SniffConfig:
    """Re-read QK_SNIFF_* (closing a running default session first)."""
    global _env_config, _default
    if _default is not None:
        _default.close()
        _default = None
    _env_config = SniffConfig.from_env()
    return _env_config
