"""The documents of a run: the dataset as `datasets` loads it, example ids, and the rows in order.

load_rows       datasets.load_dataset (Hub id, local jsonl/json/parquet/csv/txt, folder);
                local files are checked first (qk_attn.run.input_checks); dataset.sample_by
                splits local .txt files (a file, glob or folder of them) and is refused elsewhere
normalize_id    a dataset's id -> the int64 example_id the capture records
iter_documents  Documents in dataset order, at most dataset.max_samples; duplicates, ids a
                reader made inexact and null texts refused
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qk_attn.errors import ConfigError
from qk_attn.run.sections import DatasetSection

# Local file suffix -> `datasets` packaged builder.
LOCAL_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
LOCAL_SUFFIXES = tuple(LOCAL_BUILDERS) + tuple(s + c for s in LOCAL_BUILDERS for c in COMPRESSED)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def missing_local_path(where: str, value: str, what: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse a `value` that names a local path (it cannot be a Hub id, or ends in one of
    `suffixes`, e.g. `.jsonl`) which does not exist: one line saying so, instead of treating it
    as a Hub id. `what`: "dataset" or "tokenizer"."""
    from qk_attn.storage.settings import is_repo_id

    expanded = os.path.expanduser(value)
    if os.path.exists(expanded) or (is_repo_id(value) and not value.lower().endswith(suffixes)):
        return
    parent = os.path.dirname(os.path.abspath(expanded))
    where_not = "" if os.path.isdir(parent) else f" (nor does its folder {parent})"
    raise ConfigError(
        f"{where}: {expanded} does not exist{where_not}; give an existing local {what} file or folder, "
        f"or a Hub {what} id (NAME or ORG/NAME)"
    )


def normalize_id(value: Any) -> int:
    """A dataset's id -> the int64 `example_id` of the capture dataset.

    Integers in int64 range pass through unchanged. Anything else (strings, floats, bools,
    out-of-range integers) is hashed: the first 8 bytes of blake2b over its UTF-8 text,
    read big-endian as a signed int64 — stable across runs, machines and Python versions:

        int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "big", signed=True)
    """
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX:
        return value
    data = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


@dataclass
class Document:
    example_id: int  # int64, what the capture dataset records
    source_id: Any  # the dataset's own id (or the row index)
    text: str
    index: int = 0  # row index in the dataset
    has_id: bool = False  # source_id came from dataset.id_column (not the row index)


def _local_builder(path: str) -> str | None:
    """The packaged builder for a local file or glob, None for a folder or a Hub id."""
    expanded = os.path.expanduser(path)
    is_glob = any(ch in expanded for ch in "*?[")
    if not (is_glob or os.path.isfile(expanded)):
        return None
    name = expanded.lower()
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix, builder in LOCAL_BUILDERS.items():
        if name.endswith(suffix):
            return builder
    raise ConfigError(
        f"dataset.path={path!r}: unsupported file type; use one of {', '.join(LOCAL_BUILDERS)} "
        "(or a folder, or a Hub dataset id)"
    )


def folder_builder(cfg: DatasetSection, path: str | None = None) -> tuple[str, list[str]] | None:
    """(packaged builder, data files) that `datasets` reads the local folder `dataset.path` with
    (its own inference: the most common file type, dataset.data_files, a README's configs), None
    when the path is no folder. Raises what `datasets` raises for a folder without data files."""
    from datasets.load import dataset_module_factory
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    folder = os.path.expanduser(path or cfg.path)  # a folder is never a demo alias
    if not os.path.isdir(folder):
        return None
    module = dataset_module_factory(folder, data_files=cfg.data_files)
    builder = next((n for n, (m, _) in _PACKAGED_DATASETS_MODULES.items() if m == module.module_path), None)
    params = module.builder_configs_parameters
    configs = params.builder_configs or []
    chosen = cfg.name or params.default_config_name
    config = next((c for c in configs if c.name == chosen), configs[0] if configs else None)
    splits = getattr(config, "data_files", None) or {}
    split = re.split(r"[\[+]", cfg.split)[0]
    files = splits.get(split) or [f for files in splits.values() for f in files]
    return builder or module.module_path, [str(f) for f in files]


def text_folder(cfg: DatasetSection) -> bool:
    """Whether `dataset.path` is a local folder that `datasets` reads as text files (False when it
    cannot read it: load_rows says why)."""
    try:
        found = folder_builder(cfg)
    except Exception:  # noqa: BLE001 - whatever datasets raises on a folder it cannot read
        return False
    return found is not None and found[0] == "text"


def check_sample_by(cfg: DatasetSection, builder: str | None) -> None:
    """dataset.sample_by splits text files; on other data it would be recorded as if it applied
    (and a changed value would refuse a resume of the same documents)."""
    if cfg.sample_by == "document" or builder == "text":
        return
    what = "a Hub dataset, read as datasets reads it" if builder is None else f"read by datasets' {builder!r} builder"
    raise ConfigError(
        f"dataset.sample_by={cfg.sample_by!r} applies to local .txt files (a file, glob or folder of them); "
        f"dataset.path={cfg.path!r} is {what}: remove dataset.sample_by (default document)"
    )


def load_rows(cfg: DatasetSection):
    """The dataset as `datasets` gives it (map-style, or iterable when streaming).

    Local text files are checked first (empty, not UTF-8), and the builder's own failures on
    them become one `ConfigError` naming `dataset.path`.
    """
    from qk_attn.run.input_checks import check_file_options, check_hub, check_local_files

    path = _resolved_path(cfg)
    builder = _local_builder(path)
    if builder is not None:
        check_file_options(cfg)
        check_sample_by(cfg, builder)
        check_local_files(dataclasses.replace(cfg, path=path))
    elif not os.path.isdir(os.path.expanduser(path)):
        missing_local_path(f"dataset.path={cfg.path!r}", path, "dataset", LOCAL_SUFFIXES)
        check_sample_by(cfg, None)
        check_hub(f"dataset.path={cfg.path!r}", "dataset")
    try:
        return _load_rows(cfg, path)
    except ConfigError:
        raise
    except StopIteration:  # datasets' json builder on a file without rows
        raise ConfigError(f"dataset.path={cfg.path!r} has no rows") from None
    except (ValueError, OSError, *_dataset_errors()) as error:  # ValueError: also UnicodeDecodeError
        if "corresponds to no data" in str(error):  # the split of a file with a header and no rows
            raise ConfigError(f"dataset.path={cfg.path!r} has no rows (split {cfg.split!r})") from None
        cause = error  # datasets wraps a builder's failure (e.g. a decoding error): name the original
        while isinstance(error, _dataset_errors()) and (cause.__cause__ or cause.__context__) is not None:
            cause = cause.__cause__ or cause.__context__
        raise ConfigError(
            f"dataset.path={cfg.path!r} cannot be read: {type(cause).__name__}: {' '.join(str(cause).split())}"
        ) from None


def _dataset_errors() -> tuple[type[BaseException], ...]:
    try:
        from datasets.exceptions import DatasetGenerationError
    except ImportError:  # older datasets
        return ()
    return (DatasetGenerationError,)


def _resolved_path(cfg: DatasetSection) -> str:
    from qk_attn.demo import resolve_dataset

    return resolve_dataset(cfg.path)


def _load_rows(cfg: DatasetSection, path: str):
    import datasets

    builder = _local_builder(path)
    kwargs: dict[str, Any] = {"split": cfg.split, "streaming": cfg.streaming}
    if builder is not None:
        # Name the file's split after `dataset.split`, so `split: test` works on a local file.
        kwargs["data_files"] = {re.split(r"[\[+]", cfg.split)[0]: os.path.expanduser(path)}
        if builder == "text":
            kwargs["sample_by"] = cfg.sample_by
        return datasets.load_dataset(builder, **kwargs)
    found = folder_builder(cfg, path)
    if found is not None:  # a local folder: checked as its files are (UTF-8, rows), sample_by as a glob's
        from qk_attn.run.input_checks import check_local_files

        check_sample_by(cfg, found[0])
        check_local_files(dataclasses.replace(cfg, path=path), [Path(f) for f in found[1]])
        if found[0] == "text":
            kwargs["sample_by"] = cfg.sample_by
    if cfg.name is not None:
        kwargs["name"] = cfg.name
    if cfg.data_files is not None:
        kwargs["data_files"] = cfg.data_files
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    return datasets.load_dataset(path, **kwargs)


def map_style(rows) -> bool:
    try:
        len(rows)
    except TypeError:  # streaming (IterableDataset)
        return False
    return True


def count_documents(rows, cfg: DatasetSection) -> int | None:
    try:
        total = len(rows)
    except TypeError:  # streaming
        return cfg.max_samples
    return total if cfg.max_samples is None else min(total, cfg.max_samples)


def iter_documents(rows, cfg: DatasetSection) -> Iterator[Document]:
    """Documents in dataset order, at most `max_samples`; ids normalised; duplicates, null or
    inexact ids and null texts refused."""
    from qk_attn.run.input_checks import inexact_id, inexact_id_message, missing_id, not_text

    columns = getattr(rows, "column_names", None)
    if columns is not None:
        for column in (cfg.text_column, cfg.id_column):
            if column is not None and column not in columns:
                raise ConfigError(f"dataset column {column!r} does not exist; the dataset has {', '.join(columns)}")
    seen: dict[int, Any] = {}
    for index, row in enumerate(rows):
        if cfg.max_samples is not None and index >= cfg.max_samples:
            break
        if cfg.text_column not in row:
            raise ConfigError(
                f"dataset.text_column={cfg.text_column!r} is not in row {index} (columns: {', '.join(row)})"
            )
        if cfg.id_column is not None and cfg.id_column not in row:
            raise ConfigError(f"dataset.id_column={cfg.id_column!r} is not in row {index} (columns: {', '.join(row)})")
        source_id = index if cfg.id_column is None else row[cfg.id_column]
        if source_id is None:
            raise ConfigError(missing_id(cfg.id_column, index))
        if inexact_id(source_id):
            raise ConfigError(inexact_id_message(cfg.id_column, index, source_id))
        example_id = normalize_id(source_id)
        if example_id in seen:
            raise ConfigError(
                f"dataset.id_column={cfg.id_column!r}: row {index}: id {source_id!r} gives example_id {example_id}, "
                f"already used by id {seen[example_id]!r}; example ids must be unique (choose a unique column, or leave "
                "dataset.id_column unset to use row numbers)"
            )
        seen[example_id] = source_id
        text = row[cfg.text_column]
        if not isinstance(text, str):
            raise ConfigError(not_text(cfg, index, text, source_id))
        yield Document(example_id, source_id, text, index, cfg.id_column is not None)
