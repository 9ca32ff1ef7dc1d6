"""`qk-sniff repair`: make a damaged capture folder sound again, keeping every intact row.

    repair(OUT) -> report               restore the manifest, tidy unlisted files, drop the examples
                                        a bad or missing shard holds (and their rows everywhere else),
                                        write counts, examples table and card again
    repair_dataset(OUT) -> exit code    repair(), then every check of `verify`

Re-running the same capture afterwards recaptures exactly the dropped examples. See
docs/architecture.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from qk_attn.dataset.reader import check_shard, ids_text, shard_problem_line
from qk_attn.dataset.verify import EncodeSource, verify_dataset
from qk_attn.errors import ManifestError, NotACapture, StorageError
from qk_attn.storage.examples import check_examples_file, write_examples
from qk_attn.storage.folder import card_is_ours, release_lock, remove_orphans, take_lock
from qk_attn.storage.layout import EXAMPLES, LOCK, MANIFEST, PREVIOUS, QUARANTINE, Files, parse_key, part_files
from qk_attn.storage.manifest import fsync_dir, read_manifest, write_json_atomic
from qk_attn.storage.records import row_group_segments, segment_examples, shard_examples, shard_segments


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
    4. The row counts, the examples table and the card are written again from what remains, and
       the attention calls (`calls`) are reduced by the dropped examples' share (`_scale_calls`).
    Re-running the same capture then recaptures exactly the dropped examples.
    Returns {"restored", "bad": [lines], "dropped": [example ids], "tidied": [lines], "examples_rewritten"}.
    """
    import numpy as np
    import pyarrow as pa

    from qk_attn.storage.shards import read_verified, write_row_groups

    output = Path(output)
    if not output.is_dir():
        raise FileNotFoundError(f"{output} is not a folder")
    if not (output / MANIFEST).exists() and not (output / PREVIOUS).exists():
        raise NotACapture(f"{output} is not a qk-sniff dataset ({MANIFEST} is missing); nothing was changed")
    if part_files(output):
        raise StorageError(
            f"{output} was captured by several ranks (qk_sniff.rank*.json): repair is not supported "
            "for it yet; restore the damaged shards from a copy or the Hub (qk-sniff pull)"
        )
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
                dropped |= set(shard_examples(manifest, key, name)) or _older_shard_examples(
                    output, manifest, key, name, bad
                )
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
                size, digest, rows, ranges, footer = write_row_groups(
                    [t for t, _ in groups], output / key / f".{new}.tmp", True
                )
                os.replace(output / key / f".{new}.tmp", output / key / new)
                fsync_dir(output / key)
                manifest["shard_info"][f"{key}/{new}"] = {
                    "bytes": size,
                    "sha256": digest,
                    "rows": rows,
                    "segments": sorted({x for _, s in groups for x in s}),
                    "row_groups": [{"segments": s, **r} for (_, s), r in zip(groups, ranges)],
                    "footer_sha256": footer,
                }
                kept.append(new)
            manifest["shards"][key] = sorted(kept)
        before = len(manifest["examples"])
        for example in dropped:
            manifest["examples"].pop(str(example), None)
            manifest["example_info"].pop(str(example), None)
        _scale_calls(manifest, before)
        _recount(output, manifest)
        write_examples(output, manifest)
        # The old manifest lists the shards removed next: it is no state to go back to.
        write_json_atomic(output / MANIFEST, manifest, previous_too=True)
        for path in removed:  # after the manifest: a crash before this leaves only orphans
            path.unlink(missing_ok=True)
        _write_card(output, manifest, log)
        if dropped:
            log(
                f"dropped {len(dropped)} example(s) from the manifest: {ids_text(sorted(dropped))}; "
                "re-run the same capture command to record them again"
            )
        return {
            "restored": restored,
            "bad": lines,
            "dropped": sorted(dropped),
            "tidied": tidied,
            "examples_rewritten": True,
        }
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
        raise ManifestError(
            f"{output / MANIFEST} is unreadable or altered and there is no intact previous manifest "
            f"({PREVIOUS}) to restore; restore {MANIFEST} from a copy"
        ) from None
    log(f"restored {MANIFEST} from {PREVIOUS}: examples committed after it will be captured again")
    return manifest, True


def _tidy(output: Path, manifest: dict) -> list[str]:
    """Remove what no reader may see: this writer's unlisted shards and temporary files (a killed
    run's or compaction's leftovers) are deleted; other Parquet files in key folders are moved to
    OUT/.qk_sniff.quarantine/ (never deleted: someone else put them there)."""
    lines = []
    removed = remove_orphans(output, manifest)
    if removed:
        lines.append(
            f"removed {len(removed)} file(s) that no commit lists (left by an interrupted run or "
            f"compaction), e.g. {removed[0].relative_to(output)}"
        )
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
        lines.append(
            f"moved {len(moved)} file(s) that the manifest does not list to {quarantine} (readers would "
            f"have read them), e.g. {moved[0].relative_to(output)}"
        )
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
            if hashlib.sha256(data[start : start + group["bytes"]]).hexdigest() == group["sha256"]:
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


def _scale_calls(manifest: dict, before: int) -> None:
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


def repair_dataset(root: str | Path, log=print, encode_source: EncodeSource | None = None) -> int:
    """`qk-sniff repair OUT`: repair() with its report as lines, then every check of `verify`
    (given `encode_source` as verify is): exit status 0 exactly when verify passes afterwards
    (re-run the capture to fill what was dropped); 1 with each problem repair could not fix listed."""
    result = repair(root, log=log)
    problems = verify_dataset(root, log=lambda *_: None, encode_source=encode_source)
    for line in problems:
        log(f"still wrong: {line}")
    if problems:
        return 1
    if not (result["bad"] or result["restored"] or result["tidied"]):
        done = f"rewrote {EXAMPLES} from the manifest" if result["examples_rewritten"] else "nothing to repair"
        log(f"OK: every committed shard of {root} is intact; {done}")
    return 0
