"""Read a capture back: `load` (pyarrow Table), `load_vectors` ((N, head_dim) torch tensor), `load_examples`.

Both take a local capture folder or a Hub dataset repo id. Only shards the manifest lists
are read, so a folder that a capture is still writing into (or that a killed run left
orphans in) gives exactly its committed rows. From the Hub only the manifest and the
requested folders are downloaded (into the Hugging Face cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from qk_attn.arguments import check_flag
from qk_attn.capture.schema import concat_rows
from qk_attn.dataset.reader import check_shard
from qk_attn.errors import CorruptShard, HubError, one_line
from qk_attn.storage.examples import examples_table
from qk_attn.storage.layout import MANIFEST, parse_key
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.settings import fingerprint_digest, is_repo_id, local_fingerprint, same_files


def _index(name: str, value) -> int | None:
    """`layer` or `head` as an int (None: every one); a bool, float or string is refused, not matched."""
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a {name} index (an int >= 0) or None (every {name})")
    return int(value)


def _select(where, manifest: dict, layer, head, kind: str | None) -> list[str]:
    """The folders with committed rows that match; LookupError naming the first filter that matches
    nothing and the values this capture holds for it."""
    if kind not in (None, "q", "k"):
        raise ValueError(f"kind={kind!r} is invalid: expected 'q', 'k' or None (both)")
    wanted = {"layer": _index("layer", layer), "kind": kind, "head": _index("head", head)}
    keys = {key: parse_key(key) for key, names in sorted(manifest.get("shards", {}).items()) if names}
    for i, name in ((0, "layer"), (2, "kind"), (1, "head")):  # narrowed in this order: "heads of layer 3"
        if wanted[name] is None:
            continue
        held = sorted({parsed[i] for parsed in keys.values()})
        keys = {key: parsed for key, parsed in keys.items() if parsed[i] == wanted[name]}
        if not keys:
            raise LookupError(
                f"{where} has no committed rows for layer={layer}, head={head}, kind={kind!r}: "
                f"{name}={wanted[name]!r} is not among the {name}s with rows ({', '.join(map(str, held)) or 'none'})"
            )
    if not keys:  # no filter, and no folder holds a committed row
        raise LookupError(f"{where} has no committed rows (no example was committed, or none kept a row)")
    return list(keys)


def _check_columns(columns) -> list[str] | None:
    """`columns` as a list (a tuple is one too); one line naming what is wrong with it otherwise."""
    if columns is not None and (
        isinstance(columns, (str, bytes))
        or not isinstance(columns, (list, tuple))
        or not columns
        or not all(isinstance(c, str) for c in columns)
    ):
        raise ValueError(f"columns={columns!r} is invalid: expected a non-empty list of column names, or None (all)")
    if columns is not None and len(set(columns)) != len(columns):
        raise ValueError(f"columns={columns!r} names a column twice")
    return None if columns is None else list(columns)


def _open(path_or_repo: str | os.PathLike, revision: str | None, token) -> tuple[Path, dict, bool]:
    """(root folder, manifest, is_remote): a local folder as is, a repo id via the Hub."""
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} only applies to Hub repos; {local} is a local folder")
        if token is not None:  # its value is a secret: not repeated in the message
            raise ValueError(f"token= only applies to Hub repos; {local} is a local folder")
        manifest = read_manifest(local)
        if manifest is None:
            raise FileNotFoundError(f"{local} is not a qk-sniff capture: {MANIFEST} is missing")
        return local, manifest, False
    if local.exists():
        raise FileNotFoundError(f"{local} is a file, not a qk-sniff capture folder (or a Hub dataset repo id)")
    if not is_repo_id(str(path_or_repo)):  # a path, never a repo id: say it is missing, not what the Hub said
        raise FileNotFoundError(f"{local} does not exist: expected a qk-sniff capture folder or a Hub dataset repo id")
    from qk_attn.dataset.hub import snapshot

    try:
        root = snapshot(str(path_or_repo), revision=revision, allow_patterns=[MANIFEST], token=token)
    except HubError as error:  # a name that is also a local path: say that no such folder exists either
        raise HubError(f"{error} (and no local folder {local} exists)") from error
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(
            f"{path_or_repo} (revision {revision or 'main'}) has no {MANIFEST}: not a qk-sniff capture"
        )
    return root, manifest, True


def load(
    path_or_repo: str | os.PathLike,
    layer: int | None = None,
    head: int | None = None,
    kind: str | None = None,
    revision: str | None = None,
    columns: list[str] | None = None,
    token: str | bool | None = None,
    tokens: bool = False,
    tokenizer=None,
) -> pa.Table:
    """Committed rows of the matching (layer, head, kind) folders as one Arrow table.

    `None` matches every layer / head / kind: `load(out, layer=3, kind="k")` is every key
    head of layer 3. Columns as qk_attn.capture.schema.arrow_schema; `vector` is
    fixed_size_list<float32|float16>[head_dim], or list<...> when the folders differ in head size.
    `tokens=True` adds a `token` string column: each row's `token_id` decoded with `tokenizer`
    (a tokenizer, or its name or path), by default the one the manifest records.
    """
    columns = _check_columns(columns)
    tokens = check_flag("tokens", tokens)  # "no" would be true
    if tokenizer is not None and not tokens:  # it would be ignored
        raise ValueError(
            f"tokenizer={_shown(tokenizer)} needs tokens=True: it decodes token_id into the token column that "
            "tokens=True adds; pass tokens=True, or leave tokenizer out"
        )
    root, manifest, remote = _open(path_or_repo, revision, token)
    keys = _select(path_or_repo, manifest, layer, head, kind)
    if remote:
        from qk_attn.dataset.hub import snapshot

        root = snapshot(
            str(path_or_repo), revision=revision, allow_patterns=[f"{key}/*.parquet" for key in keys], token=token
        )
    if tokens and columns is not None and "token_id" not in columns:
        columns = [*columns, "token_id"]
    try:
        tables = [_read(root, manifest, key, name, columns) for key in keys for name in manifest["shards"][key]]
    except CorruptShard:
        # A capture writing here may have merged the shards listed (compaction deletes the parts after
        # its manifest lists the merged shard): read again from its manifest now, while it changes.
        if remote or read_manifest(root) == manifest:
            raise
        return load(path_or_repo, layer, head, kind, revision, columns, token, tokens, tokenizer)
    table = concat_rows(tables) if columns is None or "vector" in columns else pa.concat_tables(tables)
    return with_token_strings(table, manifest, tokenizer) if tokens else table


def with_token_strings(table: pa.Table, manifest: dict, tokenizer=None) -> pa.Table:
    """`table` plus a `token` column (dictionary-encoded strings; null where `token_id` is null)."""
    if "token_id" not in table.column_names:
        raise ValueError(
            "tokens=True: this capture has no token_id column (it was written before token ids "
            "were recorded, or with token ids off)"
        )
    ids = table.column("token_id").combine_chunks()
    vocabulary = pc.unique(ids.drop_null())
    stored = _stored_strings(table)
    if tokenizer is None and not (manifest.get("source") or {}).get("tokenizer") and stored is not None:
        strings = [stored.get(i) for i in vocabulary.to_pylist()]  # the strings the capture stored itself
    else:
        given = tokenizer_of(manifest, tokenizer)
        if tokenizer is not None:
            _refuse_other_tokenizer_files(manifest, tokenizer, given)
        strings = _decoded(given, vocabulary.to_pylist(), stored)
    indices = pc.index_in(ids, value_set=vocabulary)
    return table.append_column("token", pa.DictionaryArray.from_arrays(indices, pa.array(strings, pa.string())))


def _stored_strings(table: pa.Table) -> dict[int, str] | None:
    """{token id: its `token_str`} of a capture that stored the strings (`session(vocabulary=...)`), else None."""
    if "token_str" not in table.column_names:
        return None
    pairs = pa.table({"id": table.column("token_id"), "str": table.column("token_str").cast(pa.string())})
    pairs = pairs.filter(pc.is_valid(pairs.column("id"))).group_by(["id", "str"]).aggregate([])
    return dict(zip(pairs.column("id").to_pylist(), pairs.column("str").to_pylist()))


def _refuse_other_tokenizer_files(manifest: dict, tokenizer, given) -> None:
    """A tokenizer given for a capture recorded with a local one: its files must be the recorded ones (the
    manifest's fingerprint of them), where its own folder is known; another tokenizer at least as large
    decoded every id, silently. A Hub tokenizer, or one whose folder is not known, is taken as given."""
    recorded = (manifest.get("source_files") or {}).get("tokenizer")
    folder = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else getattr(given, "name_or_path", None)
    if recorded is None or not isinstance(folder, (str, os.PathLike)) or not os.path.exists(folder):
        return
    now = local_fingerprint(os.fspath(folder), "tokenizer")
    if now is not None and not same_files(recorded, now):
        raise ValueError(
            f"tokens=True: tokenizer={_shown(tokenizer)} has other files ({os.fspath(folder)}, sha256 "
            f"{fingerprint_digest(now)[:12]}...) than the tokenizer this capture was recorded with (sha256 "
            f"{fingerprint_digest(recorded)[:12]}...); pass that one (tokenizer=<name, path or tokenizer>)"
        )


def _decoded(tokenizer, ids: list[int], stored: dict[int, str] | None) -> list[str | None]:
    """`ids` as `tokenizer` writes them; refused when `tokenizer` cannot be the capture's: an id past its
    vocabulary (it would read as null), or a string other than the one the capture stored for that id."""
    size = len(tokenizer)
    past = [i for i in ids if not 0 <= i < size]
    if past:
        raise ValueError(
            f"tokens=True: token id {past[0]} is past the end of the tokenizer's {size} tokens, so it is not the "
            "tokenizer this capture was recorded with; pass that one (tokenizer=<name, path or tokenizer>)"
        )
    strings = tokenizer.convert_ids_to_tokens(ids)
    for i, string in zip(ids, strings):
        if stored is not None and stored.get(i, string) != string:
            raise ValueError(
                f"tokens=True: the tokenizer writes token id {i} as {string!r}, but the capture stored {stored[i]!r} "
                "(token_str), so it is not the tokenizer this capture was recorded with; pass that one "
                "(tokenizer=<name, path or tokenizer>)"
            )
    return strings


def _shown(tokenizer) -> str:
    """A tokenizer argument for a one-line message: a name or path as written, an object by its type
    (a tokenizer's repr runs over many lines)."""
    if isinstance(tokenizer, (str, os.PathLike, int, float)):
        return repr(os.fspath(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer)
    return f"<{type(tokenizer).__name__}>"


def tokenizer_of(manifest: dict, tokenizer=None):
    """`tokenizer` as a tokenizer object; by default the one the manifest's source names.

    A name that cannot be loaded is one line naming it (for the recorded one, as the capture
    records it, and how to pass another), not what the Hub or transformers said alone."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise ValueError(
                f"tokens=True: tokenizer={_shown(tokenizer)} is not a tokenizer; pass a tokenizer name, path or "
                "tokenizer object (AutoTokenizer.from_pretrained(...))"
            )
        return tokenizer
    source = manifest.get("source") or {}
    name = tokenizer if tokenizer is not None else source.get("tokenizer")
    if name is None:
        raise ValueError("tokens=True: the capture records no tokenizer; pass tokenizer=<name, path or tokenizer>")
    revision = None if tokenizer is not None else source.get("tokenizer_revision")
    if tokenizer is None:
        what = f'the tokenizer this capture records (source["tokenizer"] = {_shown(name)}'
        what += f", revision {revision!r})" if revision is not None else ")"
        fix = "pass the capture's tokenizer: tokenizer=<name, path or tokenizer>"
    else:
        what, fix = f"tokenizer={_shown(name)}", "pass a tokenizer name, path or tokenizer object"
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"tokens=True: {what} is not a tokenizer name or path; {fix}")
    if not isinstance(revision, (str, type(None))):
        raise ValueError(f"tokens=True: {what} has a revision that is not a branch, tag or commit name; {fix}")
    from transformers import AutoTokenizer

    from qk_attn.demo import resolve_model

    path = os.path.expanduser(resolve_model(os.fspath(name), verbose=False))  # "~/tok": no repo id starts so
    if not os.path.exists(path) and not is_repo_id(path):  # the Hub would say "Repo id must be ..."
        raise ValueError(f"tokens=True: {what} cannot be loaded (no such folder, and not a Hub repo id); {fix}")
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except Exception as error:  # noqa: BLE001 - OSError from the Hub, ValueError/TypeError from transformers
        raise ValueError(f"tokens=True: {what} cannot be loaded ({one_line(error)}); {fix}") from error


def _read(root: Path, manifest: dict, key: str, name: str, columns: list[str] | None) -> pa.Table:
    """One shard, refused when its size or sha256 differs from the manifest or a page checksum fails."""
    problem = check_shard(root, manifest, key, name, read=False)
    if problem:
        raise CorruptShard(f"{root / key / name}: {problem}; run `qk-sniff verify {root}` and `qk-sniff repair {root}`")
    if columns is not None:  # a name the shards lack is the caller's mistake, not a damaged shard
        try:
            names = pq.read_schema(root / key / name).names
        except Exception:  # noqa: BLE001 - reported as unreadable below
            names = columns
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise ValueError(
                f"columns: {', '.join(map(repr, unknown))} not in this capture; its columns: {', '.join(names)}"
            )
    try:
        return pq.read_table(root / key / name, columns=columns, page_checksum_verification=True)
    except Exception as error:  # noqa: BLE001 - a damaged page in a shard without a digest
        raise CorruptShard(
            f"{root / key / name}: unreadable ({type(error).__name__}: {error}); run `qk-sniff repair {root}`"
        ) from None


def load_examples(
    path_or_repo: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> pa.Table:
    """One row per committed example: example_id, source_id (the source dataset's own id, a
    string), source_index (its row), valid_length, first_position. From the manifest, so it
    is exactly the committed examples (OUT/examples.parquet is the same table for `datasets`)."""
    _, manifest, _ = _open(path_or_repo, revision, token)
    return examples_table(manifest)


def load_vectors(
    path_or_repo: str | os.PathLike,
    layer: int | None = None,
    head: int | None = None,
    kind: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> torch.Tensor:
    """The `vector` column of `load(...)` as an (N, head_dim) tensor (float32, or float16 as stored)."""
    return vectors_of(load(path_or_repo, layer, head, kind, revision, columns=["vector"], token=token))


def vectors_of(table: pa.Table) -> torch.Tensor:
    """(N, head_dim) tensor from a table's fixed-size-list `vector` column, without row loops."""
    column = table.column("vector").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):  # concat_rows made it a list: head sizes differ
        sizes = sorted(set(pc.list_value_length(column).unique().to_pylist()))
        raise ValueError(
            f"the vectors have different head sizes ({', '.join(map(str, sizes))}): they form no one (N, head_dim) "
            "tensor; pass layer= (or load() for a table of lists)"
        )
    dim = column.type.list_size
    # flatten() honours slicing offsets (`.values` would not).
    flat = column.flatten().to_numpy(zero_copy_only=False)
    if not flat.flags.writeable:  # a zero-copy view of Arrow memory: torch wants its own
        flat = flat.copy()
    return torch.from_numpy(flat.reshape(-1, dim))
