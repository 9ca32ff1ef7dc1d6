"""Finds where transformers branches on the attention implementation's name, and makes "qk_sniff"
take the wrapped backend's branch there (or refuses the model).

`name_branches()` finds the branches in the installed source (ast), so a new or changed branch
is noticed by tests/capture/test_transformers_facts.py; NAME_BRANCHES (qk_attn.capture.known_branches)
says, for each, why it is harmless, which followed method takes the wrapped backend's path
(`follow_wrapped_backend`), or why the model is refused.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from qk_attn.capture.active import current_config
from qk_attn.capture.parsing import parse
from qk_attn.errors import CaptureError

NAME = "qk_sniff"
WRAPPED = ("sdpa", "eager")  # what "qk_sniff" may wrap (flash is recorded under its own name)

# Identifiers that hold an attention implementation's name in transformers' source.
NAME_HOLDERS = (
    "_attn_implementation",
    "attn_implementation",
    "attn_impl",
    "requested_attention_implementation",
    "checked_attention_implementation",
    "applicable_attention",
    "requested_attention",
    "target_implem",
    "original_attn_impl",
    "sub_implementation",
    "implementation",
    "_loaded_implementation",
    "_attn_implementation_internal",  # what the config's `_attn_implementation` property returns
)
NOT_ATTENTION = ("experts", "cache_implementation")  # other "implementation" settings
REGISTRIES = ("ALL_ATTENTION_FUNCTIONS", "ALL_MASK_ATTENTION_FUNCTIONS")  # lookups "qk_sniff" is registered in
# Helpers that test the name given a config: `is_flash_attention_requested(config)`, and any sibling a
# release adds (`is_sdpa_requested`), whose outcome only is_flash_attention_requested's is known for.
REQUESTED_HELPER = re.compile(r"is_\w*(attention|attn|sdpa|eager|flash|implementation)\w*_requested")
# What names an attention or mask function in transformers' source: the one a forward looked up
# (`attention_interface`), the backends' own (`sdpa_attention_forward`, `sdpa_mask`). Under "qk_sniff" the
# function looked up is qk-attn's, so comparing it with a backend's by identity is a branch on the name.
ATTENTION_FUNCTION = re.compile(
    r"attention_interface|\w*attention_forward|\w*attention_function|mask_interface|\w*(sdpa|eager|flash|flex)\w*_mask"
)


class Branch(NamedTuple):
    """One condition on the implementation's name: the file (relative to the transformers package)
    and the condition as `ast.unparse` writes it."""

    path: str
    condition: str


def _holds_name(node: ast.AST) -> bool:
    """`x.holder`, `holder`, or the same read by name: `getattr(x, "holder", default)` (as
    configuration_utils.py reads it), `vars(x)["holder"]`, `kwargs.get("holder")`."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) > 1:
        return _holder_literal(node.args[1])
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("get", "pop") and node.args:
        return _holder_literal(node.args[0])
    if isinstance(node, ast.Subscript):
        return _holder_literal(node.slice)
    return (isinstance(node, ast.Attribute) and node.attr in NAME_HOLDERS) or (
        isinstance(node, ast.Name) and node.id in NAME_HOLDERS
    )


def _holder_literal(node: ast.AST) -> bool:
    """A string key naming an attention holder (not a bare "implementation": a dict's own key, in remote code)."""
    return isinstance(node, ast.Constant) and node.value in NAME_HOLDERS and "att" in str(node.value)


def _name_condition(node: ast.AST, aliases: frozenset[str] = frozenset()) -> bool:
    """A comparison, call, method call, table lookup or `match` that tests an attention implementation's
    name (held by a NAME_HOLDERS identifier, or by a local of the function assigned from one: `aliases`)."""
    if isinstance(node, ast.Subscript):  # CLASSES[config._attn_implementation]; the registries are facts
        if ast.unparse(node.value) in REGISTRIES:
            return False
        operands = (node.slice,)
    elif isinstance(node, ast.Match):
        operands = (node.subject,)
    elif (  # TABLE.get(config._attn_implementation, default): a lookup by name
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("get", "pop", "setdefault")
        and ast.unparse(node.func.value) not in REGISTRIES
    ):
        operands = tuple(node.args)
    elif isinstance(node, ast.Compare):
        if _compares_attention_function(node):
            return True
        if any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            return False  # `is None`: the default implementation, never "qk_sniff"
        operands = (node.left, *node.comparators)
    elif isinstance(node, ast.Call) and _requested_helper(
        str(getattr(node.func, "id", getattr(node.func, "attr", "")))
    ):
        return True
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("startswith", "endswith", "split")
    ):
        operands = (node.func.value,)
    else:
        return False
    names = [
        n
        for operand in operands
        for n in ast.walk(operand)
        if _holds_name(n) or (isinstance(n, ast.Name) and n.id in aliases)
    ]
    text = _condition_text(node)
    return bool(names) and not any(word in text for word in NOT_ATTENTION)


def _compares_attention_function(node: ast.Compare) -> bool:
    """`attention_interface is eager_attention_forward`, `fn == ALL_ATTENTION_FUNCTIONS["sdpa"]`, `is not`, `in`:
    the function tells the backend as its name would. Not a test against None (under any name there is one)."""
    operands = (node.left, *node.comparators)
    if any(isinstance(o, ast.Constant) and o.value is None for o in operands):
        return False
    return any(_attention_function(n) for operand in operands for n in ast.walk(operand))


def _attention_function(node: ast.AST) -> bool:
    """A name of an attention or mask function, or an entry of a registry of them."""
    if isinstance(node, ast.Name | ast.Attribute):
        return ATTENTION_FUNCTION.fullmatch(getattr(node, "id", getattr(node, "attr", ""))) is not None
    if isinstance(node, ast.Subscript):
        return ast.unparse(node.value) in REGISTRIES
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return ast.unparse(node.func.value) in REGISTRIES
    return False


def _requested_helper(name: str) -> bool:
    return REQUESTED_HELPER.fullmatch(name) is not None and not any(word in name for word in NOT_ATTENTION)


def _condition_text(node: ast.AST) -> str:
    """A branch as NAME_BRANCHES names it: the condition's source (a `match` by its subject)."""
    return f"match {ast.unparse(node.subject)}" if isinstance(node, ast.Match) else ast.unparse(node)


ASSIGNMENTS = (ast.Assign, ast.AnnAssign, ast.NamedExpr)  # `impl = ...`, `impl: str = ...`, `(impl := ...)`


def _aliases(tree: ast.AST) -> dict[int, frozenset[str]]:
    """id(node) -> the locals of its (innermost) function assigned from an expression that holds an
    implementation's name (`impl = self.config._attn_implementation`), which then hold it too."""
    out: dict[int, frozenset[str]] = {}
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for function in functions:  # ast.walk is breadth first: inner functions come later and win
        names = frozenset(
            target.id
            for node in ast.walk(function)
            if isinstance(node, ASSIGNMENTS)
            and node.value is not None
            and any(_holds_name(n) for n in ast.walk(node.value))
            for target in getattr(node, "targets", [getattr(node, "target", None)])
            if isinstance(target, ast.Name) and target.id not in NAME_HOLDERS
        )
        for node in ast.walk(function):
            out[id(node)] = names
    return out


def transformers_root() -> Path:
    import transformers

    return Path(transformers.__file__).parent


def name_branches(root: Path | None = None) -> dict[Branch, list[int]]:
    """Every condition on the attention implementation's name in transformers' runtime source
    (modular_*.py files are code-generation sources, never imported), with its line numbers."""
    root = root or transformers_root()
    found: dict[Branch, list[int]] = {}
    for path in sorted(root.rglob("*.py")):
        if not path.name.startswith("modular_"):
            found.update(file_branches(path, path.relative_to(root).as_posix()))
    return found


def file_branches(path: Path, relative: str) -> dict[Branch, list[int]]:
    """The conditions on the attention implementation's name in one source file, with their lines."""
    source = path.read_text(encoding="utf-8")
    return tree_branches(parse(source), relative) if may_branch(source) else {}


def may_branch(source: str) -> bool:
    """Whether `source` holds a word that every branch `tree_branches` finds holds (a name holder, a
    registry, a helper, an attention function): most files hold none, and need not be parsed."""
    words = (*NAME_HOLDERS, *REGISTRIES, "_requested")
    return any(word in source for word in words) or ATTENTION_FUNCTION.search(source) is not None


def tree_branches(tree: ast.AST, relative: str) -> dict[Branch, list[int]]:
    """The same, in a parsed source file."""
    found: dict[Branch, list[int]] = {}
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if _name_condition(node, aliases.get(id(node), frozenset())):
            found.setdefault(Branch(relative, _condition_text(node)), []).append(node.lineno)
    return found


COMPARISONS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


def outcome(condition: str, name: str):
    """The condition's value when the implementation is `name`; None when it depends on more than
    the name (another variable, a registry) and so cannot be decided from the source alone."""
    from transformers.utils.generic import is_flash_attention_requested

    if condition.startswith("match "):  # a `match` statement: its cases are not read
        return None
    node = parse(condition, mode="eval").body
    try:
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "is_flash_attention_requested":
            version = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "version"), None)
            return is_flash_attention_requested(requested_attention_implementation=name, version=version)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _holds_name(node.func.value):
            if node.func.attr in ("startswith", "endswith"):
                return getattr(name, node.func.attr)(*map(ast.literal_eval, node.args))
            return None
        if isinstance(node, ast.Compare):
            operands = [o.value if isinstance(o, ast.NamedExpr) else o for o in (node.left, *node.comparators)]
            if sum(map(_holds_name, operands)) != 1:
                return None
            values = [name if _holds_name(o) else ast.literal_eval(o) for o in operands]
            return all(COMPARISONS[type(op)](a, b) for op, a, b in zip(node.ops, values, values[1:]))
    except (ValueError, KeyError):  # not a literal, or not an (in)equality
        return None
    return None


def alike(condition: str) -> bool:
    """The condition has the same value for "qk_sniff" as for every backend it may wrap."""
    values = {outcome(condition, name) for name in (NAME, *WRAPPED)}
    return None not in values and len(values) == 1


# ---- making "qk_sniff" take the wrapped backend's branches ---------------------------------------

# Methods that test the implementation's name but call no attention themselves: they run under the
# wrapped backend's name, so they take exactly its branch (transformers 5.25; absent in 5.17).
FOLLOWED_METHODS: dict[str, tuple[str, str]] = {
    "transformers.models.gemma4.modeling_gemma4": ("Gemma4TextModel", "_maybe_slice_kv_shared_inputs"),
    "transformers.models.gemma4_unified.modeling_gemma4_unified": (
        "Gemma4UnifiedTextModel",
        "_maybe_slice_kv_shared_inputs",
    ),
    "transformers.models.glm5_next.modeling_glm5_next": ("Glm5NextTextAttention", "build_attention_mask_from_topk"),
}


def _sparse_indexer(config, backend: str) -> str:
    return (
        f"qk_sniff: {config.model_type} chooses its sparse attention (the indexer's top-k keys) by the "
        f"implementation's name inside its attention forward, so under 'qk_sniff' it would attend to every key "
        f"and differ from '{backend}'; qk-attn cannot record this model: load it with "
        f"attn_implementation='{backend}'"
    )


def _upcast_attention(config, backend: str) -> str | None:
    if backend != "eager" or not getattr(config, "reorder_and_upcast_attn", False):
        return None
    return (
        f"qk_sniff: {config.model_type} with reorder_and_upcast_attn=True computes 'eager' attention in its own "
        "upcast path, which the 'qk_sniff' attention function never reaches; use QK_SNIFF_BACKEND=sdpa (sdpa "
        "ignores reorder_and_upcast_attn too) or load the model with attn_implementation='eager'"
    )


# Models that choose their sparse attention (an indexer's top-k keys) by the implementation's name
# inside their attention forward.
SPARSE_INDEXER_MODELS = (
    "axk2",
    "deepseek_v32",
    "dots3_note",
    "glm_moe_dsa",
    "hy_v4",
    "hy_v4_vl",
    "minimax_m3_vl",
    "mistral_large4",
)

# Model types whose branch on the name sits where no wrapper can show it the wrapped name: a reason
# (one line, what to do) when the model cannot be run exactly under "qk_sniff" wrapping `backend`.
REFUSED_MODELS: dict[str, Callable[..., str | None]] = {
    **{f"transformers.models.{m}.modeling_{m}": _sparse_indexer for m in SPARSE_INDEXER_MODELS},
    "transformers.models.gpt2.modeling_gpt2": _upcast_attention,
    "transformers.models.decision_transformer.modeling_decision_transformer": _upcast_attention,
}


@functools.cache
def modeling_name(config_type: type) -> str:
    return config_type.__module__.replace(".configuration_", ".modeling_")


_followed: set[str] = set()


def follow_wrapped_backend(config, backend: str) -> None:
    """Before a "qk_sniff" forward of `config`'s model (the mask function, capture on or off): refuse
    a model whose name branches cannot take `backend`'s path (CaptureError, one line), and have the
    FOLLOWED_METHODS of its modeling module evaluate their branches under `backend`'s name.
    Costs two dict lookups after a model's first forward."""
    modeling = modeling_name(type(config))
    refuse = REFUSED_MODELS.get(modeling)
    if refuse is not None and (reason := refuse(config, backend)) is not None:
        raise CaptureError(reason)
    if modeling in FOLLOWED_METHODS and modeling not in _followed:
        class_name, method_name = FOLLOWED_METHODS[modeling]
        cls = getattr(sys.modules.get(modeling), class_name, None)
        method = getattr(cls, method_name, None)
        # Absent in releases without the branch; a branch that moved out of it is refused (modeling_checks).
        if method is not None and not getattr(method, "runs_under_wrapped_name", False):
            setattr(cls, method_name, _under_wrapped_name(method))
        _followed.add(modeling)


def _under_wrapped_name(method):
    """`method`, run with its module's config naming the backend "qk_sniff" wraps, so that its
    branches on the name are the backend's. The name is restored before anything else runs (the
    method calls no attention); a second thread running the same model meanwhile would see it."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        config = self.config
        if config._attn_implementation != NAME:
            return method(self, *args, **kwargs)
        config._attn_implementation = current_config().backend
        try:
            return method(self, *args, **kwargs)
        finally:
            config._attn_implementation = NAME

    run.runs_under_wrapped_name = True
    return run
