"""What repair tidies away: the files in a capture folder that no manifest lists (readers would read them).

A writer's own leftovers (the orphans and temporary files of a killed run or of compaction) are
deleted; any other file in a key folder is someone else's and is moved to OUT/.qk_sniff.quarantine/,
never deleted. qk_attn.dataset.repair tidies each writer's files before it checks their shards; in a
folder written by ranks it quarantines once, after every rank's part is repaired.
"""

from __future__ import annotations

import os
from pathlib import Path

from qk_attn.storage.folder import remove_orphans
from qk_attn.storage.layout import QUARANTINE, Files, parse_key, previous_name


def tidy(output: Path, manifest: dict, files: Files) -> list[str]:
    """Remove what no reader may see: this writer's unlisted shards and temporary files (a killed
    run's or compaction's leftovers) are deleted; for the single writer, other Parquet files in key
    folders are moved to OUT/.qk_sniff.quarantine/ (ranks: once, after every part)."""
    lines = []
    removed = remove_orphans(output, manifest, files)
    if removed:
        lines.append(
            f"removed {len(removed)} file(s) that no commit lists (left by an interrupted run or "
            f"compaction), e.g. {removed[0].relative_to(output)}"
        )
    if files.rank is None:
        listed = {key: set(names) for key, names in manifest.get("shards", {}).items()}
        lines += quarantine_unlisted(output, listed, files.owns)
    for name in (files.manifest, files.examples, previous_name(files.manifest)):
        (output / f".{name}.tmp").unlink(missing_ok=True)
    return lines


def quarantine_unlisted(output: Path, listed: dict[str, set[str]], owned) -> list[str]:
    """Move the files in key folders that are neither listed nor `owned` (a writer's own name) to
    OUT/.qk_sniff.quarantine/: never deleted, someone else put them there."""
    quarantine = output / QUARANTINE
    moved = []
    for folder in sorted(p for p in output.iterdir() if p.is_dir() and parse_key(p.name)):
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in listed.get(folder.name, ()) and not owned(path.name):
                (quarantine / folder.name).mkdir(parents=True, exist_ok=True)
                os.replace(path, quarantine / folder.name / path.name)
                moved.append(path)
        if not any(folder.iterdir()) and not listed.get(folder.name):
            folder.rmdir()
    if not moved:
        return []
    return [
        f"moved {len(moved)} file(s) that the manifest does not list to {quarantine} (kept there: not "
        f"qk-sniff's to delete), e.g. {moved[0].relative_to(output)}"
    ]
