"""Checks of the output folder before any weights load (`qk-sniff run`): each failure is one `ConfigError` line.

The folder (or its nearest existing parent, when it is to be created) is a folder, writable,
not locked by another capture, and empty or a capture of the same settings and model
(qk_sniff.json), never someone else's files; committed shards of a capture to resume are whole.
Nothing here writes to the output folder: writability is probed with a temporary file that is
removed at once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qk_attn.capture.plan import ModelShape
from qk_attn.config import SniffConfig
from qk_attn.errors import ConfigError, one_line
from qk_attn.run.config import described_difference


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, where: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".qk_sniff-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        raise ConfigError(
            f"{where}: cannot write in {folder} ({error.strerror or error}); choose a folder you can write to"
        ) from None


def _probe_lock(path: Path, where: str) -> None:
    from qk_attn.storage.lock import lock_held

    if lock_held(path):
        raise ConfigError(
            f"{where} is in use: another qk-sniff capture is writing to it (it holds {path.name}); "
            "wait until it finishes, or choose another output.data_root"
        )


def check_output(
    data_root: str,
    sniff: SniffConfig,
    source: dict | None,
    *,
    overwrite: bool,
    model: dict,
    shape: ModelShape | None,
    rank=None,
    token_strings: bool = False,
) -> Path:
    """The output folder can take this capture: see the module docstring. Returns the folder
    whose free space bounds the run (the output, or its nearest existing parent)."""
    from qk_attn.storage.folder import check_layout, check_shard_sizes
    from qk_attn.storage.layout import CARD_FILES, LOCK, MANIFEST, Files, parse_key, part_files
    from qk_attn.storage.manifest import read_manifest

    root = Path(os.path.expanduser(data_root))
    where = f"output.data_root={data_root!r}"
    _refuse_inside_dataset(root, (source or {}).get("dataset"), where)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{where} is a file, expected a folder (new or holding a qk-sniff capture)")
    if not root.exists():
        parent = _existing_ancestor(root)
        if not parent.is_dir():
            raise ConfigError(f"{where} cannot be created: {parent} is a file")
        _probe_writable(parent, where)
        return parent
    files = Files() if rank is None else Files(*rank)
    _probe_lock(root / files.lock, where)
    _probe_writable(root, where)
    if not overwrite:  # one writer, or ranks of one world size
        try:
            check_layout(root, files)
        except ValueError as error:
            raise ConfigError(f"{where}: {one_line(error)}") from None
    try:
        manifest = read_manifest(root, files.manifest)
    except ValueError as error:
        if overwrite:  # deleted by the run, which starts over
            return root
        raise ConfigError(
            f"{where}: {files.manifest} cannot be read ({one_line(error.__cause__ or error)}); "
            f"run `qk-sniff verify {data_root}` to see what is wrong"
        ) from None
    if manifest is None and not part_files(root):
        ours = {LOCK, MANIFEST, f".{MANIFEST}.tmp"}
        foreign = sorted(
            p.name
            for p in root.iterdir()
            if p.name not in ours
            and not p.name.startswith(".qk_sniff")
            and not (p.is_dir() and parse_key(p.name) and not any(p.iterdir()))
        )
        if foreign:
            raise ConfigError(
                f"{where} is not empty and holds no qk-sniff capture (e.g. {foreign[0]!r}"
                f"{' and ' + str(len(foreign) - 1) + ' more' if len(foreign) > 1 else ''}); a capture "
                f"writes its own {', '.join(CARD_FILES)} there, so choose a new or empty folder"
            )
        return root
    if manifest is None or overwrite:
        return root
    _check_same_settings(manifest, sniff, source, where, token_strings)
    _check_same_model(manifest, model, shape, where)
    try:  # committed shards missing or truncated: resuming would build on them
        check_shard_sizes(root, manifest)
    except ValueError as error:
        raise ConfigError(f"{where}: {one_line(error)}") from None
    return root


def _refuse_inside_dataset(root: Path, dataset, where: str) -> None:
    """An output inside a local dataset folder, or where a local glob would match its files, becomes part of the
    dataset the run reads: its shards change the dataset's fingerprint (a resumed run is refused as another
    dataset) and the loader reads them as documents."""
    if not isinstance(dataset, str):
        return
    path, output = os.path.expanduser(dataset), root.resolve()
    glob = any(ch in path for ch in "*?[")
    if glob:
        reached = _glob_reaches(path, output)
    else:
        folder = Path(path).resolve()
        reached = os.path.isdir(path) and (output == folder or folder in output.parents)
    if reached:
        place = "where the glob" if glob else "inside"
        raise ConfigError(
            f"{where} lies {place} dataset.path={dataset!r}{' matches its files' if glob else ''}: the capture's "
            "files would become part of the dataset the run reads (its fingerprint changes, so the run could not "
            "resume); choose an output outside it"
        )


def _glob_reaches(pattern: str, output: Path) -> bool:
    """Whether the local glob `pattern` (recursive, as `datasets` reads it) would match a file a capture writes in
    `output`: its shards (`l00h00q/s000000-p0000.parquet`), examples table, card or manifest."""
    import fnmatch

    wild = min(pattern.index(ch) for ch in "*?[" if ch in pattern)
    base = Path(os.path.dirname(pattern[:wild]) or ".").resolve()
    if output != base and base not in output.parents:
        return False
    rest = os.path.relpath(pattern, os.path.dirname(pattern[:wild]) or ".")
    written = ("l00h00q/s000000-p0000.parquet", "examples.parquet", "README.md", "qk_sniff.json")
    inside = os.path.relpath(output, base)
    for name in written:
        candidate = name if inside == "." else f"{inside}/{name}"
        # fnmatch's `*` crosses `/`; glob's crosses it only as `**`
        if fnmatch.fnmatch(candidate, rest) and ("**" in rest or candidate.count("/") == rest.count("/")):
            return True
    return False


def _check_same_settings(
    manifest: dict, sniff: SniffConfig, source: dict | None, where: str, token_strings: bool
) -> None:
    from qk_attn.storage.settings import SettingDifference, setting_differences

    differences = setting_differences(manifest, sniff, source)
    if any(d.setting == "source.text_folder" and d.there is None for d in differences):
        raise ConfigError(
            f"{where} holds a capture of the .txt folder dataset.path={source['dataset']!r} made before "
            "dataset.sample_by applied to folders (each line was a document, whatever sample_by said); resuming "
            "it would mix two kinds of documents: set output.overwrite: true to capture it again, or choose "
            "another output.data_root"
        )
    # capture_token_strings is recorded as the token_str column, not as a setting (one schema per dataset).
    there = (manifest.get("columns") or {}).get("token_str", False)
    if manifest.get("examples") and there != token_strings:
        differences.append(SettingDifference("capture.capture_token_strings", there, token_strings))
    if differences:
        diffs = "; ".join(described_difference(d.setting, d.there, d.now) for d in differences)
        raise ConfigError(
            f"{where} holds a capture with different settings ({diffs}); re-run with the same settings "
            "to resume it, choose another output.data_root, or set output.overwrite: true to delete "
            "that capture and start over"
        )


def _check_same_model(manifest: dict, model: dict, shape: ModelShape | None, where: str) -> None:
    """The saver refuses a different model once examples are committed; say so before loading it."""
    from qk_attn.storage.settings import fingerprint_digest, other_model, shape_differences

    if not manifest.get("model") or not manifest.get("examples"):
        return
    old = other_model(manifest, model)
    if old is not None:
        files = [
            f", weight files sha256 {fingerprint_digest(m['files'])[:12]}" if m.get("files") else ""
            for m in (old, model)
        ]
        raise ConfigError(
            f"{where} holds captures of model {old.get('id')!r} (revision {old.get('revision')}{files[0]}); "
            f"model.name is {model.get('id')!r} (revision {model.get('revision')}{files[1]}): choose another "
            "output.data_root, or set output.overwrite: true to start over"
        )
    if shape is None:
        return
    new = {
        "num_layers": shape.num_layers,
        "num_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
    }
    changed = [f"{d.setting} {d.there} there, {d.now} now" for d in shape_differences(manifest, new)]
    if changed:
        raise ConfigError(
            f"{where} holds captures of a model with another shape ({'; '.join(changed)}); choose "
            "another output.data_root, or set output.overwrite: true to start over"
        )
