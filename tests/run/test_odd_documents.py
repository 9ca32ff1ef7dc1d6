"""Datasets with odd documents: empty texts, null ids. The capture is exact or the run refuses in one line."""

from __future__ import annotations

import json

import pytest

from qk_attn import cli
from qk_attn.run import runner
from qk_attn.run.config import RunConfig
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
    again = runner.run(RunConfig.from_dict(config.to_dict()), progress=False, log=lambda *a: None)
    assert (again.documents, again.resumed, again.empty) == (0, 1, 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_null_id_is_refused(tiny_model, tmp_path, capsys, streaming):
    docs = _jsonl(tmp_path / "d.jsonl", [{"doc": "a", "body": "w1"}, {"doc": None, "body": "w2"}])
    path = write_config(tmp_path, tiny_model, docs, tmp_path / "out", dataset={"streaming": streaming})
    code = cli.main(["run", "--config", path, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "dataset.id_column='doc': row 1 has no id (null)" in err
    if not streaming:  # refused before the weights load, in one line
        assert len([line for line in err.splitlines() if line.strip()]) == 1
