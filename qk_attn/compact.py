"""Merging small committed shards of a folder into shards of about `shard_mb`.

A finalise writes one shard per folder, so a long capture collects many small shards. Merged
shards follow the commit protocol (qk_attn.manifest): written under a temporary name, fsync'd,
renamed, then the manifest lists them instead of the small ones, and only then are the small
ones deleted, so a crash at any point leaves at most orphans that the next open removes.
A merged shard records every segment it holds (`shard_info[...]["segments"]`), so the examples
of a shard stay known from the manifest alone.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import shard_info, shard_segments
from .shards import Written, write_table


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
    """Write the rows of `group` as `folder/.name.tmp` (a writer thread runs this)."""
    table = pa.concat_tables(pq.read_table(folder / n) for n in group)
    size, digest = write_table(table, folder / f".{name}.tmp", False)
    segments = sorted({s for n in group for s in shard_segments(manifest, key, n)})
    return Written(key, name, table.num_rows, size, digest, Counter(), segments)


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
