"""Progress of the commands that read a finished capture: `verify`, `inspect` and `repair` show a
tqdm bar on stderr over each pass's unit (shards, (layer, head, kind) folders), as `qk-sniff run`
shows one over documents; `--quiet` (and `progress=False` in Python) shows none. Real folders."""

from __future__ import annotations

import re

import pytest

from qk_attn import cli
from qk_attn.dataset.inspect import inspect_dataset
from qk_attn.dataset.repair import repair_dataset
from qk_attn.dataset.verify import verify_dataset
from qk_attn.storage.manifest import read_manifest
from support.storage import open_sink, run_examples


@pytest.fixture
def out(tmp_path):
    """A committed capture: 2 layers x (2 query + 1 key) heads, 4 examples committed in 2 commits."""
    out = tmp_path / "out"
    sink = open_sink(out)
    for examples in ([0, 1], [2, 3]):
        run_examples(sink, examples, commit=False)
        sink.commit(examples)
        sink.flush(timeout=10)
    sink.close()
    return out


def counts(out):
    manifest = read_manifest(out)
    return sum(len(names) for names in manifest["shards"].values()), len(manifest["shards"])


def finished(err: str, desc: str, unit: str, total: int) -> bool:
    """Whether stderr shows the bar `desc` at total/total, its rate in `unit`s (tqdm writes
    `12.3unit/s`, or `4.5s/unit` below one a second)."""
    rate = rf"(\d[\d.]*{unit}/s|\d[\d.]*s/{unit})"
    return re.search(rf"{re.escape(desc)}: 100%\|[^|]*\| {total}/{total} \[[^\]]*{rate}\]", err) is not None


@pytest.mark.parametrize(
    "command, bars",
    [
        ("verify", [("qk-sniff verify: shards", "shard"), ("qk-sniff verify: folders", "folder")]),
        ("inspect", [("qk-sniff inspect: folders", "folder")]),
        ("repair", [("qk-sniff repair: shards", "shard"), ("qk-sniff verify: selections", "folder")]),
    ],
)
def test_a_command_shows_a_bar_per_pass_on_stderr_and_none_with_quiet(out, capfd, command, bars):
    shards, folders = counts(out)
    assert cli.main([command, str(out)]) == 0
    captured = capfd.readouterr()
    for desc, unit in bars:
        assert finished(captured.err, desc, unit, shards if unit == "shard" else folders), (desc, captured.err)
    assert "%|" not in captured.out  # the report stays on stdout, the bars on stderr only
    assert cli.main([command, str(out), "--quiet"]) == 0
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out  # the report, without a bar
    assert cli.main([command, "-q", str(out)]) == 0
    assert capfd.readouterr().err == ""


def test_the_python_functions_show_bars_unless_told_not_to(out, capfd):
    shards, folders = counts(out)
    assert verify_dataset(out, log=lambda *_: None) == []
    err = capfd.readouterr().err
    assert finished(err, "qk-sniff verify: shards", "shard", shards)
    assert finished(err, "qk-sniff verify: selections", "folder", folders)
    assert inspect_dataset(out)
    assert finished(capfd.readouterr().err, "qk-sniff inspect: folders", "folder", folders)
    assert verify_dataset(out, log=lambda *_: None, progress=False) == []
    assert inspect_dataset(out, progress=False)
    assert repair_dataset(out, log=lambda *_: None, progress=False) == 0
    assert capfd.readouterr().err == ""


def test_repair_shows_its_rewrite_when_it_mends_something(out, capfd):
    manifest = read_manifest(out)
    key = "l01h00q"
    shard = out / key / manifest["shards"][key][-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, other bytes
    shard.write_bytes(data)
    shards, folders = counts(out)
    assert cli.main(["repair", str(out)]) == 0
    err = capfd.readouterr().err
    assert finished(err, "qk-sniff repair: shards", "shard", shards)
    assert finished(err, "qk-sniff repair: rewrite", "folder", folders)
