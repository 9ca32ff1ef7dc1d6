"""The inputs a run reads, checked before they load: each failure is one `ConfigError` line.

    hub        a Hub model or dataset id: the Hub answers one short probe (no retry storm)
    files      local dataset files: non-empty UTF-8 text (compressed too), Parquet files with rows
    ids        every row has an id, exact (not a float that lost digits), unique as example_id
    texts      every row has a text (a string, not null)

The libraries would fail later and deeper (datasets' builder, huggingface_hub's retries);
these say which setting, which file or row, and the fix. The checks of the model's config and
of the run's size are in `preflight`, the output folder's in `output_checks`.
"""

from __future__ import annotations

import bz2
import codecs
import functools
import glob
import gzip
import lzma
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qk_attn.errors import ConfigError, one_line

UTF8_CHUNK = 1 << 20
EXACT_FLOAT = 2**53  # from here on a float no longer holds every integer
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
# Compressed text files datasets reads, and how to read them here (`data.jsonl.gz`).
DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
UNREADABLE = (OSError, EOFError, lzma.LZMAError)  # a corrupt or truncated compressed file
HUB_PROBE_TIMEOUT_S = 3.0


# ---- the Hub ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _hub_probe(endpoint: str) -> str | None:
    """Why `endpoint` does not answer one HTTP request within HUB_PROBE_TIMEOUT_S, or None (any
    answer, even an error status, means it is reachable). Through huggingface_hub's own client,
    so its proxy and certificate settings apply."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - whatever the HTTP client raises: not reachable
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        return one_line(cause)
    return None


def check_hub(where: str, what: str) -> None:
    """Before a Hub id is loaded: the Hub answers (one probe per process), else one line instead
    of huggingface_hub's retries (5, over about 25 s). With HF_HUB_OFFLINE=1 nothing is probed: the
    libraries use their cache and fail at once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    why = _hub_probe(constants.ENDPOINT)
    if why is not None:
        raise ConfigError(
            f"{where} is a Hub {what} id, but the Hub ({constants.ENDPOINT}) cannot be reached ({why}); "
            f"connect to the network, give a local {what} path, or set HF_HUB_OFFLINE=1 to use a copy "
            "in the local Hugging Face cache"
        )


# ---- the dataset's files ---------------------------------------------------------------------
def local_files(path: str) -> list[Path]:
    """The files a local file or glob names (a folder or Hub id: none)."""
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        # (recursive: `**` matches files at any depth, the top level too, as `datasets` reads it)
        return [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
    return [Path(expanded)] if os.path.isfile(expanded) else []


def first_bad_utf8(path: Path, opener: Callable = open) -> tuple[int, int] | None:
    """(offset, byte) of the first byte that is not valid UTF-8, or None; reads the file (as `opener`
    opens it: decompressed) in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with opener(path, "rb") as f:
        while True:
            chunk = f.read(UTF8_CHUNK)
            final = not chunk
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as error:
                # error.start counts from the decoder's pending bytes (< 4) plus this chunk
                pending = len(error.object) - len(chunk)
                return offset + error.start - pending, error.object[error.start]
            if final:
                return None
            offset += len(chunk)


def check_file_options(cfg) -> None:
    """dataset.name, data_files and revision choose within a Hub dataset or a dataset folder: on a
    local file they would be ignored (and the card would name them as if used)."""
    given = [f"dataset.{key}={getattr(cfg, key)!r}" for key in ("name", "data_files", "revision") if getattr(cfg, key)]
    if given:
        raise ConfigError(
            f"{', '.join(given)} cannot apply to the local file dataset.path={cfg.path!r} (they choose within a Hub "
            "dataset or a dataset folder); remove them, or point dataset.path at the folder"
        )


def check_local_files(cfg, files: list[Path] | None = None) -> None:
    """Text files of `dataset.path` (or `files`, those of a folder) exist, are not empty and are
    UTF-8 (datasets would fail later with StopIteration or a decoding error deep in its builder)."""
    path = cfg.path
    where = f"dataset.path={path!r}"
    expanded = os.path.expanduser(path)
    files = local_files(path) if files is None else files
    if any(ch in expanded for ch in "*?[") and not files:
        raise ConfigError(f"{where} matches no file")
    for file in files:
        name = file.name.lower()
        if name.endswith(".parquet"):
            _check_parquet(file, where)
            continue
        opener = DECOMPRESS.get(Path(name).suffix)
        if not Path(name).stem.endswith(TEXT_SUFFIXES) if opener else not name.endswith(TEXT_SUFFIXES):
            continue  # parquet/arrow are binary
        if file.stat().st_size == 0:
            raise ConfigError(f"{where}: {file} is empty (0 bytes); a run needs at least one document")
        try:
            bad = first_bad_utf8(file, opener or open)
        except UNREADABLE as error:
            raise ConfigError(
                f"{where}: {file} cannot be decompressed ({type(error).__name__}: {one_line(error)})"
            ) from None
        if bad is not None:
            offset, byte = bad
            text = Path(file.stem) if opener else file
            convert = f"iconv -f latin1 -t utf-8 {file.name} > {text.stem}.utf8{text.suffix}"
            if opener:
                reader = {gzip.open: "zcat", bz2.open: "bzcat", lzma.open: "xzcat"}[opener]
                convert = f"{reader} {file.name} | iconv -f latin1 -t utf-8 > {text.stem}.utf8{text.suffix}"
            raise ConfigError(
                f"{where}: {file} is not UTF-8 text (byte 0x{byte:02x} at offset {offset:,}"
                + (" of its decompressed text" if opener else "")
                + f"); convert it, e.g. `{convert}`"
            )


def _check_parquet(file: Path, where: str) -> None:
    """A Parquet file has a readable footer and rows (datasets fails on 0 rows with Arrow's
    'BatchSize must be greater than 0')."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(file).num_rows
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{where}: {file} is not a readable Parquet file ({type(error).__name__}: {one_line(error)})"
        ) from None
    if rows == 0:
        raise ConfigError(
            f"{where}: {file} has no rows (a Parquet file with 0 rows); a run needs at least one document"
        )


# ---- the dataset's ids -----------------------------------------------------------------------
def missing_id(id_column: str, index: int) -> str:
    """A row whose id is null: it would be recorded as the id "None" (hashed), which it is not."""
    return (
        f"dataset.id_column={id_column!r}: row {index} has no id (null); every row needs an id: fill it in, "
        "choose a column without nulls, or leave dataset.id_column unset to use row numbers"
    )


def inexact_id(value: Any) -> bool:
    """Whether `value` is a float too large to hold its integer exactly: what a reader (pyarrow's
    JSON reader, pandas) makes of an integer id outside int64, or of a large integer in a column
    that also holds a fraction. Its last digits are gone, so it cannot name its document."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    return isinstance(value, float) and value.is_integer() and abs(value) >= EXACT_FLOAT


def inexact_id_message(id_column: str, index: int, value: Any) -> str:
    """A float id too large to be exact (qk_attn.run.documents.inexact_id): hashed, it would name
    no document of the file, and two ids could become one."""
    return (
        f"dataset.id_column={id_column!r}: row {index} has id {value!r}, a float too large to be exact (an integer "
        "id outside int64, -2**63..2**63-1, is read as a float and loses its last digits); store the ids as "
        "strings, or leave dataset.id_column unset to use row numbers"
    )


def not_text(cfg, index: int, text: Any, source_id: Any) -> str:
    """A row whose text is null (missing) or not a string: a data error, not an empty document."""
    row = f"row {index}" + (f" (id {source_id!r})" if cfg.id_column is not None else "")
    if text is None:
        return (
            f"dataset.text_column={cfg.text_column!r}: {row} has no text (null or missing; a CSV reads an empty "
            "field as null); fill it in (an empty string is an empty document) or leave the row out"
        )
    kind = type(text).__name__
    article = "an" if kind[:1] in "aeiou" else "a"
    return f"dataset.text_column={cfg.text_column!r}: {row} holds {article} {kind}, expected text"


def check_ids(ids: Iterable[Any], normalize: Callable[[Any], int], id_column: str) -> None:
    """Every row has an exact id, and no two rows map to the same example_id (the capture would mix
    their rows)."""
    seen: dict[int, tuple[int, Any]] = {}
    for index, value in enumerate(ids):
        if value is None:
            raise ConfigError(missing_id(id_column, index))
        if inexact_id(value):
            raise ConfigError(inexact_id_message(id_column, index, value))
        example = normalize(value)
        if example in seen:
            first, other = seen[example]
            same = "the same id" if other == value else f"the same example_id {example} as id {other!r}"
            raise ConfigError(
                f"dataset.id_column={id_column!r}: rows {first} and {index} have {same} ({value!r}); "
                "ids must be unique: choose a unique column, or leave dataset.id_column unset to use "
                "row numbers"
            )
        seen[example] = (index, value)
