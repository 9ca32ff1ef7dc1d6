"""Forwards that run under a torch transform or tracer, whose tensors capture cannot read: refused in one line at
their mask and at their decoder stack's start, before anything of them is noted (or the once-per-process facts
check runs inside them)."""

from __future__ import annotations

import torch

from qk_attn.errors import CaptureError


def refuse_transformed_forward() -> None:
    what = active_transform()
    if what is not None:
        raise CaptureError(
            f"qk_sniff: this forward runs under {what}, whose tensors capture cannot read as a forward's rows; "
            "not recorded: run it outside the session (capture off: the model runs as its backend would), or "
            "record a plain forward"
        )


def active_transform() -> str | None:
    """What the running code is transformed or traced by (None: nothing); a few C calls."""
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    if torch.compiler.is_exporting():
        return "torch.export"
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is not None:  # (torch.autograd.forward_ad's dual tensors are plain ones: recorded)
        return f"a torch.func transform ({interpreter.key().name.lower()})"
    return None
