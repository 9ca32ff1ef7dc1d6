"""Triton for the kernel modules, or a stand-in where it is not installed, and a fix of the interpreter.

`HAS_TRITON` says which. Without Triton the stand-in has just enough of `triton` and `tl` for the
kernel modules to import (their `@triton.jit` functions stay plain Python); launching raises
(`select_gather.gather_rows_triton`), and `qk_attn.capture.gather` takes the torch path.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch path (qk_attn.capture.gather) works without Triton

    class _NoTriton:
        """Just enough of `triton`/`tl` for the kernel modules to import; launching raises."""

        constexpr = staticmethod(lambda value=None: value)

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    HAS_TRITON = False


def _interpreter_index_on_numpy_2_5():
    """Triton's interpreter before 3.9 (3.6 seen) reads a scalar's loop bound with `int()` on a
    one-element array, which NumPy 2.5 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"), so every `range(runtime size)` in the kernel fails under TRITON_INTERPRET=1.
    Squeeze first, as Triton 3.9 does; the same value on every version."""
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_interpreter_index_on_numpy_2_5()
