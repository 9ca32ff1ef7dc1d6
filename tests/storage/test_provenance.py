"""A folder resumed under other releases (transformers, torch, qk-attn upgraded between runs) says
which release recorded which examples: the manifest keeps every set of versions that wrote it
(`release_history`), the card lists them when there are several, and a folder written by one
release has the card it always had."""

from __future__ import annotations

import re

import pyarrow.parquet as pq

from qk_attn.dataset.verify import verify_dataset
from qk_attn.run import distributed
from qk_attn.storage import manifest as manifest_module
from qk_attn.storage.manifest import read_manifest, write_json_atomic
from qk_attn.storage.provenance import release_examples
from support.storage import capture_model, folder_table, open_sink, run_examples

REAL = manifest_module.versions()
NEWER = {**REAL, "transformers": "9.1.0", "qk_attn": "9.0.0"}  # a second release, as an upgrade installs it


def release(monkeypatch, versions: dict) -> None:
    """The runs from here on run under `versions` (the single source of a run's versions)."""
    monkeypatch.setattr(manifest_module, "versions", lambda: dict(versions))


def provenance(out) -> str:
    return (out / "README.md").read_text().split("## Provenance")[1]


def version_rows(versions: dict) -> str:
    return "\n".join(f"| {name} | `{version}` |" for name, version in sorted(versions.items()))


def test_a_folder_resumed_under_another_release_says_which_release_recorded_which_examples(tmp_path, monkeypatch):
    out = tmp_path / "out"
    capture_model(out, batches=((0, 1),))
    first = read_manifest(out)
    release(monkeypatch, NEWER)
    capture_model(out, batches=((2, 3),))
    release(monkeypatch, REAL)  # and back (a downgrade): a third span, the first release's set again
    manifest = capture_model(out, batches=((4, 5),))

    assert manifest["versions"] == REAL  # the latest run's, as before
    spans = [{k: v for k, v in span.items() if k != "started"} for span in manifest["release_history"]]
    second = first["next_segment"]
    assert spans[0] == {"versions": REAL, "first_segment": 0, "runs": 1}
    assert spans[1]["versions"] == NEWER and spans[1]["first_segment"] == second and spans[1]["runs"] == 1
    assert spans[2]["versions"] == REAL and spans[2]["first_segment"] > second
    assert release_examples(manifest) == ([(REAL, [0, 1, 4, 5]), (NEWER, [2, 3])], [])

    # every example's rows are in the folder and verify passes: only the record changed
    table = folder_table(out)
    assert set(table["example_id"].to_pylist()) == {0, 1, 2, 3, 4, 5}
    examples = pq.read_table(out / "examples.parquet")
    assert sorted(examples["example_id"].to_pylist()) == [0, 1, 2, 3, 4, 5]
    assert verify_dataset(out, log=lambda *_: None) == []

    text = provenance(out)
    assert "**Recorded by 2 different releases.**" in text and "rows come from several releases" in text
    assert version_rows(REAL) not in text  # no single set of versions claims every row
    header = next(line for line in text.splitlines() if line.startswith("| release | examples | example ids |"))
    names = [c.strip() for c in header.strip("|").split("|")][3:]
    assert names == sorted(REAL)

    def row(label: str, n: str, ids: str, versions: dict) -> str:
        return "| " + " | ".join([label, n, ids] + [f"`{versions[k]}`" for k in names]) + " |"

    assert row("1 (latest run)", "4", "0, 1, 4, 5", REAL) in text
    assert row("2", "2", "2, 3", NEWER) in text
    assert "before_history" not in text


def test_a_folder_written_by_one_release_keeps_its_card(tmp_path):
    out = tmp_path / "out"
    capture_model(out, batches=((0, 1),))
    manifest = capture_model(out, batches=((2, 3),))  # resumed under the same release
    spans = manifest["release_history"]
    assert [(s["versions"], s["first_segment"], s["runs"]) for s in spans] == [(REAL, 0, 2)]
    assert release_examples(manifest) == ([(REAL, [0, 1, 2, 3])], [])
    text = provenance(out)  # the versions in the provenance table, where they always were
    assert re.search(r"\| model revision \| [^\n]+ \|\n" + re.escape(version_rows(REAL)) + r"\n\| model dtype \|", text)
    assert "different releases" not in text and "release_history" not in text


def test_a_later_release_that_commits_nothing_is_recorded_and_the_card_names_the_release_of_the_rows(
    tmp_path, monkeypatch
):
    out = tmp_path / "out"
    capture_model(out, batches=((0, 1),))
    release(monkeypatch, NEWER)
    manifest = capture_model(out, batches=())  # opens, tidies, writes the card: no example
    assert manifest["versions"] == NEWER
    assert [(s["versions"], s["runs"]) for s in manifest["release_history"]] == [(REAL, 1), (NEWER, 1)]
    assert release_examples(manifest) == ([(REAL, [0, 1])], [])
    text = provenance(out)
    assert version_rows(REAL) in text and "`9.1.0`" not in text and "different releases" not in text


def test_a_folder_from_before_the_history_names_its_last_release_and_says_so(tmp_path, monkeypatch):
    out = tmp_path / "out"
    capture_model(out, batches=((0, 1),))
    old = read_manifest(out)
    del old["release_history"]  # as written before the history was kept
    write_json_atomic(out / "qk_sniff.json", old, fsync=False)
    release(monkeypatch, NEWER)
    manifest = capture_model(out, batches=((2, 3),))
    first, second = manifest["release_history"]
    assert first == {"versions": REAL, "first_segment": 0, "runs": None, "started": None, "before_history": True}
    assert second["versions"] == NEWER and second["first_segment"] == old["next_segment"]
    assert release_examples(manifest) == ([(REAL, [0, 1]), (NEWER, [2, 3])], [])
    text = provenance(out)
    assert "**Recorded by 2 different releases.**" in text
    assert "listed under the versions of the latest run before it (`before_history`)" in text


def _rank_runs(out, monkeypatch) -> None:
    """Two ranks: rank 0 under the first release; rank 1 under the newer one, then resumed under the first."""
    for rank, examples, versions in ((0, [0, 2], REAL), (1, [1, 3], NEWER), (1, [5], REAL)):
        release(monkeypatch, versions)
        sink = open_sink(out, rank=(rank, 2))
        run_examples(sink, examples)
        sink.complete = True
        sink.close()


def test_rank_parts_record_their_releases_and_a_merge_of_their_histories_attributes_each_example(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _rank_runs(out, monkeypatch)
    parts = {rank: read_manifest(out, f"qk_sniff.rank{rank:03d}.json") for rank in (0, 1)}
    assert [(s["rank"], s["versions"]) for s in parts[0]["release_history"]] == [(0, REAL)]
    assert [(s["rank"], s["versions"]) for s in parts[1]["release_history"]] == [(1, NEWER), (1, REAL)]
    assert release_examples(parts[1]) == ([(NEWER, [1, 3]), (REAL, [5])], [])

    merged = distributed.merge(out)  # segments renumbered s * 2 + rank
    assert release_examples(merged) == ([(REAL, [0, 2, 5]), (NEWER, [1, 3])], [])
    text = provenance(out)
    assert "**Recorded by 2 different releases.**" in text
    assert re.search(r"\| 1 \| 3 \| 0, 2, 5 \|", text) and re.search(r"\| 2 \| 2 \| 1, 3 \|", text)


def test_a_run_that_resumes_a_merged_folder_numbers_its_segments_above_every_merged_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _rank_runs(out, monkeypatch)
    merged = distributed.merge(out)
    taken = {info["segment"] for info in merged["example_info"].values()}
    for part in out.glob("qk_sniff.rank*.json"):  # a copy of the merged dataset, as pushed and pulled
        part.unlink()
    release(monkeypatch, NEWER)
    sink = open_sink(out)
    run_examples(sink, [7])
    sink.close()
    manifest = read_manifest(out)
    assert manifest["example_info"]["7"]["segment"] > max(taken)  # never one of a rank's renumbered segments
    assert release_examples(manifest) == ([(REAL, [0, 2, 5]), (NEWER, [1, 3, 7])], [])
    assert verify_dataset(out, log=lambda *_: None) == []


def _without_history(out, name: str = "qk_sniff.json", example_info: bool = True) -> dict:
    """The manifest `name` as a release before `release_history` (and, without `example_info`, before
    that) wrote it."""
    manifest = read_manifest(out, name)
    del manifest["release_history"]
    if not example_info:
        del manifest["example_info"]
    write_json_atomic(out / name, manifest, fsync=False)
    return manifest


def test_a_folder_merged_by_an_older_release_numbers_its_new_segments_above_the_merged_ones(tmp_path, monkeypatch):
    """An older merge left next_segment below its renumbered segments (s * world + rank): a run resuming a
    copy of it shared segment numbers with merged commits, which gave their examples its release."""
    out = tmp_path / "out"
    for rank, examples in ((0, [0, 2]), (1, [1, 3])):
        sink = open_sink(out, rank=(rank, 2))
        run_examples(sink, examples)
        sink.complete = True
        sink.close()
    distributed.merge(out)
    for part in out.glob("qk_sniff.rank*.json"):  # a copy of the merged dataset, as pushed and pulled
        part.unlink()
    manifest = _without_history(out)
    manifest["next_segment"] //= 2  # what the older merge wrote
    write_json_atomic(out / "qk_sniff.json", manifest, fsync=False)
    taken = {info["segment"] for info in manifest["example_info"].values()}
    release(monkeypatch, NEWER)
    sink = open_sink(out)
    run_examples(sink, [7, 9])
    sink.close()
    resumed = read_manifest(out)
    assert min(resumed["example_info"][str(e)]["segment"] for e in (7, 9)) > max(taken)
    assert release_examples(resumed) == ([(REAL, [0, 1, 2, 3]), (NEWER, [7, 9])], [])
    assert verify_dataset(out, log=lambda *_: None) == []


def test_a_merge_of_a_part_without_history_names_its_release_and_no_run_is_the_latest(tmp_path, monkeypatch):
    """A rank part written before the history was kept had no release in the merge, and the card showed
    the other rank's release as every row's; after a merge no run is "the latest" (ranks run side by side)."""
    out = tmp_path / "out"
    _rank_runs(out, monkeypatch)
    _without_history(out, "qk_sniff.rank000.json")
    merged = distributed.merge(out)
    assert release_examples(merged) == ([(REAL, [0, 2, 5]), (NEWER, [1, 3])], [])
    text = provenance(out)
    assert "**Recorded by 2 different releases.**" in text and "latest run" not in text.split("\n\nAn example")[0]


def test_examples_of_no_recorded_release_are_listed_as_such_on_the_card(tmp_path, monkeypatch):
    """Examples committed before the folder kept the segment of each example have no release: the card
    named the one release it knew as every row's."""
    out = tmp_path / "out"
    capture_model(out, batches=((0, 1),))
    _without_history(out, example_info=False)
    release(monkeypatch, NEWER)
    manifest = capture_model(out, batches=((2, 3),))
    assert release_examples(manifest) == ([(NEWER, [2, 3])], [0, 1])
    text = provenance(out)
    assert "**The release that recorded some examples is not known**" in text
    assert re.search(r"\| not recorded \| 2 \| 0, 1 \|", text)


def test_a_merged_manifests_versions_are_those_of_the_rank_that_wrote_last(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for rank, examples, versions in ((0, [0, 2], REAL), (1, [1, 3], NEWER)):
        release(monkeypatch, versions)
        sink = open_sink(out, rank=(rank, 2))
        run_examples(sink, examples)
        sink.complete = True
        sink.close()
    for rank, updated in ((0, "2026-01-01T00:00:00Z"), (1, "2026-01-02T00:00:00Z")):
        part = read_manifest(out, f"qk_sniff.rank{rank:03d}.json")
        write_json_atomic(out / f"qk_sniff.rank{rank:03d}.json", {**part, "updated": updated}, fsync=False)
    assert distributed.merge(out)["versions"] == NEWER


def test_a_model_built_from_a_config_is_named_as_such_not_none(tmp_path):
    """A model built in Python has no `_name_or_path`: the card's provenance and `inspect` said `None`."""
    from qk_attn.dataset.inspect import inspect_dataset
    from qk_attn.storage.model_record import UNNAMED

    out = tmp_path / "out"
    manifest = capture_model(out, batches=((0, 1),))
    assert manifest["model"]["id"] is None
    assert f"| model | {UNNAMED} |" in provenance(out)
    (line,) = [line for line in inspect_dataset(out, progress=False) if line.startswith("model ")]
    assert UNNAMED in line and "None" not in line
