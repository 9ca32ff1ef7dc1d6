"""What `rope_check` reads in an attention forward's syntax tree: the pieces its rules are made of.

Generic reading of one function (its own nodes, the statement holding a call, what a statement
changes, short code for messages) and the few shapes of transformers code the rules look for:
rotary calls, the call that hands q/k/v to attention, the cache update, Ministral 3's query
scale, and an `if` test over the module's own attributes. Nothing here decides a verdict:
`rope_check._read` does.
"""

from __future__ import annotations

import ast
from types import CodeType

# The names of transformers code a forward is read for (rope_check's messages use them too)
APPLY = "apply_rotary_pos_emb"
GIVEN = "position_embeddings"  # the forward's (cos, sin): what attention.applied_rotary reads
QUERY_SCALE = "get_llama_4_attn_scale"  # Ministral 3: q *= 1 + beta*log(1 + floor(pos/orig_max)) after RoPE
# What rope.query_scale passes it: the forward must pass the same (the positions, then beta and the
# original length from the config's rope parameters), or its scale cannot be undone.
QUERY_SCALE_ARGS = (
    "position_ids",
    "self.config.rope_parameters.get('llama_4_scaling_beta')",
    "self.config.rope_parameters.get('original_max_position_embeddings')",
)


# ---- reading one function ------------------------------------------------------------------


def name_of(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else ""


def own_nodes(fn):
    """Every node of the function's own body (nested functions and classes are not its code)."""
    stack = list(reversed(fn.body))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def statement_of(fn, call) -> tuple[ast.stmt, list[ast.stmt]]:
    """The statement holding `call` and the compound statements around it (outermost first)."""

    def search(body, outer):
        for stmt in body:
            if any(node is call for node in ast.walk(stmt)):
                inner = [getattr(stmt, f, []) for f in ("body", "orelse", "finalbody", "handlers")]
                for block in inner:
                    if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                        found = search(block, [*outer, stmt])
                        if found is not None:
                            return found
                return stmt, outer
        return None

    return search(fn.body, [])


def snippet(node) -> str:
    """The node as one line of source, cut to 100 characters (for refusal messages)."""
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 100 else text[:97] + "..."


def _bound(stmt) -> list[ast.expr]:
    """The targets a statement binds or writes into."""
    if isinstance(stmt, ast.Assign):
        return stmt.targets
    if isinstance(stmt, ast.AugAssign | ast.AnnAssign | ast.For | ast.AsyncFor):
        return [stmt.target]
    if isinstance(stmt, ast.With | ast.AsyncWith):
        return [item.optional_vars for item in stmt.items if item.optional_vars is not None]
    return []


_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)


def touched(node, names: set[str]) -> set[str]:
    """Which of `names` a statement (or `:=`) rebinds, writes into (`q[...] = `) or changes in place
    (`q.mul_()`). A compound statement's own targets only: the statements inside it are nodes too."""
    if isinstance(node, ast.NamedExpr):
        return {node.target.id} & names
    if not isinstance(node, ast.stmt):
        return set()
    out = set()
    for target in _bound(node):
        for sub in ast.walk(target):
            if isinstance(sub, ast.Name) and sub.id in names:
                out.add(sub.id)
    if isinstance(node, _COMPOUND):
        return out
    for node in ast.walk(node):
        if isinstance(node, ast.NamedExpr) and node.target.id in names:
            out.add(node.target.id)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.endswith("_")
            and not node.func.attr.startswith("_")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in names
        ):
            out.add(node.func.value.id)
    return out


# ---- the shapes the rules look for ---------------------------------------------------------


def is_rotary(node) -> bool:
    """A call whose name says it rotates (rotary, rope, rotate): apply_rotary_pos_emb or another."""
    name = name_of(node.func).lower() if isinstance(node, ast.Call) else ""
    return any(word in name for word in ("rotary", "rope", "rotate"))


def attention_calls(fn, self_name: str) -> list[ast.Call]:
    """Calls that hand the attention function `(self, query, key, value, ...)`."""
    return [
        node
        for node in own_nodes(fn)
        if isinstance(node, ast.Call)
        and len(node.args) >= 3
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id == self_name
        and any(word in name_of(node.func).lower() for word in ("attention", "interface"))
    ]


def is_cache_update(stmt, key: str) -> bool:
    """`key, value = cache.update(key, value, ...)`: the cached keys join the new ones, unchanged."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Tuple)):
        return False
    first = stmt.targets[0].elts[0]
    call = stmt.value
    return (
        isinstance(first, ast.Name)
        and first.id == key
        and isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "update"
        and bool(call.args)
        and isinstance(call.args[0], ast.Name)
        and call.args[0].id == key
    )


def is_query_scale(stmt, query: str) -> bool:
    """`query = query * get_llama_4_attn_scale(*QUERY_SCALE_ARGS)...` (undone by rope.query_scale)."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return False
    value = stmt.value
    typed = {  # `.to(query.dtype)`: the scale's type, not the query's values
        id(n.value) for n in ast.walk(value) if isinstance(n, ast.Attribute) and n.attr in ("dtype", "device")
    }
    return (
        stmt.targets[0].id == query
        and isinstance(value, ast.BinOp)
        and isinstance(value.op, ast.Mult)
        and isinstance(value.left, ast.Name)
        and value.left.id == query
        and any(
            isinstance(n, ast.Call)
            and name_of(n.func) == QUERY_SCALE
            and tuple(map(ast.unparse, n.args)) == QUERY_SCALE_ARGS
            and not n.keywords
            for n in ast.walk(value.right)
        )
        and not any(isinstance(n, ast.Name) and n.id == query for n in ast.walk(value.right) if id(n) not in typed)
    )


_TEST_NODES = (
    ast.Expression,
    ast.Attribute,
    ast.Name,
    ast.Constant,
    ast.Compare,
    ast.BoolOp,
    ast.UnaryOp,
    ast.Tuple,
    ast.Load,
    ast.And,
    ast.Or,
    ast.Not,
    ast.Is,
    ast.IsNot,
    ast.Eq,
    ast.NotEq,
    ast.In,
    ast.NotIn,
)


def module_test(test, self_name: str) -> CodeType | None:
    """The `if` test compiled, when it reads only constants, the module's attributes (`self.a.b`) and
    the forward's position_embeddings argument (`position_embeddings is not None`)."""
    for node in ast.walk(test):
        if not isinstance(node, _TEST_NODES):
            return None
        if isinstance(node, ast.Name) and node.id not in (self_name, GIVEN):
            return None
        if isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.Not):
            return None
    if self_name != "self":  # evaluated with the module bound to `self`
        test = ast.fix_missing_locations(_Rename(self_name).visit(test))
    return compile(ast.Expression(test), "<rotation test>", "eval")


class _Rename(ast.NodeTransformer):
    def __init__(self, name: str):
        self.name = name

    def visit_Name(self, node):
        return ast.copy_location(ast.Name("self", node.ctx), node) if node.id == self.name else node
