"""What qk-attn checks in a model's own modeling file, once per file and process, at the model's
first "qk_sniff" forward (capture on or off):

- every branch on the attention implementation's name is one qk_attn.capture.known_branches says
  how to handle, or has the same value for "qk_sniff" as for the backends it wraps;
- a sliding window reaches the attention call as `sliding_window=` (the name the capture reads), in
  every call that passes one.

tests/capture/test_transformers_facts.py checks every file of the installed transformers; this
checks the file that runs, so that a release (or remote code) adding a path taken only under
"sdpa", or passing the window under another name, is refused instead of silently changing what
"qk_sniff" computes or records.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from qk_attn.capture.known_branches import FOLLOWS, NAME_BRANCHES
from qk_attn.capture.name_branches import FOLLOWED_METHODS, alike, modeling_name, transformers_root, tree_branches
from qk_attn.errors import CaptureError

FOLLOWS_PREFIX = FOLLOWS.split("{}")[0]  # a branch a FOLLOWED_METHODS method takes under the backend's name
WINDOW = "sliding_window"  # the keyword the recorder reads a call's window from

_unknown: dict[str, str | None] = {}  # modeling module -> why it is refused, or None


def refuse_unknown_branches(config) -> None:
    """CaptureError (one line) when the modeling file of `config`'s model branches on the name where
    qk-attn does not know how 'qk_sniff' fares. A dict lookup after the file's first forward."""
    modeling = modeling_name(type(config))
    if modeling not in _unknown:
        _unknown[modeling] = _first_unknown(modeling)
    if (why := _unknown[modeling]) is not None:
        raise CaptureError(why)


def _first_unknown(modeling: str) -> str | None:
    source = getattr(sys.modules.get(modeling), "__file__", None)
    if source is None or not source.endswith(".py"):
        return None
    path, root = Path(source), transformers_root()
    relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    import transformers

    release = f"transformers {transformers.__version__}"
    followed = ".".join(FOLLOWED_METHODS.get(modeling, ()))
    for branch, lines in tree_branches(tree, relative).items():
        if branch not in NAME_BRANCHES and not alike(branch.condition):
            return (
                f"qk_sniff: {relative} line {lines[0]} branches on the attention implementation's name "
                f"({branch.condition}), a branch qk-attn does not know ({release}), so under 'qk_sniff' the "
                "model could compute something else than its backend; load it with its backend's name to run "
                "it unrecorded, or install a transformers version qk-attn supports (see README)"
            )
        if NAME_BRANCHES.get(branch, "").startswith(FOLLOWS_PREFIX):
            where = {_method_at(tree, line) for line in lines} - {followed}
            if where:
                return (
                    f"qk_sniff: {relative} line {lines[0]} branches on the attention implementation's name in "
                    f"{where.pop()}, where qk-attn runs {followed or 'no method'} under the backend's name ({release}), "
                    "so under 'qk_sniff' that branch would not take the backend's path; install a transformers "
                    "version qk-attn supports (see README)"
                )
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "attention_interface":
            other = [k.arg for k in node.keywords if k.arg and "window" in k.arg and k.arg != WINDOW]
            if other:
                return (
                    f"qk_sniff: {relative} line {node.lineno} passes the attention call a window as {other[0]}=, "
                    f"where qk-attn reads {WINDOW}= ({release}), so the rows' sliding_window and "
                    "full_attention_only would be wrong; install a transformers version qk-attn supports (see README)"
                )
    return None


def _method_at(tree: ast.Module, line: int) -> str:
    """`Class.method`, or the function, whose body holds `line`."""

    def holds(node) -> bool:
        return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.lineno <= line <= node.end_lineno

    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for fn in filter(holds, node.body):
                return f"{node.name}.{fn.name}"
        elif holds(node):
            return node.name
    return "module level"
