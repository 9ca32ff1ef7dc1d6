"""Merging small committed shards of a folder into shards of about `shard_mb`.

A finalise writes one shard per folder, so a long capture collects many small shards. Merged
shards follow the commit protocol (qk_attn.storage.manifest): written under a temporary name, fsync'd,
renamed, then the manifest lists them instead of the small ones, and only then are the small
ones deleted, so a crash at any point leaves at most orphans that the next open (or `repair`)
removes. Every part is read only after its bytes match the manifest's sha256 (a damaged part
is never copied into a merged shard: its group is left as it is, for verify and repair).
A merged shard keeps its parts' row groups and records the segments of each
(`shard_info[...]["row_groups"]`), so the examples of a shard, and of each of its row groups,
stay known from the manifest alone: damage to one row group costs only its examples. When a merged
shard is merged again, its row groups are joined up to JOIN_BYTES, so that the row groups of a
folder, and their records in the manifest, grow with its bytes and not with the number of finalises.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from qk_attn.errors import CorruptShard
from qk_attn.storage.records import row_group_segments, shard_info
from qk_attn.storage.shards import Written, read_verified, write_row_groups

# Row groups of a shard merged before are joined, when it is merged again, into row groups of up to
# this many bytes: a part's own row group is kept the first time (damage costs its segment only), but a
# long capture's merged shard would otherwise gain a row group, and a manifest record, per finalise.
JOIN_BYTES = 1 << 20


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
    """Write the rows of `group` as `folder/.name.tmp`, one row group per row group read, except that
    those of shards merged before are joined up to JOIN_BYTES (a writer thread runs this).
    `CorruptShard` when a part fails its digest: nothing is written then."""
    tables, row_groups, joined = [], [], []  # joined: (bytes, whether a later merged group may join it)
    for n in group:
        parquet = read_verified(folder.parent, manifest, key, n)
        segments = row_group_segments(manifest, key, n, parquet.num_row_groups)
        if segments is None:
            raise CorruptShard(f"{folder / n}: its row groups differ from the manifest's record")
        recorded = manifest.get("shard_info", {}).get(f"{key}/{n}", {}).get("row_groups")
        for i in range(parquet.num_row_groups):
            table, size = parquet.read_row_group(i), recorded[i]["bytes"] if recorded else None
            if size is not None and joined and joined[-1][1] and joined[-1][0] + size <= JOIN_BYTES:
                tables[-1].append(table)  # merged before: joined with the previous row group
                row_groups[-1] = sorted(set(row_groups[-1]) | set(segments[i]))
                joined[-1] = (joined[-1][0] + size, True)
            else:
                tables.append([table])
                row_groups.append(list(segments[i]))
                joined.append((size or 0, size is not None))
    tables = [pa.concat_tables(parts) if len(parts) > 1 else parts[0] for parts in tables]
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
