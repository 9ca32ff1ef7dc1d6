"""`qk-sniff verify`: every check of a capture folder against its manifest and the sampler.

    verify_dataset(OUT, encode_source=None, progress=True) -> problems
        integrity (size, sha256, Parquet page checksums) of every committed shard and of the
        examples table, then schema, uniqueness, manifest counts, buckets, the sampler's exact
        selection and token ids (one token per (example, position) in every row; the source
        documents encoded again when the caller gives `encode_source`: qk_attn.dataset.token_checks);
        a bar on stderr for each pass: shards (integrity), folders (rows), folders (selections)

verify only reports: nothing it reads is copied anywhere. See docs/architecture.md.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from qk_attn.dataset.progress import bar
from qk_attn.dataset.reader import INDEX_COLUMNS, Dataset, check_integrity
from qk_attn.dataset.token_checks import EncodeSource, source_token_problems, token_id_problems
from qk_attn.errors import ManifestError
from qk_attn.storage.card import card_problem
from qk_attn.storage.card_columns import head_dims
from qk_attn.storage.layout import LOCK, MANIFEST, PREVIOUS, key_name, parse_key
from qk_attn.storage.lock import lock_held
from qk_attn.storage.records import shard_examples


def expected_positions(
    sampler, layer: int, kind: str, lengths: dict[int, int], chunk: int = 1 << 22, starts: dict[int, int] | None = None
):
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


def verify_dataset(
    root: str | Path, log=print, encode_source: EncodeSource | None = None, progress: bool = True
) -> list[str]:
    """Every check of `qk-sniff verify`; returns the problems found (empty: the dataset is sound).
    Without `encode_source` the token ids are not checked against the source documents (one info line).
    `progress`: a tqdm bar on stderr for each pass (shards checked, folders read, folders held to the
    sampler's selection), as `qk-sniff run` shows its own; False (`--quiet`): none."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from qk_attn.capture.schema import arrow_schema

    root = Path(root)
    if root.is_dir() and not (root / MANIFEST).exists() and (root / PREVIOUS).is_file():
        return [  # a capture whose manifest was lost: damage repair mends, not a folder of someone else's
            f"{root / MANIFEST} is missing, but the previous manifest {PREVIOUS} is there: run `qk-sniff repair "
            f"{root}` to restore it (examples committed after it are captured again by the next run)"
        ]
    try:
        data = Dataset.open(root)
    except ManifestError as error:  # altered or unreadable: nothing it lists can be trusted
        return [str(error)]
    # A capture writing the folder now has shards it has not committed yet, rewrites its examples table at
    # most every minute, and writes its card at close.
    live = lock_held(root / LOCK)
    if live:
        log(
            f"info: a capture is writing {root} now (it holds {LOCK}): checked what it has committed so far; "
            "its uncommitted shards, its examples table and its card (written when it closes) are not checked"
        )
    shards = sum(len(names) for names in data.manifest.get("shards", {}).values())
    with bar("qk-sniff verify: shards", "shard", progress, shards) as shard_bar:
        integrity, bad, no_digest = check_integrity(data, shard_bar, examples=not live)
    card = None if live else card_problem(root, data.manifest)
    if card:
        integrity = [*integrity, f"{card}; `qk-sniff repair {root}` (or the next run of the capture) writes it"]
    # Shards that cannot be read are left out of the content checks; one whose bytes changed but
    # still reads is checked as well (its content problems say what changed). verify only reports:
    # nothing it reads is copied anywhere.
    data.bad = {f for f in bad if not f.is_file() or _unreadable(f)}
    problems: list[str] = list(integrity)
    if no_digest:
        log(
            f"info: {no_digest} shard(s) have no recorded size/digest (written by an older qk-attn): "
            "checked that they read with their page checksums only"
        )
    # Examples held by a bad shard: their other checks would only repeat the same problem.
    damaged = {e for f in data.bad for e in shard_examples(data.manifest, f.parent.name, f.name)}
    damaged_folders = {f.parent.name for f in data.bad}
    sampler = data.sampler()
    committed = {e: n for e, n in data.committed().items() if e not in damaged}
    manifest_counts = data.row_counts()
    plan = data.plan()
    # Keys of cross-attention layers are vision tokens: no text positions or token ids to hold them to.
    vision_keys = {(layer, "k") for layer in data.manifest.get("cross_attention_layers", [])}
    seen_counts: dict[str, int] = {}
    # (layer, kind) -> {folder name: {example_id: sorted positions}}
    selections: dict[tuple[int, str], dict[str, dict[int, Any]]] = defaultdict(dict)
    token_rows: list = []  # (example ids, positions, token ids) per folder, for the token check
    seen_buckets: dict[str, Counter] = defaultdict(Counter)  # kind -> bucket -> rows in the files

    # The vector type the manifest (and the card) states: every shard holds it (older manifests: the shard's own).
    stated_dim = (data.manifest.get("plan") or {}).get("head_dim")
    stated_type = {"float32": pa.float32(), "float16": pa.float16()}.get(data.manifest.get("vector_dtype"))
    # The plan states the first layer's head size; Gemma 4's global layers have another. Where some
    # folder holds the stated size, each layer is held to the size of its first folder instead.
    first_dims = {key: dim for key, dim in head_dims(root, data.manifest).items() if parse_key(key)}
    layer_dim: dict[int, int] = {}
    if stated_dim in first_dims.values():
        for key, dim in sorted(first_dims.items()):
            layer_dim.setdefault(parse_key(key)[0], dim)
    for key, folder in bar("qk-sniff verify: folders", "folder", progress, iterable=data.folders.items()):
        layer, head, kind = key
        name = folder.name
        files = data.files(key)
        stray = [] if live else data.stray_files(key)
        if stray:
            problems.append(
                f"{name}: {len(stray)} Parquet file(s) not listed in the manifest (a glob reader such as "
                f"datasets.load_dataset would read them), e.g. {stray[0].name}"
            )
        for f in (f for f in files if f.is_file() and f not in data.bad):
            schema = pq.read_schema(f)
            vector = schema.field("vector").type if "vector" in schema.names else None
            dim = getattr(vector, "list_size", -1)  # a changed footer may make it any type
            want = (
                arrow_schema(layer_dim.get(layer, stated_dim) or dim, stated_type or vector.value_type)
                if dim > 0
                else None
            )
            base = [schema.field(n) for n in schema.names if n not in ("token_id", "token_str")]
            if want is None or [(f_.name, f_.type) for f_ in base] != [(w.name, w.type) for w in want]:
                problems.append(
                    f"{f.relative_to(data.root)}: schema {schema.to_string(show_schema_metadata=False)!r} "
                    f"differs from the dataset schema"
                )
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
        seen_buckets[kind].update(dict(enumerate(np.bincount(bucket).tolist())))
        want_bucket = sampler.bucket_of(torch.from_numpy(pos)).numpy()
        bad = np.flatnonzero(want_bucket != bucket)
        if bad.size:
            i = bad[0]
            problems.append(
                f"{name}: {bad.size} rows have a bucket inconsistent with their position "
                f"(e.g. position {pos[i]} in bucket {bucket[i]}, expected {want_bucket[i]})"
            )
        order = np.lexsort((pos, ids))
        ids, pos = ids[order], pos[order]
        dup = np.flatnonzero((ids[1:] == ids[:-1]) & (pos[1:] == pos[:-1]))
        if dup.size:
            problems.append(
                f"{name}: {dup.size} duplicate (example, position) rows, e.g. example {ids[dup[0]]} "
                f"position {pos[dup[0]]}"
            )
        uncommitted = set(np.unique(ids).tolist()) - set(committed) - damaged
        if uncommitted:
            problems.append(
                f"{name}: rows of {len(uncommitted)} example(s) the manifest does not list as committed, "
                f"e.g. {sorted(uncommitted)[:3]}"
            )
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        selections[(layer, kind)][name] = {int(ids[s]): pos[s:e] for s, e in zip(starts, ends)}
        if "token_id" in table.column_names and (layer, kind) not in vision_keys:
            tokens = table.column("token_id").to_numpy(zero_copy_only=False)[order]
            token_rows.append(
                (
                    ids,
                    pos,
                    np.where(np.isnan(tokens), -1, tokens).astype(np.int64)
                    if tokens.dtype.kind == "f"
                    else tokens.astype(np.int64),
                )
            )

    problems += token_id_problems(token_rows)
    problems += source_token_problems(data, token_rows, log, encode_source)

    # Row counts: the manifest against the files (both directions).
    for name in sorted(set(manifest_counts) | set(seen_counts)):
        if name in damaged_folders:
            continue
        if manifest_counts.get(name, 0) != seen_counts.get(name, 0):
            problems.append(
                f"{name}: the manifest records {manifest_counts.get(name, 0)} rows, the files hold "
                f"{seen_counts.get(name, 0)}"
            )

    # Bucket counts: the card and chart are drawn from the manifest's, so they must be the files'.
    if not damaged_folders:
        for kind in sorted(set(seen_buckets) | set(data.manifest.get("buckets", {}))):
            recorded = {int(b): n for b, n in data.manifest.get("buckets", {}).get(kind, {}).items() if n}
            held = {b: n for b, n in seen_buckets[kind].items() if n}
            if recorded != held:
                b = min(b for b in set(recorded) | set(held) if recorded.get(b, 0) != held.get(b, 0))
                problems.append(
                    f"the manifest's bucket counts of kind {kind!r} differ from the files' (the card and chart show "
                    f"the manifest's), e.g. bucket {b}: manifest {recorded.get(b, 0)}, files {held.get(b, 0)}"
                )

    # Exact selection: for each committed example, every recorded (layer, head, kind) holds
    # exactly the sampler's positions for that example's valid length. Planned heads with no
    # folder at all must then have selected nothing.
    # A planned head that received attention calls but has no folder selected nothing (possible
    # at low rates); one without calls never ran (e.g. a sliding-window layer skipped by
    # full_attention_only) and is the card's coverage business, not an error here.
    calls = data.manifest.get("calls", {})
    expected_keys = set(data.folders)
    if plan is not None:
        expected_keys |= {
            (layer, head, kind)
            for (layer, kind), heads in plan.items()
            for head in heads
            if calls.get(key_name(layer, head, kind), 0) > 0
        }
    pairs = sorted({(layer, kind) for layer, _, kind in expected_keys} - vision_keys)
    held = sum((layer, kind) in pairs for layer, _, kind in expected_keys)
    with bar("qk-sniff verify: selections", "folder", progress, held) as selection_bar:
        for layer, kind in pairs:
            want = expected_positions(sampler, layer, kind, committed, starts=data.first_positions())
            if kind == "q":  # a layer given only the last queries of a forward: without those it did not get
                for e, spans in data.unseen_queries(layer).items():
                    if e in want:
                        want[e] = want[e][~np.any([(want[e] >= a) & (want[e] < b) for a, b in spans], axis=0)]
            heads = sorted(h for (lay, h, k) in expected_keys if lay == layer and k == kind)
            for head in heads:
                selection_bar.update(1)
                name = key_name(layer, head, kind)
                if name in damaged_folders and not damaged:  # an old dataset: no per-shard examples to exclude
                    continue
                got = selections.get((layer, kind), {}).get(name, {})
                # A cross-attention layer runs only in forwards with an image: a text-only example has no rows there.
                skippable = kind == "q" and (layer, "k") in vision_keys
                wrong = [
                    e
                    for e, positions in want.items()
                    if not (
                        np.array_equal(got.get(e, np.empty(0, np.int64)), positions) or (skippable and e not in got)
                    )
                ]
                if wrong:
                    e = wrong[0]
                    problems.append(
                        f"{name}: {len(wrong)} example(s) whose positions differ from the sampler's selection, e.g. "
                        f"example {e} (valid length {committed[e]}): recorded {len(got.get(e, []))} positions, "
                        f"expected {len(want[e])}"
                    )
    empty = len(expected_keys - set(data.folders))
    log(
        f"checked {len(data.folders)} (layer, head, kind) folders, {sum(seen_counts.values()):,} rows, "
        f"{len(committed)} committed examples"
        + (f" checked ({len(damaged & data.committed().keys())} more in damaged shards)" if damaged else "")
        + (
            f"; {empty} (layer, head, kind) that ran with 0 rows, checked against the sampler's selection too"
            if empty
            else ""
        )
    )
    return problems


def _unreadable(path: Path) -> bool:
    """Whether a shard fails to read with its page checksums (then its content is not checked)."""
    import pyarrow.parquet as pq

    try:
        pq.read_table(path, page_checksum_verification=True)
    except Exception:  # noqa: BLE001
        return True
    return False
