"""Opening an output folder safely: whose files it holds, what a killed run left.

A sink opens OUT under the writer's lock (qk_attn.storage.lock), refuses a folder of someone else's
files or of another capture, and removes the orphans of a killed run before it writes
(`open_capture`); `remove_dataset` deletes exactly what a capture wrote.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from qk_attn.errors import DamagedDataset, NotACapture, StorageError
from qk_attn.storage.examples import check_examples_file
from qk_attn.storage.layout import (
    CARD,
    CARD_FILES,
    EXAMPLES,
    LOCK,
    MANIFEST,
    PART_EXAMPLES_RE,
    PART_FILES_RE,
    PREVIOUS,
    Files,
    parse_key,
    part_files,
    previous_name,
    shard_segment,
)
from qk_attn.storage.manifest import new_manifest, read_manifest, record_run, sha256_file, write_json_atomic
from qk_attn.storage.settings import check_same_capture, record_latest_run

logger = logging.getLogger(__name__)


def open_capture(
    output: Path,
    files: Files,
    config,
    source: dict | None,
    overwrite: bool,
    columns: dict,
    fsync: bool,
    vocabulary_sha256: str | None = None,
) -> tuple[dict, list[Path]]:
    """The commit protocol's open step, under the writer's lock: refuse what must not be
    touched or mixed, remove what `overwrite` or a killed run left, and write the manifest
    (which also proves OUT is writable). Returns (manifest, orphans removed)."""
    check_is_capture(output, files)  # never write into (or clean) a folder of someone else's files
    if overwrite:
        remove_dataset(output, files)
    else:  # (under overwrite another rank may not have removed its old files yet)
        check_layout(output, files)
    manifest = read_manifest(output, files.manifest)
    if manifest is not None and not manifest["examples"] and files.rank is None:
        # Nothing committed (a run refused at its first forward): nothing to mix, so this run's settings.
        manifest = None
    if manifest is not None:
        check_same_capture(output, manifest, config, source)
        check_shard_sizes(output, manifest, digests=True)
        record_latest_run(manifest, config, source)
        manifest.setdefault("example_info", {})
        manifest.setdefault("shard_info", {})
        # A merge before the merged numbering was respected left next_segment below its renumbered
        # segments: this run's commits would share their numbers (and their shards' examples).
        used = [info["segment"] for info in manifest["example_info"].values() if "segment" in info]
        used += [s for info in manifest["shard_info"].values() for s in info.get("segments", ())]
        manifest["next_segment"] = max([manifest["next_segment"], *(s + 1 for s in used)])
    else:
        manifest = new_manifest(config, source)
    record_run(manifest, files.rank)  # `versions`: the latest run's; `release_history`: every run's, with its commits
    old = manifest.setdefault(
        "columns", columns if not manifest["examples"] else {"token_id": False, "token_str": False}
    )
    if old != columns:  # one schema per dataset
        raise StorageError(
            f"{output} was captured with optional columns {old}; this run would write {columns} "
            "(token ids / vocabulary): use the same setting, another output directory, or overwrite=True"
        )
    check_same_vocabulary(output, manifest, vocabulary_sha256)
    if files.rank is not None:
        manifest["part"] = {"rank": files.rank, "world_size": files.world_size, "complete": False}
        # This rank changes what a merge wrote (its shards, compacted or overwritten): `qk-sniff merge`
        # writes it again from the parts, and until then no reader is given a manifest that lies.
        for name in (MANIFEST, PREVIOUS, EXAMPLES):
            (output / name).unlink(missing_ok=True)
    removed = remove_orphans(output, manifest, files)
    write_json_atomic(output / files.manifest, manifest, fsync)
    return manifest, removed


def check_same_vocabulary(output: Path, manifest: dict, digest: str | None) -> None:
    """One vocabulary per dataset: `token_str` is the vocabulary's string of `token_id`, so another
    list would give one id two strings. Captures made before the digest was kept cannot be checked."""
    there = manifest.get("vocabulary_sha256", digest)
    if manifest["examples"] and there != digest:
        raise StorageError(
            f"{output} was captured with another vocabulary (token_str strings, sha256 {str(there)[:12]}...) than "
            f"this run's (sha256 {str(digest)[:12]}...): one token id would get two strings; use the same "
            "vocabulary, another output directory, or overwrite=True"
        )
    manifest["vocabulary_sha256"] = digest


def check_is_capture(output: Path, files: Files) -> None:
    """A folder with files but no manifest is not a capture: refuse it (even under overwrite),
    so that no file the capture did not write is ever overwritten or deleted."""
    if (output / files.manifest).exists() or (output / MANIFEST).exists() or part_files(output):
        return
    ours = {LOCK, files.lock}
    foreign = sorted(p.name for p in output.iterdir() if p.name not in ours and not p.name.startswith(".qk_sniff."))
    if foreign:
        raise NotACapture(
            f"{output} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and holds no "
            f"{MANIFEST}: refusing to write a capture into it; choose a new or empty output folder"
        )


def check_shard_sizes(output: Path, manifest: dict, digests: bool = False) -> None:
    """Before resuming: every committed shard exists with its recorded size (a cheap stat, made
    before the weights load) and, with `digests`, its recorded sha256 (when a sink opens the folder:
    a resumed run must never build on, or compact, a damaged shard). A damaged folder is refused
    with how to repair it."""
    bad = []
    for key, names in manifest.get("shards", {}).items():
        for name in names:
            path = output / key / name
            info = manifest.get("shard_info", {}).get(f"{key}/{name}", {})
            size = info.get("bytes")
            if not path.is_file() or (size is not None and path.stat().st_size != size):
                bad.append(f"{key}/{name}")
            elif digests and info.get("sha256") and sha256_file(path) != info["sha256"]:
                bad.append(f"{key}/{name}")
    if bad:
        raise DamagedDataset(
            f"{output}: {len(bad)} committed shard(s) are missing, truncated or altered (e.g. {bad[0]}); run "
            f"`qk-sniff repair {output}` to drop the examples they hold, then re-run to capture them again"
        )


def check_layout(output: Path, files: Files) -> None:
    """One folder is written either by one process or by ranks of one world size, never both."""
    parts = part_files(output)
    if files.rank is None:
        if parts:
            raise ValueError(
                f"{output} holds a capture written by ranks ({len(parts)} manifest part(s), e.g. {min(parts.values()).name}); "
                "resume it with the same launcher (torchrun / accelerate launch / --shard i/n), merge it with "
                f"`qk-sniff merge {output}`, or pass overwrite=True to start over"
            )
        return
    merged = read_manifest(output)
    if (
        merged is not None
        and merged.get("examples")
        and (merged.get("ranks") or {}).get("world_size") != files.world_size
    ):
        how = f"{merged['ranks']['world_size']} ranks" if merged.get("ranks") else "a single process"
        raise ValueError(
            f"{output} holds a capture written by {how}; this is rank {files.rank} of {files.world_size}. "
            "Resume with the same number of ranks, use another output directory, or overwrite."
        )
    lost = [name for name in ((merged or {}).get("ranks") or {}).get("parts", []) if not (output / name).exists()]
    if merged is not None and merged.get("examples") and lost:  # a pulled copy: only the merged manifest lists them
        raise ValueError(
            f"{output} holds a merged capture without its manifest parts ({', '.join(lost)}), a pulled copy perhaps; "
            "a rank would delete the shards only the merged manifest lists: resume it with a single process "
            "(no launcher, no --shard), or use another output directory"
        )
    for rank, path in sorted(parts.items()):
        other = (read_manifest(output, path.name) or {}).get("part") or {}
        if other.get("world_size") != files.world_size:
            raise ValueError(
                f"{output}: {path.name} was written by rank {rank} of {other.get('world_size')}, this is rank {files.rank} "
                f"of {files.world_size}; documents are assigned by rank and world size, so resume with the same number "
                "of ranks (or use another output directory, or overwrite)"
            )


def remove_orphans(output: Path, manifest: dict, files: Files = Files()) -> list[Path]:
    """Delete this writer's shards that its manifest does not list (left by a killed run) and
    emptied folders (the single writer only: other ranks may be creating a folder right now)."""
    removed = []
    listed = {key: set(names) for key, names in manifest.get("shards", {}).items()}
    for folder in output.iterdir():
        if not folder.is_dir() or parse_key(folder.name) is None:
            continue
        for path in folder.iterdir():
            if path.is_file() and path.name not in listed.get(folder.name, ()) and files.owns(path.name):
                path.unlink()
                removed.append(path)
        if files.rank is None and not any(folder.iterdir()):
            folder.rmdir()
    if removed:
        logger.info("qk-sniff: removed %d uncommitted shard(s) of an interrupted run in %s", len(removed), output)
    return removed


def has_leftovers(output: Path) -> bool:
    """What a killed run (or compaction) leaves that the next open of the folder makes good: shards
    or temporary files no commit lists, an examples table behind the manifest, its lock file, no card, or a card of
    ours older than the manifest (a run killed before or while it wrote the card, which comes last)."""
    manifest = read_manifest(output)
    if manifest is None:
        return False
    card = output / CARD
    if not card.exists() or check_examples_file(output, manifest):
        return True
    if (output / Files().lock).exists():  # a killed writer's (taking it refuses one still held)
        return True
    if card.stat().st_mtime_ns < (output / MANIFEST).stat().st_mtime_ns and card_is_ours(output):
        return True
    listed = {key: set(names) for key, names in manifest.get("shards", {}).items()}
    return any(
        path.name not in listed.get(folder.name, ()) and Files().owns(path.name)
        for folder in output.iterdir()
        if folder.is_dir() and parse_key(folder.name)
        for path in folder.iterdir()
    )


RANK_FILES = (PART_FILES_RE, PART_EXAMPLES_RE)  # what a single writer's overwrite deletes of ranks'


def remove_dataset(output: Path, files: Files = Files()) -> None:
    """Delete what a capture wrote into OUT (and nothing else). A rank deletes only its own
    shards and manifest part; rank 0 also the merged manifest, the card and single-writer shards."""
    _refuse_foreign_parquet(output)
    if files.rank is None:
        for child in output.iterdir():
            if child.is_dir() and parse_key(child.name) is not None:
                for path in child.iterdir():  # shards of any writer; a file of the user's own stays
                    if path.is_file() and _is_shard(path.name):
                        path.unlink()
                if not any(child.iterdir()):
                    child.rmdir()
            elif child.name in (EXAMPLES, *CARD_FILES) or any(r.fullmatch(child.name) for r in RANK_FILES):
                if child.name != CARD or card_is_ours(output):  # a README of the user's own stays
                    child.unlink()
        # The manifests last: a removal interrupted before them leaves a capture that overwrite or repair
        # knows (its manifest), never a folder of qk-sniff's files that every command refuses as not one.
        for name in (PREVIOUS, MANIFEST):
            (output / name).unlink(missing_ok=True)
        return
    owners = [files] + ([Files()] if files.rank == 0 else [])
    for folder in output.iterdir():
        if folder.is_dir() and parse_key(folder.name) is not None:
            for path in folder.iterdir():
                if path.is_file() and any(owner.owns(path.name) for owner in owners):
                    path.unlink()
    for name in (
        [files.examples]
        + ([EXAMPLES, *CARD_FILES, PREVIOUS, MANIFEST] if files.rank == 0 else [])
        + [
            previous_name(files.manifest),
            files.manifest,  # (last, as above)
        ]
    ):
        if name != CARD or card_is_ours(output):  # a README of the user's own stays
            (output / name).unlink(missing_ok=True)


def _refuse_foreign_parquet(output: Path) -> None:
    """Parquet files of the user's own in a (layer, head, kind) folder stay when a capture is removed, and the
    card's configs read every *.parquet there (`datasets.load_dataset`): the new capture's rows would be mixed
    with theirs. Refused before anything is deleted."""
    foreign = [
        f"{folder.name}/{path.name}"
        for folder in output.iterdir()
        if folder.is_dir() and parse_key(folder.name) is not None
        for path in folder.iterdir()
        if path.is_file() and path.suffix == ".parquet" and not _is_shard(path.name)
    ]
    if foreign:
        raise NotACapture(
            f"{output}/{foreign[0]}{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''} is no shard "
            "qk-attn wrote, in a folder whose *.parquet files the dataset card's configs read: overwrite would keep "
            "it and mix its rows into the new capture; move it out of the output folder"
        )


def _is_shard(name: str) -> bool:
    """A shard (or its temporary file) of any writer: the single writer's or a rank's."""
    name = name[1:-4] if name.startswith(".") and name.endswith(".parquet.tmp") else name
    return shard_segment(name) is not None


CARD_SIGNATURE = "<!-- qk-sniff wrote this card; sha256 of the text above: {} -->"


def signed_card(text: str) -> str:
    """The card's text with a last line that tells an untouched card from one the user edited."""
    return text + CARD_SIGNATURE.format(hashlib.sha256(text.encode()).hexdigest()) + "\n"


def card_is_ours(output: Path) -> bool:
    """README.md is absent or a card qk-sniff wrote and nobody edited since: a user's own README,
    or a card the user edited, is never overwritten (delete it to have the card written again).
    Cards written before cards were signed are recognised by their tag and attn_implementation."""
    path = Path(output) / CARD
    if not path.exists():
        return True
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    prefix = CARD_SIGNATURE.split("{}")[0]
    if last.startswith(prefix):
        return signed_card(body + "\n") == text
    return "qk-attn" in text and "qk_sniff" in text and prefix[:20] not in text
