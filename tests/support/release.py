"""Simulate what a transformers release changes, in a test: a modeling file or one function edited
as text, written to a real file, so that inspect and ast read the edited source as they would a
release's. Both are undone by the `monkeypatch` they are given."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path


def _edited(source: str, edits) -> str:
    for old, new in edits:
        assert old in source, f"the source no longer contains {old!r}"
        source = source.replace(old, new)
    return source


def edited_source(module, edits) -> str:
    """`module`'s source file with `edits` made."""
    return _edited(Path(module.__file__).read_text(encoding="utf-8"), edits)


def edit_file(module, edits, root: Path, monkeypatch) -> Path:
    """`module.__file__` becomes an edited copy of its source file (its code is not re-run), at the
    same place under `root` as under the transformers package (for code that reads paths from there)."""
    import transformers

    source = Path(module.__file__)
    path = root / source.relative_to(Path(transformers.__file__).parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(edited_source(module, edits), encoding="utf-8")
    monkeypatch.setattr(module, "__file__", str(path))
    return path


def redefine(owner, name: str, edits, directory: Path, monkeypatch):
    """`owner.name` (a function or method) redefined from its edited source, in its own module, compiled
    from a file whose path ends as its module's does (frames tell generate()'s methods by their file)."""
    fn = inspect.unwrap(getattr(owner, name))
    module = sys.modules[fn.__module__]
    path = directory / f"redefined_{name}" / Path(*fn.__module__.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_edited(textwrap.dedent(inspect.getsource(fn)), edits), encoding="utf-8")
    namespace: dict = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__, namespace)
    monkeypatch.setattr(owner, name, namespace[name])
    return namespace[name]


def import_file(path: Path, name: str, monkeypatch):
    """The module in the file `path`, imported as `name` (in sys.modules until `monkeypatch` undoes it),
    as remote code or an edited release file is."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
