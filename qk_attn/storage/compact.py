"""Merging small committed shards of a folder into shards of about `shard_mb`.

A finalise writes one shard per folder, so a long capture collects many small shards. Merged
shards follow the commit protocol (qk_attn.storage.manifest): written under a temporary name, fsync'd,
renamed, then the manifest lists them instead of the small ones, and only then are the small
ones deleted, so a crash at any point leaves at most orphans that the next open (or `repair`)
removes. Every part is read only after its bytes match the manifest's sha256 (a damaged part
is never copied into a merged shard: its group is left as it is, for verify and repair).
A merged shard keeps its parts' row groups and records the segments of each
(`shard_info[...]["row_groups"]`), so the examples of a shard, and of each of its row groups,
stay known from the manifest alone: damage to one row group costs only its examples.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qk_attn.errors import CorruptShard
from qk_attn.storage.records import row_group_segments, shard_info
from qk_attn.storage.shards import Written, read_verified, write_row_groups


def plan(manifest: dict, output: Path, shard_bytes: int, at_least: int) -> list[tuple[str, list[str]]]:
    """(folder, small shards to merge into one) for folders with `at_least` shards under
    shard_bytes / 2; groups of at most about shard_bytes."""
    info = manifest.get("shard_info", {})
    jobs = []
    for key, names in manifest["shards"].items():
        sizes = {n: info.get(f"{key}/{n}", {}).get("bytes") or (output / key / n).stat().st_size for n in names}
        small = [n for n in names if sizes[n] < shard_bytes // 2]
        if len(small) < max(2, at_least):
            continue
        groups, group, total = [], [], 0
        for name in small:
            if group and total + sizes[name] > shard_bytes:
                groups.append(group)
                group, total = [], 0
            group.append(name)
            total += sizes[name]
        groups.append(group)
        jobs += [(key, g) for g in groups if len(g) > 1]
    return jobs


def merge(folder: Path, group: list[str], name: str, key: str, manifest: dict) -> Written:
    """Write the rows of `group` as `folder/.name.tmp`, one row group per row group read (a writer
    thread runs this). `CorruptShard` when a part fails its digest: nothing is written then."""
    tables, row_groups = [], []
    for n in group:
        parquet = read_verified(folder.parent, manifest, key, n)
        segments = row_group_segments(manifest, key, n, parquet.num_row_groups)
        if segments is None:
            raise CorruptShard(f"{folder / n}: its row groups differ from the manifest's record")
        tables += [parquet.read_row_group(i) for i in range(parquet.num_row_groups)]
        row_groups += segments
    tmp = folder / f".{name}.tmp"
    try:
        size, digest, rows, ranges, footer = write_row_groups(tables, tmp, False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    segments = sorted({s for group_segments in row_groups for s in group_segments})
    groups = [{"segments": s, **r} for s, r in zip(row_groups, ranges)]
    return Written(key, name, rows, size, digest, Counter(), segments, groups, footer)


def apply(manifest: dict, output: Path, merged: list[tuple[str, list[str], Written]]) -> list[Path]:
    """List the renamed merged shards in `manifest` instead of their parts (row counts and
    buckets do not change); returns the parts, to delete once the manifest is written."""
    replaced = []
    for key, group, written in merged:
        for n in group:
            manifest["shards"][key].remove(n)
            manifest["shard_info"].pop(f"{key}/{n}", None)
            replaced.append(output / key / n)
        manifest["shards"][key] = sorted(manifest["shards"][key] + [written.name])
        manifest["shard_info"][f"{key}/{written.name}"] = shard_info(written)
    return replaced
