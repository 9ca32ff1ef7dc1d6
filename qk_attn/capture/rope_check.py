"""Which attention forwards rope="pre" can undo exactly: read once per class (and forward) from its source.

`rope.invert_rope` undoes one shape of rotation, the one most transformers decoders share:

    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    ...  # query_states / key_states changed only by the cache update and Ministral 3's query scale
    attention_interface(self, query_states, key_states, value_states, ...)

The rotation may sit under one `if` that tests only the module's own attributes (SmolLM3's
`self.use_rope`, Cohere 2's `self.sliding_window is not None`, Falcon's `not self.config.alibi`):
that test is evaluated per layer, and a layer where it is false applies no RoPE, so its vectors
are recorded as they are. Every other shape is refused (`Rotation.refusal` says what was seen):
no `apply_rotary_pos_emb` call (another rotary function, or none), several rotary calls (q and k
rotated apart, Gemma 3n/4; a branch per layout, DeepSeek-V3), rotation of split parts joined
after it (Phi, StableLM, Persimmon, multi-head latent attention), a q/k norm or any other change
after the rotation (HunYuan, NanoChat), a condition on something else than the module.

No family names: the verdict follows from the forward's syntax tree alone. This module holds the
verdict (`Rotation`, `rotation`), its per-layer test (`rotates`), the refusal line and the rules
(`_read`); the pieces of code the rules look for are read by `rope_syntax`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from collections.abc import Callable
from types import CodeType
from typing import NamedTuple

from qk_attn.capture.parsing import parse
from qk_attn.capture.rope_syntax import (
    APPLY,
    GIVEN,
    QUERY_SCALE,
    attention_calls,
    is_cache_update,
    is_query_scale,
    is_rotary,
    module_test,
    name_of,
    own_nodes,
    snippet,
    statement_of,
    touched,
)
from qk_attn.errors import CaptureError

SHAPE = f"`q, k = {APPLY}(q, k, cos, sin)` on the vectors it hands to attention"


class Rotation(NamedTuple):
    """What one attention class's forward does with RoPE, as far as rope="pre" is concerned."""

    refusal: str | None  # what its forward does that rope="pre" cannot undo ("its forward ..."); None: it can
    condition: CodeType | None = None  # the `if` test the rotation runs under (over self, position_embeddings)
    reads_given: bool = False  # the test reads the forward's position_embeddings (`is not None`)
    forward: CodeType | None = None  # the forward's code, to find its frame
    apply: Callable | None = None  # the apply_rotary_pos_emb the forward calls (its own module's)
    query_scale: Callable | None = None  # get_llama_4_attn_scale when the forward scales q after RoPE
    split: bool = False  # refused for rotating parts of the vectors it attends with (cos/sin cover those parts)
    forward_globals: dict | None = None  # the forward's module namespace (`current_apply`)


def rotation(cls: type) -> Rotation:
    """The verdict for an attention class: one parse per class and forward function (a forward replaced
    later, by a patch or a plugin, is read again rather than judged by its predecessor's verdict)."""
    return _verdict(cls, getattr(cls, "forward", None))


@functools.cache
def _verdict(cls: type, _forward) -> Rotation:
    try:
        forward = inspect.unwrap(cls.forward)
        tree = parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError) as error:
        return Rotation(f"has no source to read ({type(error).__name__})")
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        return Rotation("is not a plain function")
    return _read(fn, forward)


rotation.cache_clear = _verdict.cache_clear  # (tests forget the verdicts)


def current_apply(verdict: Rotation):
    """The apply_rotary_pos_emb the forward calls now: its module's global, read at each call (a module
    patched after the verdict was read calls the new one)."""
    return verdict.forward_globals.get(APPLY, verdict.apply) if verdict.forward_globals else verdict.apply


def rotates(module, rotary) -> bool:
    """False for a layer whose forward applied no RoPE in this call: the test its rotation runs under
    is false (SmolLM3's NoPE layers, Cohere 2's full-attention layers, Falcon with ALiBi, hybrids whose
    attention layers get no position_embeddings). True otherwise, also for a refused class (its
    refusal is raised where the rows are taken, with the dimensions it rotates). `rotary`: the
    position_embeddings the forward held, as `attention.applied_rotary` found them (None: none found)."""
    verdict = rotation(type(module))
    if verdict.refusal is not None or verdict.condition is None:
        return True
    if verdict.reads_given and rotary is None and not _given_none(module, verdict.forward):
        return True  # not found rather than None: rope.pre_rope_rows refuses, naming that
    try:
        return bool(eval(verdict.condition, {"__builtins__": {}}, {"self": module, "position_embeddings": rotary}))
    except Exception as error:  # the forward itself would have failed the same way
        raise CaptureError(
            f"qk_sniff: rope='pre': {type(module).__name__}: the test its forward rotates under raised "
            f"{type(error).__name__}: {' '.join(str(error).split())}; use rope='post'"
        ) from error


def _given_none(module, code: CodeType, max_depth: int = 32) -> bool:
    """The module's forward (a caller of ours) holds position_embeddings=None."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return False
        if frame.f_code is code and frame.f_locals.get("self") is module:
            return GIVEN in frame.f_locals and frame.f_locals[GIVEN] is None
    return False


def refusal_message(module, kind: str, rotated: int | None, head_dim: int) -> str:
    """One line: the class, what its forward does, what rope="pre" undoes, the way out."""
    verdict = rotation(type(module))
    dims = ":"
    if verdict.split and rotated and rotated < head_dim:
        dims = f" rotates {rotated} of the {head_dim} dimensions of each {kind} head;"
    return (
        f"qk_sniff: rope='pre': {type(module).__name__}{dims} its forward {verdict.refusal}; "
        f"rope='pre' undoes only {SHAPE}, so qk-attn cannot take this rotation back exactly; use rope='post'"
    )


# ---- the rules, on one forward's tree (the pieces: rope_syntax) -----------------------------


def _read(fn, forward) -> Rotation:
    """The rules, in order: the first one the forward breaks is its refusal; none broken, what
    `rotates` and rope.pre_rope_rows need (the test, the forward's code, its apply and query scale)."""
    params = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)]
    self_name = params[0] if params else "self"
    calls = [node for node in own_nodes(fn) if is_rotary(node)]
    if not calls:
        return Rotation(f"calls no {APPLY} (it applies RoPE some other way, or not at all)")
    attention = attention_calls(fn, self_name)
    if not attention:
        return Rotation("hands q and k to no attention function call of the form `f(self, query, key, value, ...)`")
    handed = {tuple(snippet(a) for a in found.args[1:3]) for found in attention}
    if len(handed) > 1:
        return Rotation(f"attends with different vectors in its {len(attention)} attention calls")
    cos_sin = {  # the names `cos, sin = position_embeddings` binds
        t.id
        for n in own_nodes(fn)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name) and n.value.id == GIVEN
        for t in (n.targets[0].elts if isinstance(n.targets[0], ast.Tuple) else [])
        if isinstance(t, ast.Name)
    }
    (query, key), rotated = (
        handed.pop(),
        [
            tuple(snippet(a) for a in c.args[:2])
            for c in calls
            if len(c.args) == 4 and snippet(c.args[1]) not in cos_sin
        ],
    )
    if len(rotated) == len(calls) and (query, key) not in rotated:
        return Rotation(
            f"rotates `{', '.join(rotated[0])}` but attends with `{query}, {key}` (parts split off before RoPE "
            "and joined after it)",
            split=True,
        )
    if len(calls) > 1:
        return Rotation(f"rotates in {len(calls)} calls ({', '.join(f'`{snippet(c)}`' for c in calls)})")
    call = calls[0]
    stmt, outer = statement_of(fn, call)
    if name_of(call.func) != APPLY or not isinstance(call.func, ast.Name):
        return Rotation(f"rotates with another function (`{snippet(stmt)}`)")
    targets = stmt.targets[0].elts if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Tuple) else []
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    args = [a.id for a in call.args if isinstance(a, ast.Name)]
    if (
        not isinstance(stmt, ast.Assign)
        or stmt.value is not call
        or len(stmt.targets) != 1
        or len(names) != 2
        or len(targets) != 2
        or len(call.args) != 4
        or len(args) != 4
        or call.keywords
        or args[:2] != names
    ):
        return Rotation(f"rotates with `{snippet(stmt)}`")
    if names != [query, key]:
        return Rotation(f"rotates `{', '.join(names)}` but attends with `{query}, {key}`")
    # cos and sin: exactly the position_embeddings the forward was given, unpacked last before the
    # rotation in its own block or the forward's body
    if GIVEN not in params:
        return Rotation(f"takes no {GIVEN} argument")
    if changed := [node for node in own_nodes(fn) if touched(node, {GIVEN})]:
        return Rotation(f"changes the {GIVEN} it was given (`{snippet(changed[0])}`)")
    writes = sorted(
        (node for node in own_nodes(fn) if touched(node, set(args[2:])) and node.lineno < stmt.lineno),
        key=lambda node: node.lineno,
    )
    unpack = writes[-1] if writes else stmt
    if not (
        isinstance(unpack, ast.Assign)
        and len(unpack.targets) == 1
        and isinstance(unpack.targets[0], ast.Tuple)
        and [getattr(t, "id", None) for t in unpack.targets[0].elts] == args[2:]
        and isinstance(unpack.value, ast.Name)
        and unpack.value.id == GIVEN
        and (unpack in fn.body or (outer and unpack in outer[-1].body))
    ):
        return Rotation(f"rotates with a cos/sin other than the {GIVEN} it was given (`{snippet(unpack)}`)")
    condition, reads_given = None, False
    if outer:
        test = outer[0]
        if len(outer) > 1 or not isinstance(test, ast.If) or test.orelse or stmt not in test.body:
            return Rotation(f"rotates inside `{snippet(outer[-1]).split(':')[0]}:` ({snippet(stmt)})")
        condition = module_test(test.test, self_name)
        if condition is None:
            return Rotation(
                f"rotates only when `{snippet(test.test)}`, which is not a test of the module's own attributes "
                f"or of its {GIVEN}"
            )
        reads_given = any(isinstance(n, ast.Name) and n.id == GIVEN for n in ast.walk(test.test))
    scaled = False
    last = max(node.lineno for node in attention)
    for node in own_nodes(fn):
        if not (stmt.end_lineno < getattr(node, "lineno", 0) <= last) or not touched(node, {query, key}):
            continue
        if is_cache_update(node, key):
            continue
        if is_query_scale(node, query):
            scaled = True
            continue
        changed = ", ".join(sorted(touched(node, {query, key})))
        return Rotation(f"changes {changed} after rotating it (`{snippet(node)}`)")
    namespace = forward.__globals__
    apply = namespace.get(APPLY)
    if not callable(apply):
        return Rotation(f"calls an {APPLY} that its module does not define")
    try:
        positional = [
            p
            for p in inspect.signature(apply).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        positional = []
    if len(positional) < 4 and not any(p.kind is p.VAR_POSITIONAL for p in positional):
        return Rotation(f"calls an {APPLY} that does not take (q, k, cos, sin)")
    scale = namespace.get(QUERY_SCALE) if scaled else None
    if scaled and not callable(scale):
        return Rotation(f"scales the query with a {QUERY_SCALE} that its module does not define")
    return Rotation(None, condition, reads_given, forward.__code__, apply, scale, forward_globals=namespace)
