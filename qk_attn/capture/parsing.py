"""`ast.parse` behind one lock.

CPython 3.11's parser counts its recursion depth in state that threads share, so two threads
parsing at once can fail with "SystemError: AST constructor recursion depth mismatch". qk-attn
reads source files (modeling files, transformers' functions) in one-time checks that run inside
forwards, and two threads may start their first forwards together.
"""

from __future__ import annotations

import ast
import threading

_LOCK = threading.Lock()


def parse(source: str, mode: str = "exec") -> ast.AST:
    with _LOCK:
        return ast.parse(source, mode=mode)
