"""Datasets with odd documents: empty or null texts, null or inexact ids. The capture is exact or the run
refuses in one line."""

from __future__ import annotations

import json

import pytest

import qk_attn
from qk_attn import cli
from qk_attn.run import runner
from qk_attn.run.config import RunConfig
from qk_attn.run.documents import normalize_id
from qk_attn.storage.manifest import read_manifest
from support.run import make_config, write_config

NO_BOS = {"add_special_tokens": False}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _refuse_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(runner, "load_model", refuse)


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qk-sniff run: "), lines
    return lines[0]


def test_a_dataset_whose_documents_all_have_no_tokens_is_refused(tiny_model, tmp_path, capsys, monkeypatch):
    docs = _jsonl(tmp_path / "d.jsonl", [{"doc": "a", "body": ""}, {"doc": "b", "body": " \n\t"}])
    _refuse_weights(monkeypatch)
    code = cli.main(
        ["run", "--config", write_config(tmp_path, tiny_model, docs, tmp_path / "out", tokenizer=NO_BOS), "--quiet"]
    )
    line = _one_line(capsys)
    assert code == 2 and "all 2 document(s)" in line and "have no tokens" in line
    assert not (tmp_path / "out").exists()


def test_a_resume_with_only_empty_documents_left_loads_no_weights(tiny_model, tmp_path, monkeypatch):
    docs = _jsonl(tmp_path / "d.jsonl", [{"doc": "a", "body": ""}, {"doc": "b", "body": "w1 w2"}])
    config = make_config(tiny_model, docs, tmp_path / "out", tokenizer=NO_BOS)
    lines: list[str] = []
    first = runner.run(config, progress=False, log=lines.append)
    assert (first.documents, first.empty, first.resumed) == (1, 1, 0)
    assert any("1 of 2 document(s) have no tokens" in line for line in lines)
    assert any("estimate: 1 document(s)" in line for line in lines)  # the empty one is not estimated
    _refuse_weights(monkeypatch)
    lines.clear()
    again = runner.run(RunConfig.from_dict(config.to_dict()), progress=False, log=lines.append)
    assert (again.documents, again.resumed, again.empty) == (0, 1, 1)
    # Counted among the documents left (the committed one is not), not as "1 of 1 document(s)".
    assert any("1 of 1 document(s) left to capture have no tokens" in line for line in lines), lines


@pytest.mark.parametrize("streaming", [False, True])
def test_a_null_id_is_refused(tiny_model, tmp_path, capsys, streaming):
    docs = _jsonl(tmp_path / "d.jsonl", [{"doc": "a", "body": "w1"}, {"doc": None, "body": "w2"}])
    path = write_config(tmp_path, tiny_model, docs, tmp_path / "out", dataset={"streaming": streaming})
    code = cli.main(["run", "--config", path, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "dataset.id_column='doc': row 1 has no id (null)" in err
    if not streaming:  # refused before the weights load, in one line
        assert len([line for line in err.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_json_integer_ids_outside_int64_are_refused_not_made_floats(tiny_model, tmp_path, capsys, streaming):
    """pyarrow's JSON reader turns the whole column into floats (2**63 -> 9.223372036854776e+18, and
    -2**63 beside it too): hashed, such ids would name no document of the file."""
    docs = _jsonl(tmp_path / "d.jsonl", [{"doc": 2**63, "body": "w1"}, {"doc": -(2**63), "body": "w2"}])
    path = write_config(tmp_path, tiny_model, docs, tmp_path / "out", dataset={"streaming": streaming})
    code = cli.main(["run", "--config", path, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "dataset.id_column='doc': row 0 has id 9.223372036854776e+18, a float too large" in err
    assert "outside int64" in err and not (read_manifest(tmp_path / "out") or {}).get("examples")
    if not streaming:
        assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_integer_ids_at_the_ends_of_int64_pass_through_unchanged(tiny_model, tmp_path, capsys):
    ids = [-(2**63), 2**63 - 1, 0]
    docs = _jsonl(tmp_path / "d.jsonl", [{"doc": i, "body": f"w{n + 1}"} for n, i in enumerate(ids)])
    out = tmp_path / "out"
    assert cli.main(["run", "--config", write_config(tmp_path, tiny_model, docs, out), "--quiet"]) == 0
    examples = qk_attn.load_examples(out).to_pydict()
    assert sorted(zip(examples["example_id"], examples["source_id"])) == sorted((i, str(i)) for i in ids)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_null_or_missing_text_is_refused_naming_the_row(tiny_model, tmp_path, capsys, monkeypatch, streaming):
    """A missing text is a data error, not an empty document (it was captured as a BOS-only document,
    and the summary said 0 empty)."""
    rows = [{"doc": "a", "body": "w1"}, {"doc": "b"}, {"doc": "c", "body": None}]
    docs = _jsonl(tmp_path / "d.jsonl", rows)
    if not streaming:
        _refuse_weights(monkeypatch)
    path = write_config(tmp_path, tiny_model, docs, tmp_path / "out", dataset={"streaming": streaming})
    code = cli.main(["run", "--config", path, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "dataset.text_column='body': row 1 (id 'b') has no text (null or missing" in err
    if not streaming:  # refused before the weights load (streaming: when the row is read)
        assert len([line for line in err.splitlines() if line.strip()]) == 1 and not (tmp_path / "out").exists()


def test_an_empty_text_is_a_document_of_its_special_tokens(tiny_model, tmp_path):
    """ "" is an empty document: with a BOS token it is captured (one position); without any token it
    is skipped and counted as empty in the summary."""
    docs = _jsonl(tmp_path / "d.jsonl", [{"doc": "a", "body": ""}, {"doc": "b", "body": "w1 w2"}])
    with_bos = runner.run(make_config(tiny_model, docs, tmp_path / "bos"), progress=False, log=lambda *a: None)
    assert (with_bos.documents, with_bos.empty) == (2, 0)
    assert read_manifest(tmp_path / "bos")["examples"][str(normalize_id("a"))] == 1
    none = runner.run(
        make_config(tiny_model, docs, tmp_path / "none", tokenizer=NO_BOS), progress=False, log=lambda *a: None
    )
    assert (none.documents, none.empty) == (1, 1)


def test_a_text_that_is_not_a_string_is_named_with_its_type():
    """`holds a int`: the article follows the type's name."""
    from types import SimpleNamespace

    from qk_attn.run.input_checks import not_text

    cfg = SimpleNamespace(text_column="body", id_column=None)
    assert not_text(cfg, 3, 7, None).endswith("row 3 holds an int, expected text")
    assert not_text(cfg, 3, [1], None).endswith("row 3 holds a list, expected text")
