"""`qk-sniff repair`: make a damaged capture folder sound again, keeping every intact row.

    repair(OUT) -> report               restore the manifest, tidy unlisted files, drop the examples
                                        a bad or missing shard holds (and their rows everywhere else),
                                        write counts, examples table and card again
    repair_dataset(OUT) -> exit code    repair(), then every check of `verify`

Both take `progress` (default True): tqdm bars on stderr over the shards checked and, when there
is something to mend, over the folders rewritten, then verify's; False (`--quiet`): none.

Re-running the same capture afterwards recaptures exactly the dropped examples. See
docs/architecture.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from qk_attn.dataset.progress import bar
from qk_attn.dataset.reader import check_shard, ids_text, not_a_folder, shard_problem_line
from qk_attn.dataset.salvage import holds_any, older_shard_examples, recount, salvage, scale_calls
from qk_attn.dataset.tidy import quarantine_unlisted, tidy
from qk_attn.dataset.token_checks import EncodeSource
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import ManifestError, NotACapture, StorageError
from qk_attn.storage.card import card_problem
from qk_attn.storage.examples import check_examples_file, write_examples
from qk_attn.storage.folder import card_is_ours
from qk_attn.storage.layout import (
    CARD,
    EXAMPLES,
    LOCK,
    MANIFEST,
    PREVIOUS,
    Files,
    part_ranks,
    previous_name,
)
from qk_attn.storage.lock import release_lock, take_lock
from qk_attn.storage.manifest import fsync_dir, read_manifest, write_json_atomic
from qk_attn.storage.records import row_group_segments, segment_examples, shard_examples, shard_segments


def repair(output: str | Path, log=print, progress: bool = True) -> dict:
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
       the attention calls (`calls`) are reduced by the dropped examples' share (`scale_calls`).
    Re-running the same capture then recaptures exactly the dropped examples.

    A folder written by ranks has each rank's manifest part repaired the same way, under every
    rank's lock (`_repair_ranks`); a merged manifest that no longer matches its parts is taken
    away, for `qk-sniff merge` to write again.
    Returns {"restored", "bad": [lines], "dropped": [example ids], "tidied": [lines], "examples_rewritten"}
    (for ranks also "merge": the command that makes OUT readable again, or None).
    """
    output = Path(output)
    if (why := not_a_folder(output)) is not None:
        raise FileNotFoundError(f"{why}; expected a qk-sniff dataset folder")
    ranks = part_ranks(output)
    if ranks:
        return _repair_ranks(output, ranks, log, progress)
    if not (output / MANIFEST).exists() and not (output / PREVIOUS).exists():
        raise NotACapture(f"{output} is not a qk-sniff dataset ({MANIFEST} is missing); nothing was changed")
    fd = take_lock(output, LOCK)  # never repair under a running capture
    try:
        return _repair_writer(output, Files(), log, progress=progress)
    finally:
        release_lock(output, fd, LOCK)


def _repair_ranks(output: Path, ranks: list[int], log, progress: bool = True) -> dict:
    """Each rank's part repaired as a writer of its own (its manifest, previous manifest, examples
    table and `rRRR-` shards), then Parquet files no rank owns quarantined. A part that lost
    examples (dropped or restored from its previous version) is marked incomplete, so `merge`
    waits for that rank's re-run; a merged manifest is kept only while every part is unchanged."""
    names = [LOCK] + [Files(rank).lock for rank in ranks]
    locks: list[tuple[int, str]] = []
    try:
        for name in names:  # as merge: no rank may be writing
            locks.append((take_lock(output, name), name))
        merged = _merged_manifest(output)
        if merged is not None and merged.get("examples") and not merged.get("ranks"):
            raise StorageError(
                f"{output}/{MANIFEST} is a single process's capture, but {output} also holds rank parts "
                f"(ranks {ranks}): two captures in one folder; nothing was changed: move one of them out"
            )
        results = {}
        for rank in ranks:
            results[rank] = _repair_writer(output, Files(rank), log, card=False, progress=progress)
        # Shards the merged manifest lists stay, also those of a rank whose part is gone.
        listed = {key: set(names) for key, names in ((merged or {}).get("shards") or {}).items()}
        tidied = quarantine_unlisted(output, listed, lambda name: any(Files(rank).owns(name) for rank in ranks))
        for line in tidied:
            log(line)
        changed = any(r["restored"] or r["bad"] or r["dropped"] or r["tidied"] for r in results.values())
        if merged is not None and not changed and check_examples_file(output, merged):
            write_examples(output, merged)  # the merged export behind its manifest: written again
            write_json_atomic(output / MANIFEST, merged)
            results[ranks[0]]["examples_rewritten"] = True
        if (changed or merged is None) and any((output / n).exists() for n in (MANIFEST, PREVIOUS, EXAMPLES)):
            for name in (MANIFEST, PREVIOUS, EXAMPLES):
                (output / name).unlink(missing_ok=True)
            log(f"took the merged {MANIFEST} away: it listed what the parts no longer hold")
        incomplete = [
            rank
            for rank in ranks
            if not (read_manifest(output, Files(rank).manifest) or {}).get("part", {}).get("complete")
        ]
    finally:
        for fd, name in reversed(locks):
            release_lock(output, fd, name)
    merge = None
    if not (output / MANIFEST).exists():
        merge = f"qk-sniff merge {output}"
        if incomplete:
            merge = f"re-run ranks {incomplete} (the same command resumes them), then `{merge}`"
    return {
        "restored": any(r["restored"] for r in results.values()),
        "bad": [line for r in results.values() for line in r["bad"]],
        "dropped": sorted(e for r in results.values() for e in r["dropped"]),
        "tidied": [line for r in results.values() for line in r["tidied"]] + tidied,
        "examples_rewritten": any(r["examples_rewritten"] for r in results.values()),
        "merge": merge,
    }


def _merged_manifest(output: Path) -> dict | None:
    try:
        return read_manifest(output)
    except ManifestError:
        return None


def _repair_writer(output: Path, files: Files, log, card: bool = True, progress: bool = True) -> dict:
    """repair() of one writer's files: the single writer's, or one rank's part (`files`)."""
    import numpy as np
    import pyarrow as pa

    from qk_attn.storage.shards import read_verified, write_row_groups

    manifest, restored = _readable_manifest(output, files, log)
    manifest.setdefault("shard_info", {})
    manifest.setdefault("example_info", {})
    tidied = tidy(output, manifest, files)
    for line in tidied:
        log(line)
    bad: dict[tuple[str, str], str] = {}
    who = "" if files.rank is None else f" (rank {files.rank})"
    shards = sum(len(names) for names in manifest["shards"].values())
    with bar(f"qk-sniff repair{who}: shards", "shard", progress, shards) as shard_bar:
        for key, names in sorted(manifest["shards"].items()):
            for name in names:
                problem = check_shard(output, manifest, key, name)
                if problem:
                    bad[(key, name)] = problem
                shard_bar.update(1)
    lines = [shard_problem_line(output, manifest, key, name, p) for (key, name), p in sorted(bad.items())]
    for line in lines:
        log(line)
    salvaged: dict[tuple[str, str], list] = {}
    dropped: set[int] = set()
    for key, name in bad:
        salvaged[(key, name)], lost = salvage(output, manifest, key, name)
        if lost is None:
            dropped |= set(shard_examples(manifest, key, name)) or older_shard_examples(
                output, manifest, key, name, bad
            )
        else:
            dropped |= segment_examples(manifest, lost)
    examples_changed = bool(check_examples_file(output, manifest))
    if not bad and not restored and not examples_changed and not tidied:
        stale = card and card_problem(output, manifest)
        if stale:  # a run stopped between its last manifest and its card
            _write_card(output, manifest, log)
            log(f"wrote {CARD} again: {stale}")
        return {
            "restored": False,
            "bad": [],
            "dropped": [],
            "tidied": [f"wrote {CARD}"] if stale else [],
            "examples_rewritten": False,
        }

    number = manifest["next_segment"]
    manifest["next_segment"] = number + 1
    drop = np.array(sorted(dropped), np.int64)
    removed: list[Path] = []
    part = 0
    for key, names in bar(
        f"qk-sniff repair{who}: rewrite", "folder", progress, iterable=sorted(manifest["shards"].items())
    ):
        kept = []
        for name in names:
            path = output / key / name
            if (key, name) in bad:
                groups = salvaged[(key, name)]
            else:
                if not len(drop) or not holds_any(path, drop):
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
    if (dropped or restored) and "part" in manifest:  # the rank has documents to capture again before a merge
        manifest["part"]["complete"] = False
    scale_calls(manifest, before)
    recount(output, manifest)
    write_examples(output, manifest, files.examples)
    # The old manifest lists the shards removed next: it is no state to go back to.
    write_json_atomic(output / files.manifest, manifest, previous_too=True)
    for path in removed:  # after the manifest: a crash before this leaves only orphans
        path.unlink(missing_ok=True)
    if card:
        _write_card(output, manifest, log)
    if dropped:
        log(
            f"dropped {len(dropped)} example(s) from {files.manifest}: {ids_text(sorted(dropped))}; "
            "re-run the same capture command to record them again"
        )
    return {
        "restored": restored,
        "bad": lines,
        "dropped": sorted(dropped),
        "tidied": tidied,
        "examples_rewritten": True,
    }


def _readable_manifest(output: Path, files: Files, log) -> tuple[dict, bool]:
    """(the writer's manifest, whether it was restored from its previous version because it was
    unreadable or altered)."""
    name, previous = files.manifest, previous_name(files.manifest)
    try:
        manifest = read_manifest(output, name)
    except ManifestError as error:
        log(f"{name}: {str(error).split(' (', 1)[-1].split(');', 1)[0]}")
        manifest = None
    if manifest is not None:
        return manifest, False
    try:
        manifest = read_manifest(output, previous)
    except ManifestError:
        manifest = None
    if manifest is None:
        again = "" if files.rank is None else f", or re-run rank {files.rank} with output.overwrite: true"
        raise ManifestError(
            f"{output / name} is unreadable, altered or missing and there is no intact previous manifest "
            f"({previous}) to restore; restore {name} from a copy{again}"
        ) from None
    log(f"restored {name} from {previous}: examples committed after it will be captured again")
    return manifest, True


def _write_card(output: Path, manifest: dict, log) -> None:
    """The card follows the manifest (never over a README.md qk-sniff did not write)."""
    if not card_is_ours(output):
        log(f"info: {output}/README.md was not written by qk-sniff; the dataset card is not rewritten")
        return
    from qk_attn.storage.card import write_card

    write_card(output, manifest)


def repair_dataset(
    root: str | Path, log=print, encode_source: EncodeSource | None = None, progress: bool = True
) -> int:
    """`qk-sniff repair OUT`: repair() with its report as lines, then every check of `verify`
    (given `encode_source` as verify is): exit status 0 exactly when verify passes afterwards
    (re-run the capture to fill what was dropped); 1 with each problem repair could not fix listed."""
    result = repair(root, log=log, progress=progress)
    if result.get("merge"):  # ranks whose merged manifest was taken away: verify reads a merged folder
        log(f"the rank parts of {root} are sound; next: {result['merge']}")
        return 0
    problems = verify_dataset(root, log=lambda *_: None, encode_source=encode_source, progress=progress)
    for line in problems:
        log(f"still wrong: {line}")
    if problems:
        return 1
    if not (result["bad"] or result["restored"] or result["tidied"]):
        done = f"rewrote {EXAMPLES} from the manifest" if result["examples_rewritten"] else "nothing to repair"
        log(f"OK: every committed shard of {root} is intact; {done}")
    return 0
