"""The manifest's records of committed shards: what a shard holds, by segment and by example.

A *segment* is what one manifest update commits: every example committed in it has all its
rows in shards of that segment (a merged shard lists every segment it holds), so the
examples a shard holds are the examples of its segments, even when the shard is unreadable.
"""

from __future__ import annotations

from qk_attn.storage.layout import shard_segment


def shard_info(written) -> dict:
    """The manifest's record of one shard (a qk_attn.storage.shards.Written). A merged shard also records
    the segments of each row group (`row_groups`), so damage to one row group costs its examples only."""
    info = {"bytes": written.bytes, "sha256": written.sha256, "rows": written.rows, "segments": written.segments}
    if written.row_groups is not None:
        info["row_groups"], info["footer_sha256"] = written.row_groups, written.footer_sha256
    return info


def row_group_segments(manifest: dict, key: str, name: str, groups: int) -> list[list[int]] | None:
    """The segments of each of a shard's `groups` row groups; None when the record disagrees with the file."""
    info = manifest.get("shard_info", {}).get(f"{key}/{name}") or {}
    recorded = info.get("row_groups")
    if recorded is not None:
        return [list(group["segments"]) for group in recorded] if len(recorded) == groups else None
    return [shard_segments(manifest, key, name)] * groups


def segment_examples(manifest: dict, segments) -> set[int]:
    """The committed examples of these segments."""
    segments = set(segments)
    return {int(e) for e, i in manifest.get("example_info", {}).items() if i.get("segment") in segments}


def add_shard(manifest: dict, written) -> None:
    """List a newly committed shard: its name, record, rows and bucket counts."""
    key = written.key
    manifest["shards"].setdefault(key, []).append(written.name)
    manifest["shard_info"][f"{key}/{written.name}"] = shard_info(written)
    manifest["row_counts"][key] = manifest["row_counts"].get(key, 0) + written.rows
    kind_buckets = manifest["buckets"].setdefault(key[-1], {})
    for bucket, n in written.buckets.items():
        kind_buckets[str(bucket)] = kind_buckets.get(str(bucket), 0) + n


def shard_segments(manifest: dict, key: str, name: str) -> list[int]:
    """The segments whose examples a committed shard holds rows of. Shards written before
    `shard_info` existed: the segment in the shard's name."""
    info = manifest.get("shard_info", {}).get(f"{key}/{name}")
    if info is not None:
        return list(info.get("segments", ()))
    segment = shard_segment(name)
    return [] if segment is None else [segment]


def shard_examples(manifest: dict, key: str, name: str) -> list[int]:
    """The examples a committed shard holds rows of, from the manifest alone (so also for a
    shard that is unreadable or gone). Empty for datasets written before `example_info`."""
    segments = set(shard_segments(manifest, key, name))
    return sorted(int(e) for e, i in manifest.get("example_info", {}).items() if i.get("segment") in segments)
