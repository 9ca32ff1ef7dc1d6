"""Which releases (qk-attn, torch, transformers, ...) recorded which examples of a capture folder.

A folder resumed by runs under other releases (users upgrade) holds rows of each. The manifest's
`versions` is the latest run's; `release_history` lists every *span*: consecutive runs of one
writer under one set of versions, so it grows with release changes, not with runs or examples:

    {"versions": {...}, "first_segment": s, "runs": n, "started": t}
        + "rank": r             in a rank's manifest part (and, merged, in qk_sniff.json)
        + "before_history": true  examples committed before the folder kept a history: recorded as
                                the versions of the latest run before (earlier runs may have differed)

A span's examples are those whose `example_info[id]["segment"]` lies from its `first_segment` up to
the next span's of the same writer (runs number their commits from the manifest's `next_segment` on).
A merged manifest numbers rank r's segment s as s * world_size + r (qk_attn.run.distributed), its
spans keep the rank's numbering; a run that resumes the merged folder numbers its segments above them.
"""

from __future__ import annotations

from qk_attn.storage.coverage import markdown_table

HISTORY = "release_history"


def record_release(manifest: dict, rank: int | None, current: dict, stamp: str) -> None:
    """A run opens the folder: `versions` becomes `current` (the latest run's) and the run joins the
    writer's last span when that span has the same versions, or starts a new one."""
    history = manifest.get(HISTORY)
    if history is None:
        history = manifest[HISTORY] = []
        if manifest.get("examples"):  # committed before the history was kept
            history.append(_before_history(manifest, rank))
    manifest["versions"] = current
    last = next((span for span in reversed(history) if span.get("rank") == rank), None)
    if last is not None and last["versions"] == current and not last.get("before_history"):
        last["runs"] += 1
        return
    span = {"versions": current, "first_segment": manifest.get("next_segment", 0), "runs": 1, "started": stamp}
    history.append(span if rank is None else {**span, "rank": rank})


def merged_history(parts: dict[int, dict]) -> list[dict]:
    """A merge's `release_history`: every rank's spans (each names its rank and keeps its numbering); a
    part written before the history was kept gets its own `before_history` span, under its versions."""
    history = []
    for rank, part in sorted(parts.items()):
        spans = part.get(HISTORY)
        if spans is None and part.get("examples"):
            spans = [_before_history(part, rank)]
        history += spans or ()
    return history


def _before_history(manifest: dict, rank: int | None) -> dict:
    """The span of the examples a folder (or rank part) committed before it kept a history: under the
    versions it last recorded, which earlier runs may not have had."""
    span = {"versions": manifest.get("versions") or {}, "first_segment": 0, "runs": None, "started": None}
    return {**span, **({} if rank is None else {"rank": rank}), "before_history": True}


def release_examples(manifest: dict) -> tuple[list[tuple[dict, list[int]]], list[int]]:
    """([(versions, sorted example ids)] of every distinct set of versions that committed examples, in
    order of first use, [examples no span covers]): those of a folder written before its example_info
    or history was kept, or a merge of parts without a history."""
    history = manifest.get(HISTORY) or []
    by_writer: dict = {}
    for index, span in enumerate(history):
        by_writer.setdefault(span.get("rank"), []).append((span["first_segment"], index))
    for spans in by_writer.values():
        spans.sort()
    part = manifest.get("part") or {}
    world = (manifest.get("ranks") or {}).get("world_size")

    def span_of(segment: int) -> int | None:
        if part:
            places = [(part.get("rank"), segment)]
        else:
            # A merged folder resumed by one process: its spans start above every merged segment
            # (the merge's next_segment), so they are asked first.
            places = [(None, segment)] + ([(segment % world, segment // world)] if world else [])
        for rank, local in places:
            found = [index for first, index in by_writer.get(rank, ()) if first <= local]
            if found:
                return found[-1]  # the latest span that began at or before it
        return None

    sets: list[tuple[dict, list[int]]] = []
    unknown = []
    info = manifest.get("example_info") or {}
    for example in sorted(int(e) for e in manifest.get("examples", {})):
        segment = (info.get(str(example)) or {}).get("segment")
        index = None if segment is None else span_of(int(segment))
        if index is None:
            unknown.append(example)
            continue
        versions = history[index]["versions"]
        ids = next((ids for v, ids in sets if v == versions), None)
        if ids is None:
            sets.append((versions, ids := []))
        ids.append(example)
    return sets, unknown


def provenance_versions(manifest: dict) -> tuple[list[list], str]:
    """The card's provenance: (rows `[package, version]` for its table, text after the table). One set of
    versions recorded every example: its rows, no text, as before the history was kept; several, or examples
    whose release is not recorded: no rows, and a table of every set with the examples it recorded."""
    sets, unknown = release_examples(manifest)
    if len(sets) < 2 and not unknown:
        versions = sets[0][0] if sets else manifest.get("versions", {})
        return [[name, f"`{version}`"] for name, version in sorted(versions.items())], ""
    names = sorted({name for versions, _ in sets for name in versions})
    latest = None if manifest.get("ranks") else manifest.get("versions")  # ranks of a merge run side by side
    rows = [
        [f"{i}{' (latest run)' if versions == latest else ''}", f"{len(ids):,}", _ids(ids)]
        + [f"`{versions[name]}`" if name in versions else "-" for name in names]
        for i, (versions, ids) in enumerate(sets, 1)
    ]
    if unknown:
        rows.append(["not recorded", f"{len(unknown):,}", _ids(unknown)] + ["-"] * len(names))
    before = any(span.get("before_history") for span in manifest.get(HISTORY) or ())
    lead = (
        f"**Recorded by {len(sets)} different releases.** Runs under different versions of qk-attn and the "
        "packages below resumed this capture, so its rows come from several releases; all rows of one example "
        "come from one release:"
        if len(sets) > 1
        else "**The release that recorded some examples is not known** (they were committed before the folder "
        "kept its release history, or merged from parts without one); the release of the others:"
    )
    text = (
        lead
        + "\n\n"
        + markdown_table(["release", "examples", "example ids", *names], rows)
        + "\n\nAn example's release, in `qk_sniff.json`: its `segment` (`example_info`) against the `first_segment` "
        "of each span of `release_history` (a span's examples run up to the next span of the same writer)."
        + (
            " Examples committed before the folder kept this history are listed under the versions of the "
            "latest run before it (`before_history`): earlier runs may have used other versions."
            if before
            else ""
        )
    )
    return [], text


def _ids(ids: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids) - limit:,} more)" if len(ids) > limit else "")
