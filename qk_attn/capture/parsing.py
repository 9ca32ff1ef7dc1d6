"""`ast.parse` for the one-time checks of source files, safe beside other threads.

CPython 3.11 counts the depth of its AST constructor in state that threads share, so a parse that
runs while another thread builds an AST (a parse of ours, or `inspect.signature` of a builtin in
the other thread's forward) can fail with "SystemError: AST constructor recursion depth mismatch".
qk-attn parses inside forwards (modeling files, transformers' functions and classes, whose source
`inspect` finds by parsing their module: checked once), and two threads may start their first
forwards together. Its own parses take one lock; a parse that lost to another thread's anyway is
run again (it reads the same text: only the counter was wrong).
"""

from __future__ import annotations

import ast
import inspect
import threading

_LOCK = threading.Lock()
TRIES = 5


def parse(source: str, mode: str = "exec") -> ast.AST:
    return _retried(ast.parse, source, mode=mode)


def class_source(cls: type) -> str:
    """`inspect.getsource(cls)`, which parses the class's module to find it."""
    return _retried(inspect.getsource, cls)


def _retried(run, *args, **kwargs):
    for attempt in range(TRIES):
        with _LOCK:
            try:
                return run(*args, **kwargs)
            except SystemError as error:
                if "recursion depth mismatch" not in str(error) or attempt == TRIES - 1:
                    raise
    raise AssertionError("unreachable")
