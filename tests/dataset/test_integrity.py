"""Data you can trust (issue 11, storage side): checksummed shards, verify, load refusing damage,
repair then re-run recapturing exactly what was dropped, a corrupt manifest, folders that are
not captures, and the examples table. Real files throughout; batches from test_saver."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from packaging.version import Version

import qk_attn
from qk_attn import cli
from qk_attn.config import SniffConfig
from qk_attn.dataset.repair import repair_dataset
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import CorruptShard, DamagedDataset, ManifestError, NotACapture
from qk_attn.storage.layout import MANIFEST, PREVIOUS
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.records import shard_examples
from qk_attn.storage.sink import ParquetSink
from support.storage import folder_table, open_sink, reference, run_examples, sort_rows

EXAMPLES = list(range(8))


def capture(out, examples, batches=None, per_segment=2):
    """Examples two per finalise (so shards hold different examples), then close."""
    sink = open_sink(out)
    batches = [] if batches is None else batches
    todo = [e for e in examples if e not in sink.committed_ids()]
    for i in range(0, len(todo), per_segment):
        batches += run_examples(sink, todo[i : i + per_segment], commit=False)
        sink.commit(todo[i : i + per_segment])
        sink.flush(timeout=10)
    sink.close()
    return batches


@pytest.fixture
def dataset(tmp_path):
    out = tmp_path / "out"
    batches = capture(out, EXAMPLES)
    return out, batches


def a_shard(out, key="l01h00q", index=1):
    manifest = read_manifest(out)
    name = manifest["shards"][key][index]
    return out / key / name, shard_examples(manifest, key, name)


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_manifest_records_size_and_digest_and_shards_have_page_checksums(dataset):
    out, _ = dataset
    manifest = read_manifest(out)
    for key, names in manifest["shards"].items():
        for name in names:
            info = manifest["shard_info"][f"{key}/{name}"]
            assert info["bytes"] == (out / key / name).stat().st_size
            assert len(info["sha256"]) == 64 and info["rows"] == pq.read_metadata(out / key / name).num_rows
            pq.read_table(out / key / name, page_checksum_verification=True)
    assert verify_dataset(out, log=lambda *_: None) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_shard_is_found_named_and_refused(dataset, damage, capsys):
    out, _ = dataset
    path, held = a_shard(out)
    assert held  # the manifest knows which examples the shard holds, even when it cannot be read
    if damage == "flip":  # 64 bytes in the middle of the data, same size
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()

    code, text = run_cli(["verify", str(out)], capsys)
    assert code == 1
    lines = [line for line in text.splitlines() if path.name in line]
    assert len(lines) == 1, text
    assert f"l01h00q/{path.name}" in lines[0] and str(held[:2])[1:-1] in lines[0]
    assert {"flip": "sha256", "truncate": "size", "delete": "missing"}[damage] in lines[0]

    with pytest.raises(CorruptShard, match=path.name) as error:
        qk_attn.load(out, layer=1, head=0, kind="q")
    assert "\n" not in str(error.value)
    with pytest.raises(CorruptShard):
        qk_attn.load_vectors(out, layer=1)
    qk_attn.load(out, layer=0, head=0, kind="q")  # other folders still load
    if damage != "flip":  # inspect reads only the index columns: a flip in the vectors is verify's to find
        assert any(line.startswith("damaged") for line in cli.inspect_dataset(out))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_repair_then_rerun_recaptures_exactly_the_dropped_examples(dataset, damage, tmp_path):
    out, _ = dataset
    path, held = a_shard(out)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[100:164] = bytes(64)
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(path, 200)
    else:
        path.unlink()
    if damage != "flip":  # resuming over a missing or truncated shard is refused (a stat; digests: verify)
        with pytest.raises(DamagedDataset, match=f"qk-sniff repair {out}"):
            open_sink(out)
    lines = []
    assert repair_dataset(out, log=lines.append) == 0
    assert any(path.name in line for line in lines) and any("dropped" in line for line in lines)
    manifest = read_manifest(out)
    assert set(map(int, manifest["examples"])) == set(EXAMPLES) - set(held)
    assert verify_dataset(out, log=lambda *_: None) == []  # consistent before the re-run too

    sink = open_sink(out)
    assert sorted(set(EXAMPLES) - sink.committed_ids()) == held  # a re-run recaptures exactly them
    sink.close()
    capture(out, EXAMPLES)
    clean = tmp_path / "clean"
    uninterrupted = capture(clean, EXAMPLES)
    assert sort_rows(folder_table(out)).equals(sort_rows(folder_table(clean)))
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(uninterrupted)))
    repaired, uninterrupted = read_manifest(out), read_manifest(clean)
    for field in ("examples", "calls", "row_counts", "buckets"):  # repair took the dropped examples' calls out too
        assert repaired[field] == uninterrupted[field], field
    assert verify_dataset(out, log=lambda *_: None) == []


def test_a_changed_examples_table_is_found_and_rewritten_by_repair(dataset):
    out, _ = dataset
    (out / "examples.parquet").write_bytes(b"not parquet")
    problems = verify_dataset(out, log=lambda *_: None)
    assert len(problems) == 1 and problems[0].startswith("examples.parquet: missing or changed")
    lines = []
    assert repair_dataset(out, log=lines.append) == 0
    assert lines[-1].endswith("intact; rewrote examples.parquet from the manifest")
    assert verify_dataset(out, log=lambda *_: None) == []
    assert pq.read_table(out / "examples.parquet").equals(qk_attn.load_examples(out))


def test_repair_of_a_sound_dataset_changes_nothing(dataset):
    out, _ = dataset
    before = (out / MANIFEST).read_text()
    lines = []
    assert repair_dataset(out, log=lines.append) == 0
    assert "nothing to repair" in lines[-1] and (out / MANIFEST).read_text() == before


def test_a_corrupt_manifest_is_one_line_that_never_advises_overwrite(dataset, capsys, tmp_path):
    out, _ = dataset
    good = read_manifest(out)
    (out / MANIFEST).write_text('{"examples": {"0": 5}, "shards": {')  # cut short
    for action in (
        lambda: read_manifest(out),
        lambda: ParquetSink(out, SniffConfig(output=str(out), sampler="all", min_bucket_size=4)),
    ):
        with pytest.raises(ManifestError) as error:
            action()
        message = str(error.value)
        assert "\n" not in message and "overwrite" not in message
        assert f"qk-sniff repair {out}" in message
    # repair restores the previous manifest; what was committed after it is captured again
    assert (out / PREVIOUS).exists()
    lines = []
    assert repair_dataset(out, log=lines.append) == 0
    restored = read_manifest(out)
    assert (
        restored["examples"]
        and set(restored["examples"]) <= set(good["examples"])
        and any("restored" in line for line in lines)
    )
    assert verify_dataset(out, log=lambda *_: None) == []
    capture(out, EXAMPLES)
    clean = tmp_path / "clean"
    capture(clean, EXAMPLES)
    assert sort_rows(folder_table(out)).equals(sort_rows(folder_table(clean)))


def test_a_corrupt_manifest_without_a_previous_one_does_not_advise_repair(dataset):
    """It advised `qk-sniff repair` "to restore the previous manifest" where there was none (repair then said so)."""
    out, _ = dataset
    (out / PREVIOUS).unlink()
    (out / MANIFEST).write_text('{"examples": {"0": 5}, "shards": {')
    with pytest.raises(ManifestError) as error:
        read_manifest(out)
    assert "qk-sniff repair" not in str(error.value)
    assert str(error.value).endswith(
        f"restore the file from a copy (there is no previous manifest, {PREVIOUS}, to restore)"
    )


def test_a_deleted_manifest_with_its_previous_one_is_damage_that_repair_mends(dataset, capsys):
    """verify of a capture whose qk_sniff.json is gone but whose previous manifest is there reports
    damage (exit 1) and names `qk-sniff repair`, which restores it."""
    out, _ = dataset
    (out / MANIFEST).unlink()
    code, printed = run_cli(["verify", str(out)], capsys)
    assert code == 1 and f"run `qk-sniff repair {out}`" in printed and PREVIOUS in printed
    assert run_cli(["repair", str(out)], capsys)[0] == 0
    assert run_cli(["verify", str(out)], capsys)[0] == 0


def test_a_folder_that_is_not_a_capture_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    for overwrite in (False, True):
        with pytest.raises(NotACapture, match=r"not empty \(README.md\) and holds no qk_sniff.json") as error:
            ParquetSink(out, SniffConfig(output=str(out), sampler="all", min_bucket_size=4), overwrite=overwrite)
        assert "\n" not in str(error.value)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["README.md"]
    assert (out / "README.md").read_text() == "# my notes\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    open_sink(empty).close()  # an empty folder is fine


def test_the_card_never_replaces_a_readme_the_capture_did_not_write(dataset):
    out, _ = dataset
    assert "qk-attn" in (out / "README.md").read_text()  # the card
    (out / "README.md").write_text("# the user's own words\n")
    capture(out, EXAMPLES + [8, 9])
    assert (out / "README.md").read_text() == "# the user's own words\n"


def test_examples_table_identity_and_first_position(tmp_path):
    import datasets
    import torch

    from support.storage import make_batch

    out = tmp_path / "out"
    sink = open_sink(out)
    for example, first in ((3, 0), (7, 4)):
        if example == 3:
            sink.describe(example, f"doc-{example}", example * 10)
        for layer in (0, 1):
            batch = make_batch(layer, "k", [example], [12], (0,))
            batch.first_position = torch.tensor([first + layer])  # min over calls is kept
            sink.put(batch)
        sink.commit([example])
    sink.flush(timeout=10)
    sink.describe(7, "doc-7", 70)  # after its commit is durable: recorded too
    sink.describe(9, "late", 1)  # described but never committed: not listed
    sink.close()
    table = qk_attn.load_examples(out)
    assert table.to_pylist() == [
        {"example_id": 3, "source_id": "doc-3", "source_index": 30, "valid_length": 12, "first_position": 0},
        {"example_id": 7, "source_id": "doc-7", "source_index": 70, "valid_length": 12, "first_position": 4},
    ]
    assert pq.read_table(out / "examples.parquet").equals(table)
    loaded = datasets.load_dataset("parquet", data_files=str(out / "examples.parquet"), split="train")
    assert loaded["source_id"] == ["doc-3", "doc-7"]


def as_older(out) -> None:
    """The folder as a qk-attn before digests and records wrote it: manifests without them, an unsigned card."""
    for name in (MANIFEST, PREVIOUS):
        if (out / name).exists():
            manifest = json.loads((out / name).read_text())
            for field in ("digest", "shard_info", "example_info", "examples_file", "release_history"):
                manifest.pop(field, None)
            (out / name).write_text(json.dumps(manifest))
    card = out / "README.md"  # without the manifest's sha256 and the signature
    card.write_text(card.read_text().split("<!-- qk-sniff manifest sha256")[0])


def test_older_datasets_without_digests_still_load_and_verify(dataset):
    out, _ = dataset
    as_older(out)
    lines = []
    assert verify_dataset(out, log=lines.append) == []
    assert any(line.startswith("info:") and "no recorded size/digest" in line for line in lines)
    assert qk_attn.load(out).num_rows == folder_table(out).num_rows
    assert np.array_equal(qk_attn.load_examples(out)["example_id"].to_numpy(), np.array(EXAMPLES))


def test_repair_of_an_older_dataset_resumed_by_this_version(tmp_path):
    """Shards and examples without records (written before they existed), then new ones: a
    damaged older shard drops the older examples it may hold, and the re-run restores them."""
    out = tmp_path / "out"
    capture(out, EXAMPLES[:4])
    as_older(out)
    capture(out, EXAMPLES)  # resumed by this version: 4..7 get records
    older = next(
        n for n in read_manifest(out)["shards"]["l00h00q"] if f"l00h00q/{n}" not in read_manifest(out)["shard_info"]
    )
    os.truncate(out / "l00h00q" / older, 100)
    assert repair_dataset(out, log=lambda *_: None) == 0
    dropped = set(EXAMPLES) - set(map(int, read_manifest(out)["examples"]))
    assert dropped and dropped <= set(EXAMPLES[:4])  # its segment's examples, found in the other folders
    assert verify_dataset(out, log=lambda *_: None) == []
    capture(out, EXAMPLES)
    clean = tmp_path / "clean"
    capture(clean, EXAMPLES)
    assert sort_rows(folder_table(out)).equals(sort_rows(folder_table(clean)))
    assert verify_dataset(out, log=lambda *_: None) == []


def test_verify_holds_the_manifests_bucket_counts_to_the_files(dataset):
    """The card's bucket table and chart are drawn from the manifest's counts: a manifest edited
    (and signed again) to show other counts is a problem, not OK."""
    from qk_attn.storage.manifest import manifest_digest

    out, _ = dataset
    assert verify_dataset(out, log=lambda *_: None) == []
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["buckets"]["q"]["0"] += 999
    manifest["digest"] = manifest_digest({k: v for k, v in manifest.items() if k != "digest"})
    (out / MANIFEST).write_text(json.dumps(manifest))
    problems = verify_dataset(out, log=lambda *_: None)
    problems = [p for p in problems if not p.startswith("README.md ")]  # the card names the edited manifest's counts
    assert len(problems) == 1 and "bucket counts of kind 'q' differ from the files'" in problems[0], problems
    assert "bucket 0: manifest" in problems[0]


@pytest.mark.parametrize("field, value", [("vector_dtype", "float16"), ("head_dim", 16)])
def test_verify_holds_the_shards_vectors_to_the_manifests_type(dataset, field, value):
    """The card states the vector type and size from the manifest: shards of another type (written by
    hand, or a manifest edited and signed again) are a problem for each shard, not OK."""
    from qk_attn.storage.manifest import manifest_digest

    out, _ = dataset
    manifest = json.loads((out / MANIFEST).read_text())
    holder = manifest if field == "vector_dtype" else manifest["plan"]
    assert holder[field] != value
    holder[field] = value
    manifest["digest"] = manifest_digest({k: v for k, v in manifest.items() if k != "digest"})
    (out / MANIFEST).write_text(json.dumps(manifest))
    problems = verify_dataset(out, log=lambda *_: None)
    shards = sum(len(names) for names in manifest["shards"].values())
    problems = [p for p in problems if not p.startswith("README.md ")]  # written from the manifest before the edit
    assert len(problems) == shards and all("differs from the dataset schema" in p for p in problems), problems


def test_verify_of_a_folder_a_capture_is_writing_checks_its_commits_and_not_its_card(tmp_path):
    """verify of a folder whose session is open reported its card missing, and its examples table lagging the
    manifest, and advised a repair, which the writer's lock then refused. It checks what is committed so far
    and says a capture is writing."""
    from support.models import build

    model = build("llama3", "qk_sniff")
    out = tmp_path / "out"
    logged = []
    with qk_attn.session(output=str(out), sampler="all") as s:
        for seed in (0, 1):  # the examples table, rewritten at most every minute, lags the second commit
            model(input_ids=torch.randint(2, 60, (2, 6), generator=torch.Generator().manual_seed(seed)))
            s.commit()
            s.flush()
            assert verify_dataset(out, log=logged.append, progress=False) == []
    assert any(line.startswith(f"info: a capture is writing {out} now") for line in logged)
    assert verify_dataset(out, log=lambda *_: None, progress=False) == []  # closed: the card is there


def test_layers_given_only_the_last_queries_verify_against_what_they_got(tmp_path):
    """Gemma 4's KV-shared layers get only the last `logits_to_keep` queries of a forward (transformers
    >= 5.25): the manifest names the positions each did not get, per example, and verify holds their rows to
    the sampler's selection without them (two chunks, and a sparse generate())."""
    from support.models import gemma4

    model = gemma4(global_head_dim=16, num_kv_shared_layers=2, hidden_size_per_layer_input=8)
    model.set_attn_implementation("qk_sniff")
    shared = [2, 3]
    ids = torch.randint(2, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    out = tmp_path / "cap"
    with torch.no_grad(), qk_attn.session(output=str(out), sampler="all", capture="q", heads="0") as s:
        s.begin([4])
        cache = None
        for chunk in (ids[:, :6], ids[:, 6:]):
            cache = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
    info = read_manifest(out)["example_info"]["4"]
    for layer in shared:
        got = sorted(pq.read_table(out / f"l{layer:02d}h00q").column("position").to_pylist())
        unseen = info.get("unseen_queries", {}).get(str(layer), [])
        assert got in ([5, 11], list(range(12)))  # sliced, or an older transformers computing every query
        assert unseen == ([[0, 5], [6, 11]] if len(got) == 2 else [])
    assert "unseen_queries" in info or Version(transformers.__version__) < Version("5.25")
    assert verify_dataset(out, log=lambda *_: None) == []
    if "unseen_queries" in info:  # the card says which layers got only the last queries, and where that is recorded
        card = (out / "README.md").read_text()
        assert "Layers 2-3 were given only the last queries" in card and "Query rows fall short of it" in card

    sparse = tmp_path / "sparse"
    with torch.no_grad(), qk_attn.session(output=str(sparse), sampler="uniform", min_bucket_size=2, base_rate=1.0):
        model.generate(input_ids=ids[:, :7], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert verify_dataset(sparse, log=lambda *_: None) == []
    os.remove(next((sparse / "l02h00q").glob("*.parquet")))  # a layer's rows lost are still found
    assert any("l02h00q" in problem for problem in verify_dataset(sparse, log=lambda *_: None))

    streamed = tmp_path / "streamed"  # a forward too large to stage whole (pinned_mb=1) hands its calls on one by one
    long = torch.randint(2, 90, (1, 600), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), qk_attn.session(output=str(streamed), sampler="all", pinned_mb=1):
        model(input_ids=long, logits_to_keep=1)
    if "unseen_queries" in info:
        assert read_manifest(streamed)["example_info"]["0"]["unseen_queries"] == {"2": [[0, 599]], "3": [[0, 599]]}
    assert verify_dataset(streamed, log=lambda *_: None) == []


def test_verify_piped_into_a_reader_that_leaves_stops_quietly(dataset):
    """`qk-sniff verify OUT | head -1` printed `[Errno 32] Broken pipe` as the command's error."""
    import subprocess
    import sys

    out, _ = dataset
    result = subprocess.run(
        f"{sys.executable} -m qk_attn.cli verify {out} -q | head -c 0", shell=True, capture_output=True, text=True
    )
    assert result.stderr == ""
