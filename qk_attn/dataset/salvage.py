"""What a repair keeps of damaged shards, and the counts it writes again.

    salvage(OUT, manifest, key, name)    a bad shard's row groups whose bytes match their digests
    holds_any(path, ids)                 whether a shard holds rows of any of the examples
    older_shard_examples(...)            the examples of a bad shard written before shard_info existed
    scale_calls(manifest, before)        `calls` without the dropped examples' share
    recount(OUT, manifest)               row_counts and buckets from the shards that remain

Used by qk_attn.dataset.repair.
"""

from __future__ import annotations

from pathlib import Path

from qk_attn.storage.records import shard_segments


def salvage(output: Path, manifest: dict, key: str, name: str) -> tuple[list, set[int] | None]:
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
            if hashlib.sha256(data[start : start + group["bytes"]]).hexdigest() == group["sha256"]:
                kept.append((parquet.read_row_group(i), list(group["segments"])))
            else:
                lost |= set(group["segments"])
    except Exception:  # noqa: BLE001 - an intact footer that cannot be read: nothing is known intact
        return [], None
    return kept, lost


def holds_any(path: Path, examples) -> bool:
    import numpy as np
    import pyarrow.parquet as pq

    ids = pq.read_table(path, columns=["example_id"]).column("example_id").to_numpy()
    return bool(np.isin(ids, examples).any())


def older_shard_examples(output: Path, manifest: dict, key: str, name: str, bad) -> set[int]:
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


def scale_calls(manifest: dict, before: int) -> None:
    """`calls` without the dropped examples' calls: each key's count times the share of the
    `before` committed examples that remain. The manifest counts calls per key, not per example or
    segment, so this is exact when the examples made the same number of calls each (`qk-sniff run`:
    one forward per document at batch size 1, or per batch of equal size), and otherwise the
    nearest estimate; a key that ran keeps at least one call while examples remain (coverage
    reads `calls` to tell heads that ran with no row from heads that did not run). A re-run of
    the dropped examples adds their calls back."""
    after = len(manifest["examples"])
    if after == before or not before:
        return
    scaled = {}
    for key, n in manifest.get("calls", {}).items():
        if after and n:
            scaled[key] = max(1, (n * after * 2 + before) // (before * 2))  # rounded half up, integers only
    manifest["calls"] = scaled


def recount(output: Path, manifest: dict) -> None:
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
