"""Reading a capture folder back for checks: `verify`, `inspect`, `repair`, the examples table.

    verify_dataset(OUT) -> problems     integrity (size, sha256, Parquet page checksums) of every
                                        committed shard, then schema, uniqueness, manifest counts,
                                        buckets and the sampler's exact selection
    repair_dataset(OUT) -> exit code    drops from the manifest the examples that a bad or missing
                                        shard holds (and their rows everywhere else), so that
                                        re-running the same capture recaptures exactly them
    check_shard(...)                    one shard's integrity problem, or None (qk_attn.dataset.load uses it)

Each integrity problem is one line: the file, what is wrong, the examples it holds (from the
manifest, so also for a shard that cannot be read).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qk_attn.storage.manifest import (
    EXAMPLES,
    LOCK,
    MANIFEST,
    PREVIOUS,
    fsync_dir,
    parse_key,
    read_manifest,
    row_group_segments,
    segment_examples,
    sha256_file,
    shard_examples,
    shard_segments,
    take_lock,
    write_json_atomic,
)
from qk_attn.errors import CorruptShard, ManifestError, StorageError
from qk_attn.storage.shards import write_table

QUARANTINE = ".qk_sniff.quarantine"  # where repair moves Parquet files no manifest lists

INDEX_COLUMNS = ["example_id", "position", "bucket", "layer", "head", "kind"]


# ---- reading a capture dataset ---------------------------------------------------------------
@dataclass
class Dataset:
    """A capture output folder as `inspect` and `verify` read it (vectors are never loaded).

    Only shards the manifest lists are committed (qk_attn.storage.saver); `folders` holds every
    (layer, head, kind) that the manifest or the disk knows of.
    """

    root: Path
    manifest: dict
    folders: dict[tuple[int, int, str], Path]  # (layer, head, kind) -> folder
    bad: set[Path] = None  # shards that failed the integrity check: never read for content

    def __post_init__(self) -> None:
        self.bad = set() if self.bad is None else self.bad

    @classmethod
    def open(cls, root: str | Path) -> "Dataset":
        root = Path(root)
        manifest = read_manifest(root) if root.is_dir() else None
        if manifest is None:
            raise FileNotFoundError(f"{root} is not a qk-sniff dataset: {MANIFEST} is missing")
        names = set(manifest.get("shards", {}))
        names |= {p.name for p in root.iterdir() if p.is_dir() and parse_key(p.name)}
        folders = {parse_key(name): root / name for name in sorted(names)}
        return cls(root, manifest, folders)

    def sampler(self):
        from qk_attn.sampler import Sampler

        s = self.manifest["sampler"]
        return Sampler(s["sampler"], int(s["min_bucket_size"]), float(s["base_rate"]), int(s["seed"]))

    def committed(self) -> dict[int, int]:
        """example_id -> valid length (tokens) of every committed example."""
        return {int(k): int(v) for k, v in self.manifest.get("examples", {}).items()}

    def first_positions(self) -> dict[int, int]:
        """example_id -> the position of its first token (0 unless a left-padded batch ran without
        position_ids: `position` is what RoPE used); 0 where the manifest predates the record."""
        info = self.manifest.get("example_info", {})
        return {int(k): int((info.get(k) or {}).get("first_position") or 0) for k in self.manifest.get("examples", {})}

    def row_counts(self) -> dict[str, int]:
        """Folder name (e.g. "l00h00q") -> committed rows, as the manifest records them."""
        return {str(k): int(v) for k, v in self.manifest.get("row_counts", {}).items()}

    def plan(self) -> dict[tuple[int, str], tuple[int, ...]] | None:
        """(layer, kind) -> heads the capture was asked to record (None before any call ran)."""
        plan = self.manifest.get("plan")
        if not plan:
            return None
        out = {}
        for kind, key in (("q", "query_heads"), ("k", "key_heads")):
            for layer, heads in plan.get(key, {}).items():
                if heads:
                    out[(int(layer), kind)] = tuple(int(h) for h in heads)
        return out

    def files(self, key: tuple[int, int, str]) -> list[Path]:
        """The committed shards of one folder (listed in the manifest)."""
        folder = self.folders[key]
        return [folder / name for name in self.manifest.get("shards", {}).get(folder.name, [])]

    def stray_files(self, key: tuple[int, int, str]) -> list[Path]:
        """Parquet files in a folder that the manifest does not list (a glob reader would read them)."""
        listed = set(self.files(key))
        folder = self.folders[key]
        return sorted(p for p in folder.glob("*.parquet") if p not in listed) if folder.is_dir() else []

    def index(self, key: tuple[int, int, str]):
        """The non-vector columns of one folder's committed shards, as one Arrow table (or None)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for f in self.files(key):
            if not f.is_file():
                self.bad.add(f)
            if f in self.bad:
                continue
            try:
                has_tokens = "token_id" in pq.read_schema(f).names
                tables.append(pq.read_table(f, columns=INDEX_COLUMNS + ["token_id"] * has_tokens))
            except Exception:  # noqa: BLE001 - damaged: `verify` names it; readers skip it
                self.bad.add(f)
        return pa.concat_tables(tables) if tables else None

    def plot_paths(self) -> list[Path]:
        from qk_attn.storage.card import CHART

        return [self.root / CHART] if (self.root / CHART).is_file() else []


# ---- integrity -------------------------------------------------------------------------------
def check_shard(root: Path, manifest: dict, key: str, name: str, read: bool = True) -> str | None:
    """What is wrong with one committed shard (missing, size, sha256, unreadable or a page
    checksum), or None. Shards without a recorded digest (older datasets) are only read."""
    import pyarrow.parquet as pq

    path = Path(root) / key / name
    info = manifest.get("shard_info", {}).get(f"{key}/{name}")
    if not path.is_file():
        return "missing"
    if info is not None:
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"size {size} bytes, the manifest records {info['bytes']} (truncated or replaced)"
        if sha256_file(path) != info["sha256"]:
            return "sha256 differs from the manifest (the bytes changed after it was written)"
    if read or info is None:
        try:
            pq.read_table(path, page_checksum_verification=True)
        except Exception as error:  # noqa: BLE001 - any reader error means the shard is unusable
            return f"unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return None


def shard_problem_line(root: Path, manifest: dict, key: str, name: str, problem: str) -> str:
    examples = shard_examples(manifest, key, name)
    held = _ids_text(examples) if examples else "unknown (no per-example record in this older manifest)"
    return f"{key}/{name}: {problem}; holds examples {held}"


def _ids_text(ids: list[int], limit: int = 20) -> str:
    return "[" + ", ".join(map(str, ids[:limit])) + (f", ... {len(ids) - limit} more" if len(ids) > limit else "") + "]"


def check_integrity(data: "Dataset") -> tuple[list[str], set[Path], int]:
    """(one line per bad shard, the bad shard paths, how many shards had no digest to check)."""
    lines, bad, no_digest = [], set(), 0
    info = data.manifest.get("shard_info", {})
    for key, names in sorted(data.manifest.get("shards", {}).items()):
        for name in names:
            no_digest += f"{key}/{name}" not in info
            problem = check_shard(data.root, data.manifest, key, name)
            if problem:
                lines.append(shard_problem_line(data.root, data.manifest, key, name, problem))
                bad.add(data.root / key / name)
    problem = check_examples_file(data.root, data.manifest)
    if problem:
        lines.append(problem)
    return lines, bad, no_digest


def check_examples_file(root: Path, manifest: dict, name: str = EXAMPLES) -> str | None:
    """OUT/examples.parquet against the digest the manifest records for it, and its rows against
    the manifest's committed examples (an export written at most every minute: a killed run leaves
    it behind; the next run and `repair` rewrite it)."""
    import pyarrow.parquet as pq

    record = manifest.get("examples_file")
    if not record:  # written before the examples table existed
        return None
    path = Path(root) / record["name"]
    if not path.is_file() or path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
        return f"{path.name}: missing or changed since it was written (the examples table); `qk-sniff repair` rewrites it"
    try:
        same = pq.read_table(path, page_checksum_verification=True).equals(examples_table(manifest))
    except Exception:  # noqa: BLE001 - unreadable is as wrong as different
        same = False
    if not same:
        return (f"{path.name}: lags the manifest (the examples table does not list exactly the {len(manifest['examples'])} "
                "committed examples); the next run or `qk-sniff repair` rewrites it")
    return None


def _unreadable(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.read_table(path, page_checksum_verification=True)
    except Exception:  # noqa: BLE001
        return True
    return False


# ---- the examples table ------------------------------------------------------------------------
def examples_table(manifest: dict):
    """One row per committed example: example_id, source_id, source_index, valid_length, first_position."""
    import pyarrow as pa

    ids = sorted(int(e) for e in manifest.get("examples", {}))
    info = manifest.get("example_info", {})
    get = lambda field: [info.get(str(e), {}).get(field) for e in ids]  # noqa: E731
    return pa.table({
        "example_id": pa.array(ids, pa.int64()),
        "source_id": pa.array(get("source_id"), pa.string()),
        "source_index": pa.array(get("source_index"), pa.int64()),
        "valid_length": pa.array([int(manifest["examples"][str(e)]) for e in ids], pa.int64()),
        "first_position": pa.array(get("first_position"), pa.int64()),
    })


# ---- verify ----------------------------------------------------------------------------------
def expected_positions(sampler, layer: int, kind: str, lengths: dict[int, int], chunk: int = 1 << 22,
                       starts: dict[int, int] | None = None):
    """example_id -> the positions the sampler selects in [start, start + valid length) (start 0
    unless `starts` says otherwise), vectorised over examples (at most `chunk` candidates at a time)."""
    import numpy as np
    import torch

    out: dict[int, np.ndarray] = {}
    items = sorted(lengths.items(), key=lambda kv: kv[1])
    i = 0
    while i < len(items):
        longest = max(items[i][1], 1)
        n = max(1, min(len(items) - i, chunk // longest))
        group = items[i : i + n]
        longest = max(length for _, length in group)
        ids = torch.tensor([e for e, _ in group], dtype=torch.int64)
        offsets = torch.tensor([(starts or {}).get(e, 0) for e, _ in group], dtype=torch.int64)[:, None]
        positions = torch.arange(longest, dtype=torch.int64).expand(len(group), -1) + offsets
        keep = sampler.keep(ids, layer, kind, positions)
        keep &= positions < offsets + torch.tensor([length for _, length in group])[:, None]
        for row, (example, _) in enumerate(group):
            out[example] = positions[row][keep[row]].numpy()
        i += n
    return out


def verify_dataset(root: str | Path, log=print) -> list[str]:
    """Every check of `qk-sniff verify`; returns the problems found (empty: the dataset is sound)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from qk_attn.capture.batch import arrow_schema

    try:
        data = Dataset.open(root)
    except ManifestError as error:  # altered or unreadable: nothing it lists can be trusted
        return [str(error)]
    integrity, bad, no_digest = check_integrity(data)
    # Shards that cannot be read are left out of the content checks; one whose bytes changed but
    # still reads is checked as well (its content problems say what changed). verify only reports:
    # nothing it reads is copied anywhere.
    data.bad = {f for f in bad if not f.is_file() or _unreadable(f)}
    problems: list[str] = list(integrity)
    if no_digest:
        log(f"info: {no_digest} shard(s) have no recorded size/digest (written by an older qk-attn): "
            "checked that they read with their page checksums only")
    # Examples held by a bad shard: their other checks would only repeat the same problem.
    damaged = {e for f in data.bad for e in shard_examples(data.manifest, f.parent.name, f.name)}
    damaged_folders = {f.parent.name for f in data.bad}
    sampler = data.sampler()
    committed = {e: n for e, n in data.committed().items() if e not in damaged}
    manifest_counts = data.row_counts()
    plan = data.plan()
    seen_counts: dict[str, int] = {}
    # (layer, kind) -> {folder name: {example_id: sorted positions}}
    selections: dict[tuple[int, str], dict[str, dict[int, Any]]] = defaultdict(dict)
    token_rows: list = []  # (example ids, positions, token ids) per folder, for the token check

    for key, folder in data.folders.items():
        layer, head, kind = key
        name = folder.name
        files = data.files(key)
        stray = data.stray_files(key)
        if stray:
            problems.append(f"{name}: {len(stray)} Parquet file(s) not listed in the manifest (a glob reader such as "
                            f"datasets.load_dataset would read them), e.g. {stray[0].name}")
        for f in (f for f in files if f.is_file() and f not in data.bad):
            schema = pq.read_schema(f)
            vector = schema.field("vector").type if "vector" in schema.names else None
            dim = getattr(vector, "list_size", -1)  # a changed footer may make it any type
            want = arrow_schema(dim, vector.value_type) if dim > 0 else None
            base = [schema.field(n) for n in schema.names if n not in ("token_id", "token_str")]
            if want is None or [(f_.name, f_.type) for f_ in base] != [(w.name, w.type) for w in want]:
                problems.append(f"{f.relative_to(data.root)}: schema {schema.to_string(show_schema_metadata=False)!r} "
                                f"differs from the dataset schema")
        table = data.index(key)
        rows = 0 if table is None else table.num_rows
        seen_counts[name] = rows
        if table is None:
            continue
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in INDEX_COLUMNS}
        for column, value in (("layer", layer), ("head", head), ("kind", kind)):
            if not (cols[column] == value).all():
                problems.append(f"{name}: rows with {column} != {value!r}")
        ids = cols["example_id"].astype(np.int64)
        pos = cols["position"].astype(np.int64)
        bucket = cols["bucket"].astype(np.int64)
        want_bucket = sampler.bucket_of(torch.from_numpy(pos)).numpy()
        bad = np.flatnonzero(want_bucket != bucket)
        if bad.size:
            i = bad[0]
            problems.append(f"{name}: {bad.size} rows have a bucket inconsistent with their position "
                            f"(e.g. position {pos[i]} in bucket {bucket[i]}, expected {want_bucket[i]})")
        order = np.lexsort((pos, ids))
        ids, pos = ids[order], pos[order]
        dup = np.flatnonzero((ids[1:] == ids[:-1]) & (pos[1:] == pos[:-1]))
        if dup.size:
            problems.append(f"{name}: {dup.size} duplicate (example, position) rows, e.g. example {ids[dup[0]]} "
                            f"position {pos[dup[0]]}")
        uncommitted = set(np.unique(ids).tolist()) - set(committed) - damaged
        if uncommitted:
            problems.append(f"{name}: rows of {len(uncommitted)} example(s) the manifest does not list as committed, "
                            f"e.g. {sorted(uncommitted)[:3]}")
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        selections[(layer, kind)][name] = {int(ids[s]): pos[s:e] for s, e in zip(starts, ends)}
        if "token_id" in table.column_names and not (data.manifest.get("cross_attention_layers") and kind == "k"
                                                     and layer in data.manifest["cross_attention_layers"]):
            tokens = table.column("token_id").to_numpy(zero_copy_only=False)[order]
            token_rows.append((ids, pos, np.where(np.isnan(tokens), -1, tokens).astype(np.int64)
                               if tokens.dtype.kind == "f" else tokens.astype(np.int64)))

    problems += token_id_problems(token_rows)
    problems += source_token_problems(data, token_rows, log)

    # Row counts: the manifest against the files (both directions).
    for name in sorted(set(manifest_counts) | set(seen_counts)):
        if name in damaged_folders:
            continue
        if manifest_counts.get(name, 0) != seen_counts.get(name, 0):
            problems.append(f"{name}: the manifest records {manifest_counts.get(name, 0)} rows, the files hold "
                            f"{seen_counts.get(name, 0)}")

    # Exact selection: for each committed example, every recorded (layer, head, kind) holds
    # exactly the sampler's positions for that example's valid length. Planned heads with no
    # folder at all must then have selected nothing.
    # A planned head that received attention calls but has no folder selected nothing (possible
    # at low rates); one without calls never ran (e.g. a sliding-window layer skipped by
    # full_attention_only) and is the card's coverage business, not an error here.
    calls = data.manifest.get("calls", {})
    expected_keys = set(data.folders)
    if plan is not None:
        expected_keys |= {(layer, head, kind) for (layer, kind), heads in plan.items() for head in heads
                          if calls.get(f"l{layer:02d}h{head:02d}{kind}", 0) > 0}
    pairs = sorted({(layer, kind) for layer, _, kind in expected_keys})
    for layer, kind in pairs:
        want = expected_positions(sampler, layer, kind, committed, starts=data.first_positions())
        heads = sorted(h for (lay, h, k) in expected_keys if lay == layer and k == kind)
        for head in heads:
            name = f"l{layer:02d}h{head:02d}{kind}"
            if name in damaged_folders and not damaged:  # an old dataset: no per-shard examples to exclude
                continue
            got = selections.get((layer, kind), {}).get(name, {})
            wrong = [e for e, positions in want.items() if not np.array_equal(got.get(e, np.empty(0, np.int64)), positions)]
            if wrong:
                e = wrong[0]
                problems.append(
                    f"{name}: {len(wrong)} example(s) whose positions differ from the sampler's selection, e.g. example "
                    f"{e} (valid length {committed[e]}): recorded {len(got.get(e, []))} positions, expected {len(want[e])}"
                )
    empty = len(expected_keys - set(data.folders))
    log(f"checked {len(data.folders)} (layer, head, kind) folders, {sum(seen_counts.values()):,} rows, "
        f"{len(committed)} committed examples" + (f"; {empty} (layer, head, kind) that ran with 0 rows, checked "
                                                  "against the sampler's selection too" if empty else ""))
    return problems


def token_id_problems(token_rows: list) -> list[str]:
    """Every row of one (example, position) holds the same token, whatever its layer, head or kind
    (null, as -1, only where the model was given embeddings: then for all of them)."""
    import numpy as np

    if not token_rows:
        return []
    ids, pos, tok = (np.concatenate(parts) for parts in zip(*token_rows))
    order = np.lexsort((tok, pos, ids))
    ids, pos, tok = ids[order], pos[order], tok[order]
    clash = np.flatnonzero((ids[1:] == ids[:-1]) & (pos[1:] == pos[:-1]) & (tok[1:] != tok[:-1]))
    if not clash.size:
        return []
    i = clash[0]
    return [f"token_id: {clash.size} (example, position) pairs whose rows disagree on the token, e.g. example "
            f"{ids[i]} position {pos[i]}: {tok[i]} and {tok[i + 1]}"]


def source_token_problems(data: Dataset, token_rows: list, log) -> list[str]:
    """`token_id` against the source documents encoded again with the recorded tokenizer and
    settings, where the source dataset and tokenizer are available here (else one info line)."""
    import numpy as np

    source = data.manifest.get("source") or {}
    if not token_rows or not source.get("dataset") or not source.get("tokenizer"):
        return []
    try:
        encoded = _encode_source(data.manifest, source)
    except Exception as error:  # noqa: BLE001 - the source is optional for verify
        log(f"info: token ids not checked against the source dataset ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})")
        return []
    starts = data.first_positions()
    checked, wrong, first = 0, 0, None
    for ids, pos, tok in token_rows:  # each sorted by example: compare one example's run at a time
        bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            tokens = encoded.get(int(ids[lo]))
            if tokens is None:
                continue
            index = pos[lo:hi] - starts.get(int(ids[lo]), 0)
            inside = (index >= 0) & (index < len(tokens))
            want = np.full(hi - lo, -2, np.int64)
            want[inside] = np.asarray(tokens, np.int64)[index[inside]]
            bad = np.flatnonzero(want != tok[lo:hi])
            checked += hi - lo
            wrong += bad.size
            if bad.size and first is None:
                i = lo + bad[0]
                first = (int(ids[i]), int(pos[i]), int(tok[i]), int(want[bad[0]]) if inside[bad[0]] else None)
    log(f"checked {checked:,} token ids against {len(encoded)} source documents")
    if not wrong:
        return []
    e, p, got, expected = first
    return [f"token_id: {wrong} rows differ from the source documents encoded again, e.g. example {e} position "
            f"{p}: {got}, the tokenizer gives {expected}"]


def _encode_source(manifest: dict, source: dict) -> dict[int, list[int]]:
    """example_id -> the token ids of its source document (via the examples table's row index)."""
    from transformers import AutoTokenizer

    from qk_attn.demo import resolve_model
    from qk_attn.run.config import DatasetSection
    from qk_attn.run.runner import load_rows

    cfg = DatasetSection(path=source["dataset"], name=source.get("dataset_name"), split=source.get("split") or "train",
                         revision=source.get("dataset_revision"), text_column=source.get("text_column") or "text",
                         id_column=source.get("id_column"), sample_by=source.get("sample_by") or "document")
    rows = load_rows(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(source["tokenizer"], verbose=False),
                                              revision=source.get("tokenizer_revision"))
    out = {}
    for key, info in manifest.get("example_info", {}).items():
        if info.get("source_index") is None:
            continue
        text = rows[int(info["source_index"])][cfg.text_column] or ""
        out[int(key)] = tokenizer(text, truncation=True, max_length=source.get("max_length"),
                                  add_special_tokens=source.get("add_special_tokens", True))["input_ids"]
    return out


# ---- inspect ---------------------------------------------------------------------------------
def inspect_dataset(root: str | Path) -> list[str]:
    """Rows, coverage, bucket distribution and plot path, as printable lines (from the files;
    coverage reasons from the manifest, as the card states them)."""
    import numpy as np

    from qk_attn.storage.card import coverage

    data = Dataset.open(root)
    sampler = data.sampler()
    committed = data.committed()
    config = data.manifest.get("config", {})
    model = data.manifest.get("model") or {}
    rows: dict[str, Counter] = {"q": Counter(), "k": Counter()}  # kind -> bucket -> rows
    heads: dict[str, set] = {"q": set(), "k": set()}
    for key in data.folders:
        table = data.index(key)
        if table is None or table.num_rows == 0:
            continue
        values, counts = np.unique(table.column("bucket").to_numpy(), return_counts=True)
        rows[key[2]].update(dict(zip(values.tolist(), counts.tolist())))
        heads[key[2]].add(key[:2])
    total = {kind: sum(c.values()) for kind, c in rows.items()}
    lines = [
        f"dataset    {data.root}",
        f"model      {model.get('id')}  ({model.get('model_type')}, {model.get('dtype')})",
        f"sampler    {sampler.strategy}, min_bucket_size {sampler.min_bucket_size}, base_rate {sampler.base_rate:g}, "
        f"seed {sampler.seed}; {config.get('rope', 'post')}-RoPE; captured {config.get('capture')}",
        f"examples   {len(committed)} committed, {sum(committed.values()):,} valid tokens, "
        f"longest {max(committed.values(), default=0):,}",
        f"rows       {total['q'] + total['k']:,}: q {total['q']:,}, k {total['k']:,}",
    ]
    plan = data.manifest.get("plan")
    if plan:
        layers = plan["num_layers"]
        lines.append(f"coverage   q: {len(heads['q'])} (layer, head) pairs with rows of {layers} layers x {plan['num_heads']} "
                     f"query heads; k: {len(heads['k'])} of {layers} x {plan['num_kv_heads']} key heads")
        for line in coverage(data.manifest).get("missing", []):
            lines.append(f"           {line}")
    lines.append("buckets    bucket  positions              q rows      k rows   q per example-head")
    n_examples = max(1, len(committed))
    for b in sorted(set(rows["q"]) | set(rows["k"])):
        start = sampler.bucket_start(b)
        span = f"[{start:,}, {start + sampler.bucket_size(b):,})"
        per = rows["q"][b] / n_examples / max(1, len(heads["q"]))
        lines.append(f"           {b:>6}  {span:<20} {rows['q'][b]:>10,}  {rows['k'][b]:>10,}   {per:10.2f}")
    if data.bad:
        lines.append(f"damaged    {len(data.bad)} committed shard(s) missing or unreadable (not counted above); "
                     f"run `qk-sniff verify {data.root}`, then `qk-sniff repair {data.root}`")
    plots = data.plot_paths()
    why = "no rows committed" if not total["q"] + total["k"] else "the card is written when a capture closes"
    lines.append(f"plot       {plots[0] if plots else f'(none: {why})'}")
    if data.folders:
        layer, head, kind = min((k for k in data.folders if data.files(k)), key=lambda k: (k[0], k[1], k[2] == "k"),
                                default=(0, 0, "q"))
        lines.append(f"load       qk_attn.load({str(data.root)!r}, layer={layer}, head={head}, kind={kind!r})")
    return lines




# ---- repair ----------------------------------------------------------------------------------
def repair(output: str | Path, log=print) -> dict:
    """Make OUT sound again after files were damaged, lost or left behind, keeping every intact row.

    1. An unreadable or altered qk_sniff.json (its digest) is replaced by the previous one
       (PREVIOUS); shards committed after it become orphans.
    2. Files no manifest lists are removed: the writer's own orphans and temporary files (left by
       a killed run or compaction) are deleted, other Parquet files in the key folders are moved
       to OUT/.qk_sniff.quarantine/ (no reader sees them there).
    3. Every committed shard is checked (check_shard). Of a bad one, the row groups whose bytes
       still match their recorded digests (merged shards record one per row group) are kept; the
       examples of the others (of the whole shard, when it records none or its footer changed)
       are dropped from the manifest and their rows removed from every other shard (rewritten
       under a new name, row group by row group).
    4. The row counts, the examples table and the card are written again from what remains.
    Re-running the same capture then recaptures exactly the dropped examples.
    Returns {"restored", "bad": [lines], "dropped": [example ids], "tidied": [lines], "examples_rewritten"}.
    """
    import numpy as np
    import pyarrow as pa

    from qk_attn.storage.manifest import Files, part_files, release_lock
    from qk_attn.errors import NotACapture
    from qk_attn.storage.shards import read_verified, write_row_groups

    output = Path(output)
    if not output.is_dir():
        raise FileNotFoundError(f"{output} is not a folder")
    if not (output / MANIFEST).exists() and not (output / PREVIOUS).exists():
        raise NotACapture(f"{output} is not a qk-sniff dataset ({MANIFEST} is missing); nothing was changed")
    if part_files(output):
        raise StorageError(f"{output} was captured by several ranks (qk_sniff.rank*.json): repair is not supported "
                           "for it yet; restore the damaged shards from a copy or the Hub (qk-sniff pull)")
    fd = take_lock(output, LOCK)  # never repair under a running capture
    try:
        manifest, restored = _readable_manifest(output, log)
        manifest.setdefault("shard_info", {})
        manifest.setdefault("example_info", {})
        tidied = _tidy(output, manifest)
        for line in tidied:
            log(line)
        bad: dict[tuple[str, str], str] = {}
        for key, names in sorted(manifest["shards"].items()):
            for name in names:
                problem = check_shard(output, manifest, key, name)
                if problem:
                    bad[(key, name)] = problem
        lines = [shard_problem_line(output, manifest, key, name, p) for (key, name), p in sorted(bad.items())]
        for line in lines:
            log(line)
        salvaged: dict[tuple[str, str], list] = {}
        dropped: set[int] = set()
        for key, name in bad:
            salvaged[(key, name)], lost = _salvage(output, manifest, key, name)
            if lost is None:
                dropped |= set(shard_examples(manifest, key, name)) or _older_shard_examples(output, manifest, key, name, bad)
            else:
                dropped |= segment_examples(manifest, lost)
        examples_changed = bool(check_examples_file(output, manifest))
        if not bad and not restored and not examples_changed and not tidied:
            return {"restored": False, "bad": [], "dropped": [], "tidied": [], "examples_rewritten": False}

        files = Files()
        number = manifest["next_segment"]
        manifest["next_segment"] = number + 1
        drop = np.array(sorted(dropped), np.int64)
        removed: list[Path] = []
        part = 0
        for key, names in sorted(manifest["shards"].items()):
            kept = []
            for name in names:
                path = output / key / name
                if (key, name) in bad:
                    groups = salvaged[(key, name)]
                else:
                    if not len(drop) or not _holds_any(path, drop):
                        kept.append(name)
                        continue
                    parquet = read_verified(output, manifest, key, name)
                    segments = row_group_segments(manifest, key, name, parquet.num_row_groups)
                    segments = segments or [shard_segments(manifest, key, name)] * parquet.num_row_groups
                    groups = [(parquet.read_row_group(i), segments[i]) for i in range(parquet.num_row_groups)]
                removed.append(path)
                manifest["shard_info"].pop(f"{key}/{name}", None)
                groups = [(t.filter(pa.array(~np.isin(t.column("example_id").to_numpy(), drop))), s) for t, s in groups]
                groups = [(t, s) for t, s in groups if t.num_rows]
                if not groups:
                    continue
                new = files.shard(number, part)
                part += 1
                size, digest, rows, ranges, footer = write_row_groups([t for t, _ in groups], output / key / f".{new}.tmp", True)
                os.replace(output / key / f".{new}.tmp", output / key / new)
                fsync_dir(output / key)
                manifest["shard_info"][f"{key}/{new}"] = {
                    "bytes": size, "sha256": digest, "rows": rows, "segments": sorted({x for _, s in groups for x in s}),
                    "row_groups": [{"segments": s, **r} for (_, s), r in zip(groups, ranges)], "footer_sha256": footer}
                kept.append(new)
            manifest["shards"][key] = sorted(kept)
        for example in dropped:
            manifest["examples"].pop(str(example), None)
            manifest["example_info"].pop(str(example), None)
        _recount(output, manifest)
        size, digest = write_table(examples_table(manifest), output / f".{EXAMPLES}.tmp", True)
        os.replace(output / f".{EXAMPLES}.tmp", output / EXAMPLES)
        manifest["examples_file"] = {"name": EXAMPLES, "bytes": size, "sha256": digest}
        # The old manifest lists the shards removed next: it is no state to go back to.
        write_json_atomic(output / MANIFEST, manifest, previous_too=True)
        for path in removed:  # after the manifest: a crash before this leaves only orphans
            path.unlink(missing_ok=True)
        _write_card(output, manifest, log)
        if dropped:
            log(f"dropped {len(dropped)} example(s) from the manifest: {_ids_text(sorted(dropped))}; "
                "re-run the same capture command to record them again")
        return {"restored": restored, "bad": lines, "dropped": sorted(dropped), "tidied": tidied,
                "examples_rewritten": True}
    finally:
        release_lock(output, fd, LOCK)


def _readable_manifest(output: Path, log) -> tuple[dict, bool]:
    """(the manifest, whether it was restored from PREVIOUS because it was unreadable or altered)."""
    try:
        manifest = read_manifest(output)
    except ManifestError as error:
        log(f"{MANIFEST}: {str(error).split(' (', 1)[-1].split(');', 1)[0]}")
        manifest = None
    if manifest is not None:
        return manifest, False
    try:
        manifest = read_manifest(output, PREVIOUS)
    except ManifestError:
        manifest = None
    if manifest is None:
        raise ManifestError(f"{output / MANIFEST} is unreadable or altered and there is no intact previous manifest "
                            f"({PREVIOUS}) to restore; restore {MANIFEST} from a copy") from None
    log(f"restored {MANIFEST} from {PREVIOUS}: examples committed after it will be captured again")
    return manifest, True


def _tidy(output: Path, manifest: dict) -> list[str]:
    """Remove what no reader may see: this writer's unlisted shards and temporary files (a killed
    run's or compaction's leftovers) are deleted; other Parquet files in key folders are moved to
    OUT/.qk_sniff.quarantine/ (never deleted: someone else put them there)."""
    from qk_attn.storage.manifest import Files, remove_orphans

    lines = []
    removed = remove_orphans(output, manifest)
    if removed:
        lines.append(f"removed {len(removed)} file(s) that no commit lists (left by an interrupted run or "
                     f"compaction), e.g. {removed[0].relative_to(output)}")
    quarantine = output / QUARANTINE
    moved = []
    listed = {key: set(names) for key, names in manifest.get("shards", {}).items()}
    for folder in sorted(p for p in output.iterdir() if p.is_dir() and parse_key(p.name)):
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in listed.get(folder.name, ()) and not Files().owns(path.name):
                (quarantine / folder.name).mkdir(parents=True, exist_ok=True)
                os.replace(path, quarantine / folder.name / path.name)
                moved.append(path)
        if not any(folder.iterdir()) and not listed.get(folder.name):
            folder.rmdir()
    if moved:
        lines.append(f"moved {len(moved)} file(s) that the manifest does not list to {quarantine} (readers would "
                     f"have read them), e.g. {moved[0].relative_to(output)}")
    for leftover in (output / f".{MANIFEST}.tmp", output / f".{EXAMPLES}.tmp", output / f".{PREVIOUS}.tmp"):
        leftover.unlink(missing_ok=True)
    return lines


def _salvage(output: Path, manifest: dict, key: str, name: str) -> tuple[list, set[int] | None]:
    """Of a shard that failed its digest: ([(table, segments)] of the row groups whose bytes match
    their recorded sha256, segments of the others), or ([], None) when nothing is known intact
    (no per-row-group digests recorded, or the footer changed)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    info = manifest.get("shard_info", {}).get(f"{key}/{name}") or {}
    groups = info.get("row_groups")
    path = output / key / name
    if not groups or not info.get("footer_sha256") or not path.is_file():
        return [], None
    data = path.read_bytes()
    end = groups[-1]["offset"] + groups[-1]["bytes"]
    if hashlib.sha256(data[end:]).hexdigest() != info["footer_sha256"]:
        return [], None
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
        if parquet.num_row_groups != len(groups):
            return [], None
        kept, lost = [], set()
        for i, group in enumerate(groups):
            start = group["offset"]
            if hashlib.sha256(data[start:start + group["bytes"]]).hexdigest() == group["sha256"]:
                kept.append((parquet.read_row_group(i), list(group["segments"])))
            else:
                lost |= set(group["segments"])
    except Exception:  # noqa: BLE001 - an intact footer that cannot be read: nothing is known intact
        return [], None
    return kept, lost


def _holds_any(path: Path, examples) -> bool:
    import numpy as np
    import pyarrow.parquet as pq

    ids = pq.read_table(path, columns=["example_id"]).column("example_id").to_numpy()
    return bool(np.isin(ids, examples).any())


def _write_card(output: Path, manifest: dict, log) -> None:
    """The card follows the manifest (never over a README.md qk-sniff did not write)."""
    from qk_attn.storage.manifest import card_is_ours

    if not card_is_ours(output):
        log(f"info: {output}/README.md was not written by qk-sniff; the dataset card is not rewritten")
        return
    from qk_attn.storage.card import write_card

    write_card(output, manifest)


def _older_shard_examples(output: Path, manifest: dict, key: str, name: str, bad) -> set[int]:
    """The examples of a bad shard written before the manifest recorded them (no shard_info):
    those that readable older shards of the same segment (its name) hold in other folders, or,
    failing that, every committed example without a record (dropping too many only costs a
    recapture; dropping too few would leave a hole)."""
    import numpy as np
    import pyarrow.parquet as pq

    if f"{key}/{name}" in manifest.get("shard_info", {}):
        return set()  # a recorded shard of no committed example (all of them were dropped before)
    segments = set(shard_segments(manifest, key, name))
    found: set[int] = set()
    for other, names in manifest["shards"].items():
        for n in names:
            older = f"{other}/{n}" not in manifest.get("shard_info", {})
            if older and (other, n) not in bad and set(shard_segments(manifest, other, n)) & segments:
                ids = pq.read_table(output / other / n, columns=["example_id"]).column("example_id")
                found |= set(np.unique(ids.to_numpy()).tolist())
    return found or {int(e) for e in manifest["examples"] if e not in manifest.get("example_info", {})}


def _recount(output: Path, manifest: dict) -> None:
    """row_counts and buckets from the shards that remain (reads only the bucket column)."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest["row_counts"], manifest["buckets"] = {}, {}
    for key, names in manifest["shards"].items():
        for name in names:
            buckets = pq.read_table(output / key / name, columns=["bucket"]).column("bucket").to_numpy()
            manifest["row_counts"][key] = manifest["row_counts"].get(key, 0) + len(buckets)
            into = manifest["buckets"].setdefault(key[-1], {})
            for bucket, n in enumerate(np.bincount(buckets) if len(buckets) else []):
                if n:
                    into[str(bucket)] = into.get(str(bucket), 0) + int(n)


def repair_dataset(root: str | Path, log=print) -> int:
    """`qk-sniff repair OUT`: repair() with its report as lines, then every check of `verify`:
    exit status 0 exactly when verify passes afterwards (re-run the capture to fill what was
    dropped); 1 with each problem repair could not fix listed."""
    result = repair(root, log=log)
    problems = verify_dataset(root, log=lambda *_: None)
    for line in problems:
        log(f"still wrong: {line}")
    if problems:
        return 1
    if not (result["bad"] or result["restored"] or result["tidied"]):
        done = f"rewrote {EXAMPLES} from the manifest" if result["examples_rewritten"] else "nothing to repair"
        log(f"OK: every committed shard of {root} is intact; {done}")
    return 0
