"""What qk-attn checks in a model's own modeling file, once per file and process, at the model's
first "qk_sniff" forward (capture on or off), and in the file that defines each attention module
class, at its first call (remote code that borrows a transformers config class lives elsewhere
than the config's modeling file):

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

import transformers

from qk_attn.capture.known_branches import FOLLOWS, NAME_BRANCHES
from qk_attn.capture.name_branches import FOLLOWED_METHODS, alike, modeling_name, transformers_root, tree_branches
from qk_attn.errors import CaptureError

FOLLOWS_PREFIX = FOLLOWS.split("{}")[0]  # a branch a FOLLOWED_METHODS method takes under the backend's name
WINDOW = "sliding_window"  # the keyword the recorder reads a call's window from

_refusals: dict[str, str | None] = {}  # modeling module -> why its models are refused, or None


def check_modeling_file(config) -> None:
    """CaptureError (one line) when the modeling file of `config`'s model has a branch or a window
    keyword qk-attn does not know. A dict lookup after the file's first forward."""
    check_module(modeling_name(type(config)))


def check_attention_module(module) -> None:
    """The same for the file that defines the attention module's class."""
    check_module(type(module).__module__)


def check_module(modeling: str) -> None:
    """CaptureError (one line) when the Python module named `modeling` has a branch or a window keyword
    qk-attn does not know; checked once per module and process."""
    if modeling not in _refusals:
        _refusals[modeling] = _refusal(modeling)
    if (why := _refusals[modeling]) is not None:
        raise CaptureError(why)


def _refusal(modeling: str) -> str | None:
    source = getattr(sys.modules.get(modeling), "__file__", None)
    if source is None or not source.endswith(".py"):
        return None
    path, root = Path(source), transformers_root()
    relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = _unknown_branch(tree, relative, ".".join(FOLLOWED_METHODS.get(modeling, ()))) or _other_window(tree)
    if found is None:
        return None
    line, what = found
    return (
        f"qk_sniff: {relative} line {line} {what} (transformers {transformers.__version__}); install a "
        "transformers version qk-attn supports (see README), or load the model with its backend's name to run it "
        "unrecorded"
    )


def _unknown_branch(tree: ast.Module, relative: str, followed: str) -> tuple[int, str] | None:
    """A branch on the name that NAME_BRANCHES lacks and that is not alike, or a followed branch outside
    its followed method: (line, what)."""
    for branch, lines in tree_branches(tree, relative).items():
        if branch not in NAME_BRANCHES and not alike(branch.condition):
            return lines[0], (
                f"branches on the attention implementation's name ({branch.condition}), a branch qk-attn does "
                "not know, so under 'qk_sniff' the model could compute something else than its backend"
            )
        if NAME_BRANCHES.get(branch, "").startswith(FOLLOWS_PREFIX):
            where = {_method_at(tree, line) for line in lines} - {followed}
            if where:
                return lines[0], (
                    f"branches on the attention implementation's name in {where.pop()}, where qk-attn runs "
                    f"{followed or 'no method'} under the backend's name, so under 'qk_sniff' that branch would "
                    "not take the backend's path"
                )
    return None


def _other_window(tree: ast.Module) -> tuple[int, str] | None:
    """An attention call passed a window under another keyword than WINDOW: (line, what)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "attention_interface":
            other = [k.arg for k in node.keywords if k.arg and "window" in k.arg and k.arg != WINDOW]
            if other:
                return node.lineno, (
                    f"passes the attention call a window as {other[0]}=, where qk-attn reads {WINDOW}=, so the "
                    "rows' sliding_window and full_attention_only would be wrong"
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
