"""`qk-sniff` end to end on a tiny random model: config -> documents -> inference -> capture -> save.

The model and tokenizer are built in-process (a 2-layer Llama from its config class and a
WordLevel tokenizer trained on a few words) and saved to a temporary folder: no Hub.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from qk_attn import cli
from qk_attn.capture.sinks import MemorySink
from qk_attn.errors import ConfigError, HubError
from qk_attn.run import prepare, runner
from qk_attn.run.config import RunConfig
from qk_attn.run.documents import iter_documents, load_rows, normalize_id
from qk_attn.run.input_checks import local_files
from qk_attn.run.model import load_model_config
from qk_attn.run.summary import RunSummary
from qk_attn.storage.manifest import read_manifest
from support.run import (
    HEADS,
    KV_HEADS,
    LAYERS,
    SPARSE,
    all_rows,
    assert_same_rows,
    make_config,
    positions_by_example,
    run_in_memory,
    write_config,
)


# ---- ids ------------------------------------------------------------------------------------
def test_integer_ids_pass_through():
    for value in (0, 7, -3, 2**63 - 1, -(2**63), np.int64(42), np.int32(-5)):
        assert normalize_id(value) == int(value)


def test_other_ids_hash_to_stable_signed_int64():
    import hashlib

    # Golden values: the definition must never change (datasets built earlier rely on it).
    assert normalize_id("doc-0") == int.from_bytes(
        hashlib.blake2b(b"doc-0", digest_size=8).digest(), "big", signed=True
    )
    assert normalize_id("Genesis") == normalize_id("Genesis") == 8539022195673046619
    ids = [normalize_id(v) for v in ("a", "b", "7", 7.0, True, 2**64, b"a")]
    assert all(-(2**63) <= i < 2**63 for i in ids)
    assert ids[0] == ids[-1]  # bytes hash as their UTF-8 text does
    assert normalize_id("7") != 7 and normalize_id(True) != 1 and normalize_id(7.0) != 7  # only ints pass


# ---- documents --------------------------------------------------------------------------------
def _section(path, **kw):
    return RunConfig.from_dict(
        {"dataset": {"path": str(path), **kw}, "model": {"name": "m"}, "output": {"data_root": "o"}}
    ).dataset


def test_local_files_of_every_kind(tmp_path):
    rows = [{"id": 10 + i, "text": f"text {i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows))
    for name in ("d.jsonl", "d.parquet", "d.csv"):
        cfg = _section(tmp_path / name, id_column="id", split="test")
        got = list(iter_documents(load_rows(cfg), cfg))
        assert [(d.example_id, d.text) for d in got] == [(r["id"], r["text"]) for r in rows], name
    # Text files: one file = one document by default; ids are row numbers.
    (tmp_path / "t").mkdir()
    for i in range(3):
        (tmp_path / "t" / f"{i}.txt").write_text(f"line one of {i}\nline two\n")
    cfg = _section(tmp_path / "t" / "*.txt")
    got = list(iter_documents(load_rows(cfg), cfg))
    assert [d.example_id for d in got] == [0, 1, 2] and all("line two" in d.text for d in got)
    cfg = _section(tmp_path / "t" / "0.txt", sample_by="line")
    assert [d.text for d in iter_documents(load_rows(cfg), cfg)] == ["line one of 0", "line two"]
    # A recursive glob names top-level files too, as datasets reads it (the check said it "matches no file").
    assert local_files(str(tmp_path / "t" / "**" / "*.txt")) == [tmp_path / "t" / f"{i}.txt" for i in range(3)]


def test_max_samples_streaming_and_column_errors(docs):
    path, rows = docs
    cfg = _section(path, text_column="body", id_column="doc", max_samples=3, streaming=True)
    got = list(iter_documents(load_rows(cfg), cfg))
    assert [d.source_id for d in got] == ["doc-0", "doc-1", "doc-2"]
    assert [d.example_id for d in got] == [normalize_id(f"doc-{i}") for i in range(3)]
    with pytest.raises(ConfigError, match="'text'.*body"):
        cfg = _section(path)
        list(iter_documents(load_rows(cfg), cfg))
    sheet = path.with_suffix(".xlsx")
    sheet.write_text("")
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_rows(_section(sheet))


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n')
    cfg = _section(path, id_column="id")
    with pytest.raises(ValueError, match="row 2: id 'a'.*unique"):
        list(iter_documents(load_rows(cfg), cfg))


# ---- inference and capture ------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, side", [(1, "right"), (4, "right"), (4, "left")])
def test_sequence_lengths_truncation_and_padding(tiny_model, docs, tmp_path, batch_size, side):
    """Each example records exactly its own tokens (BOS + words, cut at max_length), never a
    pad, at positions 0..n-1, whatever the batch composition and padding side."""
    path, rows = docs
    config = make_config(
        tiny_model,
        path,
        tmp_path / "out",
        tokenizer={"max_length": 30, "padding_side": side},
        inference={"batch_size": batch_size},
    )
    summary, table, sink = run_in_memory(config)
    want = {normalize_id(r["doc"]): min(30, len(r["body"].split()) + 1) for r in rows}
    assert summary.documents == 6 and summary.tokens == sum(want.values()) and summary.max_length == 30
    assert sorted(sink.committed) == sorted(want)
    for kind in ("q", "k"):
        for head in range(HEADS if kind == "q" else KV_HEADS):
            got = positions_by_example(table, kind, layer=1, head=head)
            assert got == {e: list(range(n)) for e, n in want.items()}, (kind, head)


def test_batching_does_not_change_vectors(tiny_model, docs, tmp_path):
    path, _ = docs
    tables = []
    for batch_size, side in ((1, "right"), (3, "left")):
        config = make_config(
            tiny_model, path, tmp_path / "out", inference={"batch_size": batch_size}, tokenizer={"padding_side": side}
        )
        tables.append(run_in_memory(config)[1])
    keyed = []
    for table in tables:
        t = table.to_pydict()
        keyed.append(
            {
                k: np.asarray(v)
                for k, v in zip(zip(t["example_id"], t["layer"], t["head"], t["kind"], t["position"]), t["vector"])
            }
        )
    assert keyed[0].keys() == keyed[1].keys()
    for key, vector in keyed[0].items():
        np.testing.assert_allclose(keyed[1][key], vector, rtol=1e-4, atol=1e-5, err_msg=str(key))


def test_only_the_backbone_runs(tiny_model, docs, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    def no_head(*args, **kwargs):
        raise AssertionError("the LM head ran: logits over every position")

    monkeypatch.setattr(LlamaForCausalLM, "forward", no_head)
    path, _ = docs
    summary, table, _ = run_in_memory(make_config(tiny_model, path, tmp_path / "out"))
    assert summary.documents == 6 and table.num_rows > 0


def test_empty_documents_are_skipped(tiny_model, tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": ""}\n{"text": "w1 w2"}\n')
    config = make_config(
        tiny_model,
        path,
        tmp_path / "out",
        dataset={"text_column": "text", "id_column": None},
        tokenizer={"add_special_tokens": False},
    )
    summary, table, sink = run_in_memory(config)
    assert (summary.documents, summary.empty) == (1, 1) and sink.committed == [1]


def test_config_overrides_merge_into_the_model_config(tiny_model, tmp_path):
    config = make_config(
        tiny_model,
        "x.jsonl",
        tmp_path / "o",
        model={
            "config_overrides": {
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
                "max_position_embeddings": 2048,
            }
        },
    )
    model_config = load_model_config(config, str(tiny_model))
    assert model_config.max_position_embeddings == 2048
    assert model_config.rope_parameters["rope_type"] == "yarn" and model_config.rope_parameters["factor"] == 4.0
    assert model_config.rope_parameters["rope_theta"] == 10000.0  # kept from the saved config
    bad = make_config(tiny_model, "x.jsonl", tmp_path / "o", model={"config_overrides": {"max_position_embedding": 1}})
    with pytest.raises(ConfigError, match="config_overrides.max_position_embedding"):
        load_model_config(bad, str(tiny_model))


def test_max_length_defaults_to_the_model(tiny_model, docs, tmp_path):
    path, _ = docs
    config = make_config(tiny_model, path, tmp_path / "out", dataset={"max_samples": 1})
    assert run_in_memory(config)[0].max_length == 512


# ---- the command line ---------------------------------------------------------------------------
def test_cli_config_errors_exit_2(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"dataset": {"path": "d.jsonl", "txt_column": "a"}, "model": {"name": "m"}, "output": {"data_root": "o"}}
        )
    )
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'txt_column'" in err and "'dataset'" in err and "text_column" in err
    assert cli.main(["run", "--config", str(path), "--set", "capture.bucket=3"]) == 2
    assert "'bucket'" in capsys.readouterr().err
    assert cli.main(["verify", str(tmp_path / "nowhere")]) == 2  # a usage error, not a problem found in data
    assert "nowhere does not exist; expected a qk-sniff dataset folder" in capsys.readouterr().err


def test_a_missing_local_path_or_a_bad_config_file_is_named(tiny_model, docs, tmp_path, capsys):
    """One line, exit 2, naming what is wrong: a dataset or tokenizer path that does not exist is not
    a Hub id the Hub failed to answer; a --config folder or a non-UTF-8 config file is named as such."""
    path, _ = docs
    config = write_config(tmp_path, tiny_model, path, tmp_path / "out")
    for missing in (str(tmp_path / "nope.jsonl"), "nope.jsonl", str(tmp_path / "no" / "folder")):
        assert cli.main(["run", "--config", config, "--dry-run", "--set", f"dataset.path={missing}"]) == 2
        err = capsys.readouterr().err
        assert f"dataset.path={missing!r}: " in err and " does not exist" in err and "Hub (" not in err, err
    missing = str(tmp_path / "no_tokenizer")
    assert cli.main(["run", "--config", config, "--dry-run", "--set", f"tokenizer.name={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer.name={missing!r}: " in err and " does not exist" in err and "Hub (" not in err, err
    folder = tmp_path / "configs"
    folder.mkdir()
    assert cli.main(["run", "--config", str(folder)]) == 2
    assert f"--config {str(folder)!r} is a folder" in capsys.readouterr().err
    assert cli.main(["run", "--config", ""]) == 2  # was called a folder (the current one)
    assert (
        capsys.readouterr().err
        == "qk-sniff run: --config '' names no file; give the YAML run configuration file (e.g. configs/demo.yaml)\n"
    )
    (tmp_path / "a_file").write_text("x")
    for where, says in ((tmp_path / "none", "does not exist"), (tmp_path / "a_file", "is a file")):
        assert cli.main(["merge", str(where)]) == 2  # was "holds no manifest parts"
        assert capsys.readouterr().err == f"qk-sniff merge: {where} {says}: nothing to merge\n"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: {name: caf\xe9}\n".encode("latin-1"))
    assert cli.main(["run", "--config", str(latin)]) == 2
    err = capsys.readouterr().err
    assert f"{latin} is not UTF-8 text (byte 0xe9 at offset 17)" in err and len(err.splitlines()) == 1


def test_push_and_pull_to_a_local_path_are_usage_errors(tiny_model, docs, tmp_path, capsys):
    path, _ = docs
    out = tmp_path / "out"
    runner.run(make_config(tiny_model, path, out, dataset={"max_samples": 1}), progress=False)
    for command in (["push", str(out)], ["pull", str(tmp_path / "pulled")]):
        assert cli.main([*command, "--repo", str(tmp_path / "copy")]) == 2
        assert "is not a Hub dataset repo id: expected NAME or ORG/NAME" in capsys.readouterr().err
    assert not (tmp_path / "pulled").exists() and not (out / ".qk_sniff.lock").exists()


def test_push_needs_a_repo(tiny_model, docs, tmp_path):
    path, _ = docs
    with pytest.raises(ConfigError, match="hf_repo_id"):
        runner.run(make_config(tiny_model, path, tmp_path / "out"), push_to_hub=True, sink=MemorySink(), progress=False)


def test_expected_positions_match_the_sampler():
    from qk_attn.dataset.verify import expected_positions
    from qk_attn.sampler import Sampler

    sampler = Sampler("log_uniform", 4, 2.0, 3)
    lengths = {5: 100, -7: 3, 2**40: 257, 9: 0}
    got = expected_positions(sampler, 1, "k", lengths, chunk=300)  # several chunks
    for example, length in lengths.items():
        np.testing.assert_array_equal(got[example], sampler.selected_positions(example, 1, "k", length))


# ---- with the Parquet dataset writer -------------------------------------------------------------


def test_run_end_to_end_then_verify_inspect_and_load(tiny_model, docs, tmp_path, capsys):
    import datasets

    path, rows = docs
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model, path, out, capture=SPARSE, inference={"batch_size": 2})
    assert cli.main(["run", "--config", config, "--quiet", "--set", "tokenizer.max_length=64"]) == 0
    printed = capsys.readouterr().out
    assert "6 captured" in printed and "qk_attn.load(" in printed and "rows " in printed
    manifest = json.loads((out / "qk_sniff.json").read_text())
    want = {normalize_id(r["doc"]): min(64, len(r["body"].split()) + 1) for r in rows}
    assert {int(k): v for k, v in manifest["examples"].items()} == want
    assert manifest["source"]["dataset"] == str(path) and manifest["source"]["max_length"] == 64

    assert cli.main(["verify", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    assert cli.main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "6 committed" in report and "buckets.png" in report and "[0, 2)" in report

    ds = datasets.load_dataset(str(out), "l00h00q", split="train")
    assert ds.num_rows == manifest["row_counts"]["l00h00q"] > 0
    assert set(ds["example_id"]) == set(want)


def test_resume_skips_committed_examples_and_never_duplicates(tiny_model, docs, tmp_path):
    path, _ = docs
    full = tmp_path / "full"
    runner.run(make_config(tiny_model, path, full, capture=SPARSE), progress=False)
    out = tmp_path / "out"
    first = runner.run(make_config(tiny_model, path, out, capture=SPARSE, dataset={"max_samples": 2}), progress=False)
    again = runner.run(make_config(tiny_model, path, out, capture=SPARSE, inference={"batch_size": 3}), progress=False)
    assert (first.documents, again.documents, again.resumed) == (2, 4, 2)
    source = read_manifest(out)["source"]  # the card shows the latest run's, not the first's
    assert (source["max_samples"], source["batch_size"]) == (None, 3)
    assert_same_rows(all_rows(out), all_rows(full), exact=False)
    assert cli.verify_dataset(out, log=lambda *_: None) == []
    done = runner.run(make_config(tiny_model, path, out, capture=SPARSE), progress=False)
    assert (done.documents, done.resumed, done.tokens) == (0, 6, 0)


def test_resume_refuses_another_local_dataset_or_tokenizer_of_the_same_name(
    tiny_model, docs, tmp_path, capsys, monkeypatch
):
    """The published manifest names a local file by its last part, so /a/docs.jsonl and
    /b/docs.jsonl must be told apart by their content: another file is refused before the model
    loads (one line naming dataset.path or tokenizer.name); the same files moved elsewhere resume."""
    import shutil

    from qk_attn.storage.manifest import write_json_atomic

    path, rows = docs
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.max_samples=2"]) == 0
    capsys.readouterr()
    other = tmp_path / "other" / path.name
    other.parent.mkdir()
    other.write_text("".join(json.dumps(dict(r, body=r["body"] + " w1")) + "\n" for r in rows))
    loaded = []
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: loaded.append(a) or 1 / 0)
    for argv in (["--dry-run"], []):
        assert cli.main(["run", "--config", config, "--quiet", "--set", f"dataset.path={other}", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "holds a capture with different settings (dataset.path: " in err
        assert f"{path} (" in err and f"{other} (" in err and "fingerprint" in err
    assert loaded == [] and len(read_manifest(out)["examples"]) == 2

    # A different tokenizer in a folder of the same name.
    tokenizer = tmp_path / "elsewhere" / tiny_model.name
    shutil.copytree(tiny_model, tokenizer)
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps({**settings, "clean_up_tokenization_spaces": not settings.get("clean_up_tokenization_spaces")})
    )
    assert cli.main(["run", "--config", config, "--quiet", "--dry-run", "--set", f"tokenizer.name={tokenizer}"]) == 2
    assert "(tokenizer.name: " in capsys.readouterr().err and loaded == []

    # The same files somewhere else (another folder, another machine) resume.
    moved = tmp_path / "moved" / path.name
    moved.parent.mkdir()
    shutil.copy(path, moved)
    monkeypatch.undo()
    assert cli.main(["run", "--config", config, "--quiet", "--set", f"dataset.path={moved}"]) == 0
    capsys.readouterr()
    assert len(read_manifest(out)["examples"]) == 6
    assert cli.verify_dataset(out, log=lambda *_: None) == []

    # A capture recorded before fingerprints existed is held to its full recorded path.
    manifest = read_manifest(out)
    del manifest["source_files"]
    write_json_atomic(out / "qk_sniff.json", manifest)
    assert cli.main(["run", "--config", config, "--quiet", "--dry-run", "--set", f"dataset.path={other}"]) == 2
    assert f"(dataset.path: '{path}' there, '{other}' now)" in capsys.readouterr().err
    assert cli.main(["run", "--config", config, "--quiet", "--dry-run"]) == 0


def test_resume_refuses_other_weights_in_the_same_local_model_folder(tiny_model, docs, tmp_path, capsys):
    """A local model folder is named by its last part too: weights replaced in it (same config, same
    tokenizer) are another model, refused before it loads, not mixed into the capture."""
    import shutil

    from transformers import AutoModelForCausalLM

    path, _ = docs
    model_dir = tmp_path / "models" / tiny_model.name
    shutil.copytree(tiny_model, model_dir)
    out = tmp_path / "out"
    config = write_config(tmp_path, model_dir, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.max_samples=2"]) == 0
    capsys.readouterr()
    other = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    other.save_pretrained(model_dir)
    assert cli.main(["run", "--config", config, "--quiet", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a capture with different settings (model.name: " in err
    assert "fingerprint" in err and len(read_manifest(out)["examples"]) == 2


def test_the_same_model_files_elsewhere_resume_the_capture(tiny_model, docs, tmp_path, capsys):
    """A local model folder is known by its files, not its path: a copy on another node's scratch disk
    resumes the capture (it was refused as another model)."""
    import shutil

    path, rows = docs
    first, elsewhere = tmp_path / "a" / tiny_model.name, tmp_path / "b" / tiny_model.name
    shutil.copytree(tiny_model, first)
    shutil.copytree(tiny_model, elsewhere)
    out = tmp_path / "out"
    config = write_config(tmp_path, first, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.max_samples=2"]) == 0
    assert cli.main(["run", "--config", config, "--quiet", "--set", f"model.name={elsewhere}"]) == 0, (
        capsys.readouterr()
    )
    assert len(read_manifest(out)["examples"]) == len(rows)
    assert cli.verify_dataset(out, log=lambda *_: None) == []


def test_dataset_files_are_part_of_what_a_capture_is(tiny_model, docs, tmp_path, capsys):
    """dataset.data_files chooses files in a dataset folder: another choice is another capture, refused
    on resume (the same ids name other texts). On a single local file it, dataset.name and
    dataset.revision cannot apply: refused rather than ignored (and shown on the card as if used)."""
    path, rows = docs
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text(path.read_text())
    (folder / "b.jsonl").write_text("".join(json.dumps(dict(r, body=r["body"] + " w1")) + "\n" for r in rows))
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model, folder, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.data_files=a.jsonl"]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--config", config, "--quiet", "--dry-run", "--set", "dataset.data_files=b.jsonl"]) == 2
    assert "(dataset.data_files: 'a.jsonl' there, 'b.jsonl' now)" in capsys.readouterr().err

    config = write_config(tmp_path, tiny_model, path, tmp_path / "out2", capture=SPARSE)
    for option in ("dataset.name=x", "dataset.revision=v9", "dataset.data_files=a.jsonl"):
        assert cli.main(["run", "--config", config, "--quiet", "--dry-run", "--set", option]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot apply to the local file dataset.path=" in err, err
    # A revision of a local model folder was ignored by transformers and named on the card.
    for section in ("model", "tokenizer"):
        assert cli.main(["run", "--config", config, "--quiet", "--dry-run", "--set", f"{section}.revision=v1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"cannot apply to the local folder {section}.name=" in err, err


def _stop_in_the_fourth_document(monkeypatch, stop) -> None:
    """`stop()` inside the 4th document's forward, at its second layer (after layer 0 was captured)."""
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    original = modeling_llama.LlamaDecoderLayer.forward

    def stopping(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * LAYERS + 2:
            stop()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", stopping)


def test_killed_mid_forward_then_rerun_gives_the_uninterrupted_rows(tiny_model, docs, tmp_path, monkeypatch):
    """An interrupt inside the 4th document's forward (after layer 0 was captured) must not
    commit that document: the re-run redoes it and the rows equal an uninterrupted run."""
    path, _ = docs
    full = tmp_path / "full"
    runner.run(make_config(tiny_model, path, full, capture=SPARSE), progress=False)

    def interrupt():
        raise KeyboardInterrupt

    _stop_in_the_fourth_document(monkeypatch, interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        runner.run(make_config(tiny_model, path, out, capture=SPARSE), progress=False)
    monkeypatch.undo()
    committed = json.loads((out / "qk_sniff.json").read_text())["examples"]
    assert len(committed) == 3, "the interrupted document must not be committed"
    again = runner.run(make_config(tiny_model, path, out, capture=SPARSE), progress=False)
    assert (again.resumed, again.documents) == (3, 3)
    assert_same_rows(all_rows(out), all_rows(full))
    assert cli.verify_dataset(out, log=lambda *_: None) == []


def test_sigterm_mid_forward_closes_the_folder_as_ctrl_c_does(tiny_model, docs, tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's time limit, torchrun stopping a rank) killed `qk-sniff run` with its folder
    unclosed: the lock left behind, verify failing (no card, the examples table behind the manifest). It is
    handled as Ctrl-C: exit 143, one line, the 4th document not committed, the folder sound, and the re-run
    gives the uninterrupted rows."""
    import os
    import signal

    path, _ = docs
    full = tmp_path / "full"
    runner.run(make_config(tiny_model, path, full, capture=SPARSE), progress=False)
    _stop_in_the_fourth_document(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet"]) == 143
    assert capsys.readouterr().err.splitlines()[-1].startswith("qk-sniff run: terminated (SIGTERM); committed examples")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command's only
    monkeypatch.undo()
    assert len(read_manifest(out)["examples"]) == 3 and not (out / ".qk_sniff.lock").exists()
    assert cli.verify_dataset(out, log=lambda *_: None) == []
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    assert_same_rows(all_rows(out), all_rows(full))


def test_repair_then_rerun_gives_the_uninterrupted_manifest(tiny_model, docs, tmp_path, capsys):
    """After repair dropped some examples and the same command captured them again, the rows, the
    examples table and the manifest's examples, calls and row counts equal an uninterrupted run's."""
    from support.run import assert_same_datasets

    path, _ = docs
    full = tmp_path / "full"
    runner.run(make_config(tiny_model, path, full, capture=SPARSE), progress=False)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.max_samples=3"]) == 0
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    manifest = read_manifest(out)
    key = "l01h01k"
    name = max(manifest["shards"][key], key=lambda n: manifest["shard_info"][f"{key}/{n}"]["segments"])
    (out / key / name).unlink()  # the second run's shard: its examples are dropped
    capsys.readouterr()
    assert cli.main(["repair", str(out)]) == 0
    left = len(read_manifest(out)["examples"])
    assert 0 < left < 6 and "dropped" in capsys.readouterr().out
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    assert_same_datasets(out, full)
    assert cli.main(["verify", str(out)]) == 0


def test_pull_before_capture_push_after(tiny_model, docs, tmp_path, monkeypatch):
    from qk_attn.dataset import hub

    events = []
    monkeypatch.setattr(
        hub,
        "pull",
        lambda repo, out, revision=None, missing_ok=False: events.append(("pull", repo, revision, missing_ok)),
    )
    monkeypatch.setattr(
        hub, "push", lambda out, repo, revision=None, private=False: events.append(("push", repo, revision, private))
    )
    loader = load_rows
    monkeypatch.setattr(prepare, "load_rows", lambda cfg: events.append(("capture",)) or loader(cfg))
    path, _ = docs
    out = tmp_path / "out"
    config = write_config(
        tmp_path,
        tiny_model,
        path,
        out,
        capture=SPARSE,
        output={"hf_repo_id": "org/qk", "hf_branch": "tiny", "private": True},
    )
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    assert events == [("capture",)]  # no --push: no network
    events.clear()
    assert cli.main(["run", "--config", config, "--quiet", "--push"]) == 0
    assert events == [("pull", "org/qk", "tiny", True), ("capture",), ("push", "org/qk", "tiny", True)]


def test_push_does_not_happen_after_a_failed_run(tiny_model, docs, tmp_path, monkeypatch):
    from qk_attn.dataset import hub

    events = []
    monkeypatch.setattr(hub, "pull", lambda *a, **k: None)
    monkeypatch.setattr(hub, "push", lambda *a, **k: events.append("push"))
    monkeypatch.setattr(runner, "_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    path, _ = docs
    config = make_config(tiny_model, path, tmp_path / "out", output={"hf_repo_id": "org/qk"})
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(config, push_to_hub=True, progress=False)
    assert events == []


def test_verify_finds_what_is_wrong(tiny_model, docs, tmp_path, capsys):
    path, _ = docs
    out = tmp_path / "out"
    runner.run(make_config(tiny_model, path, out, capture=SPARSE), progress=False)
    manifest = json.loads((out / "qk_sniff.json").read_text())
    shard = out / "l01h02q" / manifest["shards"]["l01h02q"][0]
    table = pq.read_table(shard)
    original = shard.read_bytes()

    # 1. one row lost: counts and the exact selection both disagree
    pq.write_table(table.slice(1), shard)
    problems = cli.verify_dataset(out, log=lambda *_: None)
    assert any("manifest records" in p and "l01h02q" in p for p in problems)
    assert any("differ from the sampler's selection" in p and "l01h02q" in p for p in problems)

    # 2. a duplicated row and a wrong bucket
    bucket = table.column("bucket").to_numpy().copy()
    bucket[-1] += 1
    broken = pa.concat_tables([table.set_column(2, "bucket", pa.array(bucket, pa.int32())), table.slice(0, 1)])
    pq.write_table(broken, shard)
    problems = cli.verify_dataset(out, log=lambda *_: None)
    assert any("duplicate" in p for p in problems) and any("bucket inconsistent" in p for p in problems)

    # 3. a file the manifest does not list (datasets.load_dataset would read it)
    shard.write_bytes(original)  # the same bytes: a rewrite with other options would fail its sha256
    pq.write_table(table, out / "l01h02q" / "stray.parquet")
    problems = cli.verify_dataset(out, log=lambda *_: None)
    assert len(problems) == 1 and "not listed in the manifest" in problems[0]
    (out / "l01h02q" / "stray.parquet").unlink()
    assert cli.main(["verify", str(out)]) == 0

    # 4. a different schema
    pq.write_table(table.set_column(1, "position", table.column("position").cast(pa.int64())), shard)
    assert cli.main(["verify", str(out)]) == 1
    assert "schema" in capsys.readouterr().out


def test_push_and_pull_commands_call_the_hub_module(tmp_path, monkeypatch, capsys):
    from qk_attn.dataset import hub

    calls = []
    monkeypatch.setattr(
        hub,
        "push",
        lambda out, repo, revision=None, private=False, progress=True: calls.append(
            ("push", out, repo, revision, private, progress)
        ),
    )
    monkeypatch.setattr(
        hub,
        "pull",
        lambda repo, out, revision=None, progress=True: calls.append(("pull", repo, out, revision, progress)),
    )
    assert cli.main(["push", "out", "--repo", "org/qk", "--revision", "b", "--private"]) == 0
    assert cli.main(["pull", "out", "--repo", "org/qk"]) == 0
    assert cli.main(["push", "out", "--repo", "org/qk", "--quiet"]) == 0
    assert cli.main(["pull", "out", "--repo", "org/qk", "-q"]) == 0
    assert calls == [
        ("push", "out", "org/qk", "b", True, True),
        ("pull", "org/qk", "out", None, True),
        ("push", "out", "org/qk", None, False, False),
        ("pull", "org/qk", "out", None, False),
    ]

    def failing(*args, **kwargs):
        raise HubError("pushing out to org/qk failed: 401 Unauthorized")

    monkeypatch.setattr(hub, "push", failing)
    assert cli.main(["push", "out", "--repo", "org/qk"]) == 1
    assert "401 Unauthorized" in capsys.readouterr().err


def test_token_ids_and_token_strings_match_the_tokenizer(tiny_model, docs, tmp_path, capsys, monkeypatch):
    """Issue 12: every row's token_id is the tokenizer's id at that position, token_str (stored with
    capture_token_strings: true) its convert_ids_to_tokens, and load(tokens=True) decodes the same."""
    from transformers import AutoTokenizer

    from qk_attn.dataset.load import load

    path, rows = docs
    out = tmp_path / "out"
    config = write_config(
        tmp_path,
        tiny_model,
        path,
        out,
        capture=dict(SPARSE, capture_token_strings=True),
        inference={"batch_size": 2},
        tokenizer={"padding_side": "left"},
    )
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    capsys.readouterr()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoded = {normalize_id(r["doc"]): tokenizer(r["body"])["input_ids"] for r in rows}
    table = load(out, tokens=True).to_pydict()
    assert len(table["example_id"]) > 0
    for e, p, tok, stored, decoded in zip(
        table["example_id"], table["position"], table["token_id"], table["token_str"], table["token"]
    ):
        assert tok == encoded[e][p]
        assert stored == decoded == tokenizer.convert_ids_to_tokens(tok)
    manifest = json.loads((out / "qk_sniff.json").read_text())
    assert manifest["source"]["tokenizer"] == str(tiny_model)
    assert cli.main(["verify", str(out)]) == 0
    assert "token ids against 6 source documents" in capsys.readouterr().out

    # verify encodes the source documents again: a document changed since the capture is found.
    changed = [dict(r, body=r["body"].replace("w", "w1", 1)) if i == 1 else r for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in changed))
    assert cli.main(["verify", str(out)]) == 1
    assert (
        "rows differ from the source documents encoded again, e.g. example " + str(normalize_id("doc-1"))
        in capsys.readouterr().out
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # The card's loading snippet shows the token strings, and runs as written.
    card = (out / "README.md").read_text()
    assert "`token_id` int32" in card and "`token_str` string" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('split="train")', f'split="train", cache_dir={str(tmp_path / "cache")!r})')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code, scope)
    assert "token" in scope["tokens"].column_names and scope["tokens"].num_rows == scope["table"].num_rows


def test_summary_reports_how_long_capture_waited_for_the_saver():
    """A run that waited for host pool space says so, with the share of the run; one that never waited doesn't."""
    quiet = RunSummary(output="out", model="m", dataset="d", seconds=10.0)
    assert not any(line.startswith("waits") for line in quiet.lines())
    slowed = RunSummary(output="out", model="m", dataset="d", seconds=10.0, pool_waits=(3, 2.5))
    (line,) = [line for line in slowed.lines() if line.startswith("waits")]
    assert "3 time(s), 2.5 s (25% of the run)" in line and "inference.pinned_mb" in line


def test_summary_shows_long_dataset_ids_cut_short():
    """A dataset id may be a whole text: the summary's ids line printed a 5,000-character id in full."""
    summary = RunSummary(output="out", model="m", dataset="d", ids={7: "x" * 5000, 8: "short"})
    (line,) = [line for line in summary.lines() if line.startswith("ids")]
    assert len(line) < 120 and "'xxx" in line and "... -> 7" in line and "'short' -> 8" in line


def test_a_release_the_modeling_checks_refuse_is_one_line_and_exit_2(tiny_model, docs, tmp_path, capsys, monkeypatch):
    """What modeling_checks refuses (here a new branch on the implementation's name in modeling_llama.py)
    reaches a `qk-sniff run` user as one line naming file and line, exit 2, nothing committed."""
    import transformers.models.llama.modeling_llama as modeling_llama

    from qk_attn.capture import modeling_checks
    from support.release import edit_file

    branch = (
        "        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS",
        '        if self.config._attn_implementation == "sdpa":\n'
        "            pass\n"
        "        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS",
    )
    monkeypatch.setattr(modeling_checks, "_refusals", {})
    monkeypatch.setattr(modeling_checks, "transformers_root", lambda: tmp_path / "tf")
    edit_file(modeling_llama, [branch], tmp_path / "tf", monkeypatch)
    path, _ = docs
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "tokenizer.max_length=64"]) == 2
    err = capsys.readouterr().err
    assert "models/llama/modeling_llama.py line" in err and "a branch qk-attn does not know" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "qk_sniff.json").exists() or not read_manifest(out).get("examples")


def test_a_card_left_behind_its_manifest_is_a_leftover_the_next_open_makes_good(tiny_model, docs, tmp_path):
    """A run killed while it wrote the card (it comes after the manifest) left the earlier run's card,
    older than the manifest: that is a leftover, so even a run with nothing left to capture opens the
    folder, and its close writes the card again."""
    from qk_attn.storage.folder import has_leftovers

    path, _ = docs
    out = tmp_path / "out"
    runner.run(make_config(tiny_model, path, out, capture=SPARSE, dataset={"max_samples": 2}), progress=False)
    earlier_card = (out / "README.md").read_text()
    runner.run(make_config(tiny_model, path, out, capture=SPARSE), progress=False)
    assert not has_leftovers(out)
    (out / "README.md").write_text(earlier_card)  # as a kill while the card was written leaves it:
    manifest_time = (out / "qk_sniff.json").stat().st_mtime_ns  # the earlier card, older than the manifest
    os.utime(out / "README.md", ns=(manifest_time - 10**9, manifest_time - 10**9))
    assert has_leftovers(out)


def test_a_killed_runs_lock_file_is_deleted_by_a_run_with_nothing_left_to_capture(tiny_model, docs, tmp_path):
    """A SIGKILL leaves OUT/.qk_sniff.lock (no longer held); a re-run with nothing to capture did not open
    the folder, so the file stayed, where README says a run deletes it when it ends."""
    path, _ = docs
    out = tmp_path / "out"
    config = make_config(tiny_model, path, out, capture=SPARSE, dataset={"max_samples": 2})
    runner.run(config, progress=False)
    (out / ".qk_sniff.lock").touch()  # what a killed writer leaves
    summary = runner.run(config, progress=False)
    assert summary.resumed == 2 and not (out / ".qk_sniff.lock").exists()


def test_the_command_ignores_the_environment_however_python_is_told_to_run_it(tiny_model, docs, tmp_path):
    """`python -mqk_attn.cli` (no space) is the command too: a bad QK_SNIFF_* value broke it at import."""
    import subprocess
    import sys

    out = tmp_path / "out"
    runner.run(make_config(tiny_model, docs[0], out, capture=SPARSE, dataset={"max_samples": 1}), progress=False)
    env = dict(os.environ, QK_SNIFF_SAMPLER="nope", QK_SNIFF_OUTPUT=str(tmp_path / "elsewhere"))
    for flags in (["-mqk_attn.cli"], ["-Im", "qk_attn.cli"], ["-u", "-X", "utf8", "-m", "qk_attn.cli"]):
        result = subprocess.run(
            [sys.executable, *flags, "inspect", str(out)], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (flags, result.stderr)
        assert "QK_SNIFF_SAMPLER" not in result.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_the_progress_bar_ends_on_the_rows_written(tiny_model, docs, tmp_path, capsys):
    """The bar showed the rows the saver had taken at the last forward's end (460 of 554 written)."""
    import re

    path, _ = docs
    summary = runner.run(make_config(tiny_model, path, tmp_path / "out", capture=SPARSE), progress=True)
    shown = re.findall(r"([\d,]+) rows\]", capsys.readouterr().err)
    assert shown and int(shown[-1].replace(",", "")) == summary.rows_written > 0


@pytest.mark.parametrize("command", ["verify", "inspect", "repair"])
def test_an_empty_folder_argument_is_a_usage_error(command, tmp_path, monkeypatch, capsys):
    """`qk-sniff verify ""` checked the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        cli.main([command, ""])
    assert stopped.value.code == 2 and "an empty path names no folder" in capsys.readouterr().err
