"""Ctrl-C held back across a few statements that must happen together or not at all.

The sink queues a commit for the saver and lists its examples as committed in one such block
(qk_attn.storage.sink.ParquetSink.commit): a KeyboardInterrupt between the two would leave examples
queued for the saver but missing from the capturing thread's list.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT) handled after the block, not inside it: its Python handler is swapped for one that
    notes it (signal handlers run in the main thread only: elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler not installed from Python, which could not be put back)
        return
    noted: list = []
    previous = signal.signal(signal.SIGINT, lambda *received: noted.append(received))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if noted and callable(previous):
            previous(*noted[0])  # Python's default handler raises KeyboardInterrupt here
        elif noted and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)
