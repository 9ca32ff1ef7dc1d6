"""A model call around a decoder stack (the causal LM, a wrapper of it: what the caller calls), watched from
its second call on: a call that raises after its stack returned (in its loss, its head, a hook) tells the
session, which does not commit what that forward recorded (`SequenceTracker.on_call_raised`). qk-attn's end
hooks run after the user's own forward hooks on the same module (`run_last`), and a call an interrupt
stopped (a BaseException, for which torch runs no end hook) is found at the next call or commit."""

from __future__ import annotations

import functools
import sys
import threading
import weakref

import torch

from qk_attn.capture.forward import serial_mark

_calls = threading.local()  # .running: [(module, config, serial mark, exception being handled at its start,
# the call's frame in torch's Module._call_impl: on the stack while the call runs)]
_CALL_IMPL = getattr(torch.nn.Module._call_impl, "__code__", None)
# -> the ids of its start and end hooks
_watched_calls: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, int]] = weakref.WeakKeyDictionary()


def watch_call(outer: torch.nn.Module | None, config) -> None:
    """Have every call of `outer` (the model the caller calls around the decoder stack of `config`) that raises
    after the stack returned (in its loss, its head, a hook) tell the active session, which then does not
    commit what that forward recorded (`on_call_raised`). From `outer`'s next call on: torch fixes a call's
    hooks when it starts. Idempotent."""
    if outer is None:
        return
    if outer in _watched_calls:  # hooks cleared by another tool, either of the two: registered again, both
        started_id, ended_id = _watched_calls[outer]
        if started_id in outer._forward_pre_hooks and ended_id in outer._forward_hooks:
            return
        outer._forward_pre_hooks.pop(started_id, None)
        outer._forward_hooks.pop(ended_id, None)
    ended = outer.register_forward_hook(functools.partial(_call_ended, config), always_call=True)
    started = outer.register_forward_pre_hook(functools.partial(_call_started, config, ended.id))
    _watched_calls[outer] = (started.id, ended.id)


@torch.compiler.disable
def _call_started(config, ended_id: int, module, _args) -> None:
    running = _calls.__dict__.setdefault("running", [])
    if running:
        settle_interrupted_calls()
    # torch runs an always_call hook that already ran only once: one that ran before a user's hook raised would
    # miss it.
    run_last(module, ended_id)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _CALL_IMPL:
        frame = frame.f_back
    running.append((module, config, serial_mark(), sys.exc_info()[1], frame))


@torch.compiler.disable
def _call_ended(config, module, _args, _output) -> None:
    """Run on the call's return and, `always_call`, when it raised: then the exception being handled is
    a new one (torch calls it from its `except`), not the one that was being handled when it started."""
    from qk_attn.capture.active import existing_session

    running = getattr(_calls, "running", None)
    index = next((i for i in range(len(running or ()) - 1, -1, -1) if running[i][0] is module), None)
    if index is None:
        return
    _, _, mark, handled, _ = running.pop(index)
    stopped, running[index:] = running[index:], []  # calls inside it that an interrupt left unfinished
    session = existing_session()
    for _, inner, inner_mark, _, _ in reversed(stopped):  # (torch runs no always_call hook on an interrupt)
        if session is not None and not session.closed:
            session.on_call_raised(inner, inner_mark)
    raised = sys.exc_info()[1]
    if raised is not None and raised is not handled and session is not None and not session.closed:
        session.on_call_raised(config, mark)


def run_last(module: torch.nn.Module, hook_id: int) -> None:
    """Move forward hook `hook_id` of `module` after its other forward hooks, those registered later included
    (torch reads them after the forward, in order): qk-attn's end hooks see what the user's hooks raise."""
    hooks = module._forward_hooks
    if hook_id in hooks and next(reversed(hooks)) != hook_id:
        hooks.move_to_end(hook_id)


def _on_stack(target) -> bool:
    frame = sys._getframe(2)
    while frame is not None and frame is not target:
        frame = frame.f_back
    return frame is not None


def settle_interrupted_calls() -> None:
    """Calls of this thread that an interrupt (a BaseException, for which torch runs no always_call hook)
    left unfinished: their forwards are not committed either (`on_call_raised`). Read at a watched call's
    start and before a commit, flush or close (`ForwardTracker._end_forwards`)."""
    from qk_attn.capture.active import existing_session

    running = getattr(_calls, "running", None)
    while running and running[-1][4] is not None and not _on_stack(running[-1][4]):
        _, config, mark, _, _ = running.pop()
        session = existing_session()
        if session is not None and not session.closed:
            session.on_call_raised(config, mark)
