"""What qk-attn checks in a model's own modeling file, once per file and process, at the model's
first "qk_sniff" forward (capture on or off), in the files of every class of the running model and its
modules (with their bases, and the decorators around their methods: capture_outputs), once per class,
and in the file that defines each attention module class, at its first call (remote code that borrows
a transformers config class lives elsewhere than the config's modeling file), and in the files of the functions "qk_sniff" hands the call to: the
wrapped backend's attention (integrations/sdpa_attention.py) and mask (masking_utils.py, with the mask
builders), where a release may branch on the name too; and, once per process, transformers' files that
every model runs through (generation/utils.py, modeling_utils.py, modeling_layers.py, ...: CORE_MODULES):

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
import functools
import inspect
import sys
import sysconfig
import types
import weakref
from pathlib import Path

import torch
import transformers

from qk_attn.capture.active import current_config
from qk_attn.capture.backends import attention_forward, mask_function
from qk_attn.capture.known_branches import FOLLOWS, NAME_BRANCHES
from qk_attn.capture.name_branches import (
    FOLLOWED_METHODS,
    alike,
    may_branch,
    modeling_name,
    transformers_root,
    tree_branches,
)
from qk_attn.capture.parsing import parse
from qk_attn.errors import CaptureError
from qk_attn.version import tested_transformers

FOLLOWS_PREFIX = FOLLOWS.split("{}")[0]  # a branch a FOLLOWED_METHODS method takes under the backend's name
WINDOW = "sliding_window"  # the keyword the recorder reads a call's window from

# module name, source file or backend function -> why its models are refused, or None
_refusals: dict[object, str | None] = {}


def check_modeling_file(config) -> None:
    """CaptureError (one line) when the modeling file of `config`'s model, or the file of the wrapped
    backend's attention or mask function, has a branch or a window keyword qk-attn does not know. A few
    dict lookups after the files' first forward."""
    check_core_files()
    check_module(modeling_name(type(config)))
    backend = current_config().backend
    check_function(mask_function(backend))
    check_function(attention_forward(backend))
    check_running_model()


# transformers' own files whose name branches every model runs through (generate()'s input preparation,
# loading, output handling): checked at run time as a model's file is, so that a release the suite has
# not run cannot make "qk_sniff" take another path than its backend. About 1 s once per process.
# Also the files under every model's classes (its decoder layers' base in modeling_layers, its config's,
# cache's and RoPE's): a branch there changes a forward as much as one in the model's own file.
CORE_MODULES = (
    "transformers.generation.utils",
    "transformers.modeling_utils",
    "transformers.utils.generic",
    "transformers.modeling_layers",
    "transformers.configuration_utils",
    "transformers.cache_utils",
    "transformers.modeling_rope_utils",
    "transformers.integrations.hub_kernels",
    # what every decoder forward runs through: the decorators around it (capture_outputs,
    # deprecate_kwarg) and the helpers it calls; and generate()'s settings, logits processors and stops
    "transformers.utils.output_capturing",
    "transformers.utils.deprecation",
    "transformers.utils.import_utils",
    "transformers.activations",
    "transformers.pytorch_utils",
    "transformers.integrations.deepspeed",
    "transformers.distributed.fsdp",
    "transformers.distributed.utils",
    "transformers.integrations.heterogeneity.configuration_utils",
    "transformers.generation.configuration_utils",
    "transformers.generation.logits_process",
    "transformers.generation.stopping_criteria",
)
CORE_CLASSES = (
    ("transformers.generation.utils", "GenerationMixin"),
    ("transformers.modeling_utils", "PreTrainedModel"),
)


def check_core_files() -> None:
    """CORE_MODULES' files, and the files of their classes' methods compiled elsewhere (a method replaced
    by a patch, or by a release that moved it): once per process."""
    if (why := _core_refusal()) is not None:
        raise CaptureError(why)


@functools.cache  # (apart from _refusals, which tests forget for each modeling file they edit)
def _core_refusal() -> str | None:
    for name in CORE_MODULES:
        if name in sys.modules and (why := _refusal(name)) is not None:
            return why
    files = set()
    for module_name, class_name in CORE_CLASSES:
        module = sys.modules.get(module_name)
        for value in vars(getattr(module, class_name, object)).values():
            code = getattr(inspect.unwrap(getattr(value, "__func__", value)), "__code__", None)
            if code is not None and code.co_filename != getattr(module, "__file__", None):
                files.add(code.co_filename)
    # not qk_attn's own wrappers (generate()), nor torch's methods PreTrainedModel overrides (to, cuda)
    return next((why for f in sorted(files) if not _skipped(f) and (why := _file_once(f))), None)


def _file_once(source: str, followed: str = "", owner: str | None = None) -> str | None:
    key = (source, followed, owner) if owner else source
    if key not in _refusals:
        _refusals[key] = _file_refusal(source, followed, owner)
    return _refusals[key]


# not qk_attn's own code (its wrapper of generate()), nor torch's (nn.Module, the layers) or the standard library's
SKIPPED = (str(Path(__file__).parent.parent), str(Path(torch.__file__).parent), sysconfig.get_paths()["stdlib"])


def _skipped(source: str | None) -> bool:
    return source is None or source.startswith(SKIPPED)


# id(code object) -> (it, whether the `self` of its frames is a module): read once per code object, since
# reading a frame's locals copies them and the stack is walked at every forward's mask call (by id: a
# code object's hash is computed anew at each lookup)
_module_code: dict[int, tuple[object, bool]] = {}
_checked_models: weakref.WeakSet = weakref.WeakSet()


def check_running_model() -> None:
    """The same for the files of every class of the model whose forward runs now (the outermost module
    on the stack) and of its modules, with their bases: remote code's own model and layer classes, which
    the config's modeling file is not, and the decorators around their methods (capture_outputs). Each
    class once per process; each model's modules are listed once. About 10 us a forward after that."""
    if torch.compiler.is_compiling():
        _check_outside_graph()  # (a graph break; costs some 30 us a call, so only while compiling)
    else:
        _check_model_of(sys._getframe(1))


@torch.compiler.disable
def _check_outside_graph() -> None:
    _check_model_of(sys._getframe(1))


def _check_model_of(frame) -> None:
    outer = None
    while frame is not None:
        code = frame.f_code
        known = _module_code.get(id(code))
        if known is None or known[0] is not code:
            this = frame.f_locals.get("self") if "self" in code.co_varnames else None
            known = _module_code[id(code)] = (code, isinstance(this, torch.nn.Module))
        if known[1]:
            outer = frame
        frame = frame.f_back
    model = outer.f_locals.get("self") if outer is not None else None
    if not isinstance(model, torch.nn.Module) or model in _checked_models:
        return
    for cls in dict.fromkeys(c for m in model.modules() for c in type(m).__mro__):
        if cls not in _refusals:
            _refusals[cls] = _class_refusal(cls)
        if (why := _refusals[cls]) is not None:
            raise CaptureError(why)
    _checked_models.add(model)


def _class_refusal(cls: type) -> str | None:
    """The refusal of `cls`'s module file, or of a file one of its methods, or a decorator's wrapper
    around one, was compiled from (a method patched in, a wrapper defined elsewhere)."""
    source = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if _skipped(source):
        return None
    files = []  # (file, the followed method as it is named there, or "")
    followed = FOLLOWED_METHODS.get(cls.__module__)
    for name, value in vars(cls).items():
        fn = getattr(value, "__func__", getattr(value, "fget", value))  # class and static methods, properties
        for _ in range(8):  # the decorators' wrappers, down to the method (a bounded inspect.unwrap)
            if not isinstance(fn, types.FunctionType):
                break
            where = fn.__code__.co_qualname if followed == (cls.__name__, name) else ""
            files.append((fn.__code__.co_filename, where))
            fn = getattr(fn, "__wrapped__", None)
    core = {getattr(sys.modules.get(name), "__file__", None) for name in CORE_MODULES}  # read by check_core_files
    if cls.__module__ in _refusals or cls.__module__ in FOLLOWED_METHODS:  # (by name: with its followed method)
        why = _module_refusal(cls.__module__)
    else:
        why = _file_once(source) if source not in core else None
    for file, where in dict.fromkeys(files):
        if file != source and not _skipped(file) and file not in core:
            why = why or _file_once(file, where, source if where else None)
    return why


def check_function(fn) -> None:
    """The same for the file that defines `fn` (its module's, and the file its code was compiled from
    where that differs: a function redefined elsewhere and registered in its place)."""
    if fn not in _refusals:
        _refusals[fn] = _function_refusal(fn)
    if (why := _refusals[fn]) is not None:
        raise CaptureError(why)


def check_attention_module(module) -> None:
    """The same for the file that defines the attention module's class."""
    check_module(type(module).__module__)


def check_module(modeling: str) -> None:
    """CaptureError (one line) when the Python module named `modeling` has a branch or a window keyword
    qk-attn does not know; checked once per module and process."""
    if (why := _module_refusal(modeling)) is not None:
        raise CaptureError(why)


def _module_refusal(modeling: str) -> str | None:
    if modeling not in _refusals:
        _refusals[modeling] = _refusal(modeling)
    return _refusals[modeling]


def _function_refusal(fn) -> str | None:
    fn = inspect.unwrap(getattr(fn, "func", fn))  # a partial's function; past decorators (5.17's sdpa_mask)
    modeling = getattr(fn, "__module__", None) or ""
    if modeling.startswith("qk_attn."):  # eager_forward: the model's own eager, in its attention class's file
        return None
    if modeling not in _refusals:
        _refusals[modeling] = _refusal(modeling)
    code = getattr(getattr(fn, "__code__", None), "co_filename", None)
    if code is None or code == getattr(sys.modules.get(modeling), "__file__", None):
        return _refusals[modeling]
    if code not in _refusals:
        _refusals[code] = _file_refusal(code, "")
    return _refusals[modeling] or _refusals[code]


def _refusal(modeling: str) -> str | None:
    source = getattr(sys.modules.get(modeling), "__file__", None)
    return _file_refusal(source, ".".join(FOLLOWED_METHODS.get(modeling, ())))


def _file_refusal(source: str | None, followed: str, owner: str | None = None) -> str | None:
    """`owner`: the file whose NAME_BRANCHES the branches of `source` are looked up in (a followed method
    of a class of `owner`'s, compiled elsewhere: patched in, or redefined by a test as a release would)."""
    if source is None or not source.endswith(".py"):
        return None
    path = Path(source)
    relative = _relative(path)
    source = path.read_text(encoding="utf-8")
    if not may_branch(source):  # (nor an attention call: `attention_interface` is one of its words)
        return None
    tree = parse(source)
    found = _unknown_branch(tree, _relative(Path(owner)) if owner else relative, followed) or _other_window(tree)
    if found is None:
        return None
    line, what = found
    return (
        f"qk_sniff: {relative} line {line} {what} (transformers {transformers.__version__}); install a tested "
        f"release (pip install '{tested_transformers()}'), or load the model with its backend's name to run it "
        "unrecorded"
    )


def _relative(path: Path) -> str:
    # transformers_root() is where edited copies lie in tests; the installed package holds the rest
    root = next((r for r in (transformers_root(), Path(transformers.__file__).parent) if path.is_relative_to(r)), None)
    return path.relative_to(root).as_posix() if root is not None else str(path)


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
