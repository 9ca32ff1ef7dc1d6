"""A folder of .txt files is read as its glob is: dataset.sample_by splits it the same way (it was
ignored: one document per line whatever sample_by said, while the card said `document`). A file
in it that is not UTF-8 is named; sample_by on data that is not text is refused."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from qk_attn import cli
from qk_attn.run import runner
from qk_attn.run.config import RunConfig
from qk_attn.run.documents import iter_documents, load_rows
from qk_attn.storage.manifest import read_manifest, write_json_atomic
from support.run import assert_same_datasets, write_config

TEXT = {"text_column": "text", "id_column": None}
FILES = {
    "a.txt": "w1 w2 w3\nw4 w5\n\nw6 w7\n",
    "b.txt": "w9 w10\nw11\n",
}


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "texts"
    path.mkdir()
    for name, text in FILES.items():
        (path / name).write_text(text)
    return path


def _texts(path, sample_by) -> list[str]:
    cfg = RunConfig.from_dict(
        {
            "dataset": {"path": str(path), "sample_by": sample_by},
            "model": {"name": "m"},
            "output": {"data_root": "o"},
        }
    ).dataset
    return [d.text for d in iter_documents(load_rows(cfg), cfg)]


def _run(capsys, tmp_path, tiny_model, path, out, *sets) -> tuple[int, str]:
    config = write_config(tmp_path, tiny_model, path, out, dataset=TEXT)
    code = cli.main(["run", "--config", config, "--quiet", *sets])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "sample_by, want",
    [
        ("document", list(FILES.values())),
        ("paragraph", ["w1 w2 w3\nw4 w5", "w6 w7\n", "w9 w10\nw11\n"]),
        ("line", ["w1 w2 w3", "w4 w5", "", "w6 w7", "w9 w10", "w11"]),
    ],
)
def test_a_folder_of_text_files_is_split_by_sample_by_as_its_glob_is(folder, sample_by, want):
    assert _texts(folder, sample_by) == want
    assert _texts(folder / "*.txt", sample_by) == want


def test_a_run_over_a_folder_equals_the_run_over_its_glob_row_for_row(tiny_model, folder, tmp_path, capsys):
    by_folder, by_glob = tmp_path / "by-folder", tmp_path / "by-glob"
    assert _run(capsys, tmp_path, tiny_model, folder, by_folder) == (0, "")
    assert _run(capsys, tmp_path, tiny_model, folder / "*.txt", by_glob) == (0, "")
    assert len(read_manifest(by_folder)["examples"]) == len(FILES)  # one document per file
    assert_same_datasets(by_folder, by_glob)
    assert cli.main(["verify", str(by_folder)]) == 0  # its token check reads the folder the same way
    assert "token ids against 2 source documents" in capsys.readouterr().out

    # sample_by: line on the folder is one document per line, as on the glob
    lines_folder, lines_glob = tmp_path / "lines-folder", tmp_path / "lines-glob"
    assert _run(capsys, tmp_path, tiny_model, folder, lines_folder, "--set", "dataset.sample_by=line")[0] == 0
    assert _run(capsys, tmp_path, tiny_model, folder / "*.txt", lines_glob, "--set", "dataset.sample_by=line")[0] == 0
    assert_same_datasets(lines_folder, lines_glob)
    indices = pq.read_table(lines_folder / "examples.parquet").column("source_index").to_pylist()
    assert indices == list(range(6))  # one document per line (the empty one is its BOS token)


def test_a_folder_captured_before_sample_by_applied_to_it_is_not_resumed(tiny_model, folder, tmp_path, capsys):
    """Such a capture says `sample_by: document` but holds one document per line: resuming it per file
    would give the same row numbers to other documents. It still verifies (read by line, as then)."""
    out = tmp_path / "out"
    assert _run(capsys, tmp_path, tiny_model, folder, out, "--set", "dataset.sample_by=line")[0] == 0
    manifest = read_manifest(out)  # what the earlier version recorded for this folder
    manifest["source"]["sample_by"] = "document"
    del manifest["source"]["text_folder"]
    write_json_atomic(out / "qk_sniff.json", manifest)
    assert cli.main(["repair", str(out)]) == 0  # writes the card again from this manifest
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 0
    assert "token ids against 6 source documents" in capsys.readouterr().out
    for argv in (["--dry-run"], []):
        code, err = _run(capsys, tmp_path, tiny_model, folder, out, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "made before dataset.sample_by applied to folders" in err and "output.overwrite: true" in err
    assert _run(capsys, tmp_path, tiny_model, folder, out, "--set", "output.overwrite=true")[0] == 0
    assert len(read_manifest(out)["examples"]) == len(FILES)


def test_a_file_of_a_folder_that_is_not_utf8_is_named(tiny_model, folder, tmp_path, capsys, monkeypatch):
    (folder / "c.txt").write_bytes("w1 caf\u00e9\n".encode("latin-1"))
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, err = _run(capsys, tmp_path, tiny_model, folder, tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{folder / 'c.txt'} is not UTF-8 text (byte 0xe9 at offset 6)" in err


def test_sample_by_on_data_that_is_not_text_is_refused(tiny_model, docs, tmp_path, capsys, monkeypatch):
    path, rows = docs
    jsonl_folder = tmp_path / "jsonl"
    jsonl_folder.mkdir()
    (jsonl_folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for dataset, what in ((path, "'json' builder"), (jsonl_folder, "'json' builder"), ("org/name", "a Hub dataset")):
        config = write_config(tmp_path, tiny_model, dataset, tmp_path / "out")
        code = cli.main(["run", "--config", config, "--quiet", "--dry-run", "--set", "dataset.sample_by=paragraph"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "dataset.sample_by='paragraph' applies to local .txt files" in err and what in err
