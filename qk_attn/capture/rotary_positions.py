"""Rows are keyed by the `position_ids` local of the model forward that builds the mask
(frames.model_forward): the positions its rotary embedding uses, as long as it hands that local, as
it is, to `self.rotary_emb`. Checked on the seed base models by fact `model_forward_locals`, and at
run time, once per code object, on the forward that builds the mask (`refuse_other_rotary_positions`)
and on the decoder stack's own forward (`refuse_stack_rotary_positions`: generate()'s input
preparation or a multimodal wrapper may build the mask and hand it to the stack): a model (or a
release) that rotates by other positions is refused, never keyed by the wrong ones."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from qk_attn.capture.parsing import parse
from qk_attn.errors import CaptureError


def rotary_calls(source: str) -> list[ast.Call]:
    """The `self.rotary_emb(...)` calls in `source`."""
    tree = parse(textwrap.dedent(source))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "self.rotary_emb"]


def hands_position_ids(call: ast.Call) -> bool:
    """Whether the call is given the `position_ids` local as it is."""
    return any(ast.unparse(a) == "position_ids" for a in (*call.args, *(k.value for k in call.keywords)))


def refuse_other_rotary_positions(code) -> None:
    """CaptureError (one line) when the mask-building forward of `code` calls `self.rotary_emb` but
    never with its `position_ids` local as it is. A forward that calls none (RoPE in the layers, from
    the position_ids they are given: attention.check_position_source; no RoPE) passes."""
    if code is not None and (why := _refusal(code)) is not None:
        raise CaptureError(why)


def refuse_stack_rotary_positions(stack) -> None:
    """The same for the forward of the decoder stack `stack` (its class's, under any decorators)."""
    refuse_other_rotary_positions(_forward_code(type(stack).forward))


@functools.cache
def _forward_code(forward):
    return getattr(inspect.unwrap(forward), "__code__", None)


@functools.cache
def _refusal(code) -> str | None:
    try:
        calls = rotary_calls(inspect.getsource(code))
    except (OSError, TypeError, SyntaxError):  # no source to read (compiled from a string): not checked
        return None
    if not calls or any(hands_position_ids(call) for call in calls):
        return None
    return (
        f"qk_sniff: {code.co_qualname} ({code.co_filename.rsplit('/', 1)[-1]}) calls self.rotary_emb with "
        f"{ast.unparse(calls[0])[:80]}, not with its position_ids, which qk-attn keys rows by: its rows could be "
        "keyed by other positions than RoPE used; not recorded"
    )
