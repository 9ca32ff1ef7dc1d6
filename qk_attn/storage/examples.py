"""The examples table: OUT/examples.parquet, one row per committed example, an export of the manifest.

    examples_table(manifest) -> Table       example_id, source_id, source_index, valid_length, first_position
    write_examples(OUT, manifest, name)     writes it (tmp + rename) and records its size and sha256
                                            in the manifest's `examples_file`
    check_examples_file(OUT, manifest)      what is wrong with the file on disk, or None

qk_attn readers use the manifest itself; the file is for `datasets` and other glob readers. The
saver rewrites it at most every minute and at close, so a killed run can leave it behind the
manifest: the next run and `qk-sniff repair` write it again. See docs/architecture.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from qk_attn.storage.layout import EXAMPLES
from qk_attn.storage.manifest import sha256_file
from qk_attn.storage.shards import write_table

# Every column compressed: ids and source ids, one row per example (the shards compress only their vectors,
# positions and token ids).
OPTIONS = dict(compression="zstd", compression_level=1, write_statistics=["example_id"], write_page_checksum=True)


def examples_table(manifest: dict):
    """One row per committed example: example_id, source_id, source_index, valid_length, first_position."""
    import pyarrow as pa

    ids = sorted(int(e) for e in manifest.get("examples", {}))
    info = manifest.get("example_info", {})
    get = lambda field: [info.get(str(e), {}).get(field) for e in ids]  # noqa: E731
    return pa.table(
        {
            "example_id": pa.array(ids, pa.int64()),
            "source_id": pa.array(get("source_id"), pa.string()),
            "source_index": pa.array(get("source_index"), pa.int64()),
            "valid_length": pa.array([int(manifest["examples"][str(e)]) for e in ids], pa.int64()),
            "first_position": pa.array(get("first_position"), pa.int64()),
        }
    )


def write_examples(output: Path, manifest: dict, name: str = EXAMPLES, fsync: bool = True) -> None:
    """OUT/name from the manifest (tmp + rename), recorded in `manifest["examples_file"]`; the
    manifest itself is the caller's to write next (the record is checked against it)."""
    path = Path(output) / name
    tmp = path.with_name(f".{path.name}.tmp")
    size, digest = write_table(examples_table(manifest), tmp, fsync, OPTIONS)
    os.replace(tmp, path)
    manifest["examples_file"] = {"name": path.name, "bytes": size, "sha256": digest}


def check_examples_file(root: Path, manifest: dict) -> str | None:
    """OUT/examples.parquet against the digest the manifest records for it, and its rows against
    the manifest's committed examples (an export written at most every minute: a killed run leaves
    it behind; the next run and `repair` rewrite it)."""
    import pyarrow.parquet as pq

    record = manifest.get("examples_file")
    if not record:  # written before the examples table existed
        return None
    path = Path(root) / record["name"]
    if not path.is_file() or path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
        return (
            f"{path.name}: missing or changed since it was written (the examples table); `qk-sniff repair` rewrites it"
        )
    try:
        same = pq.read_table(path, page_checksum_verification=True).equals(examples_table(manifest))
    except Exception:  # noqa: BLE001 - unreadable is as wrong as different
        same = False
    if not same:
        return (
            f"{path.name}: lags the manifest (the examples table does not list exactly the {len(manifest['examples'])} "
            "committed examples); the next run or `qk-sniff repair` rewrites it"
        )
    return None
