"""Integrity under every fault (issue 18): resume, compaction and repair never launder or destroy
data. Each fault is made on real files; the end state is checked against an uninterrupted
reference (sorted rows, vector bytes included), and `verify` and `repair` must agree."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import qk_attn
from qk_attn import cli
from qk_attn.dataset.repair import repair, repair_dataset
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import CorruptShard, DamagedDataset
from qk_attn.storage import compact
from qk_attn.storage.layout import EXAMPLES, MANIFEST, PREVIOUS, QUARANTINE
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.records import segment_examples
from support.storage import folder_table, open_sink, reference, run_examples, sort_rows

MANY = list(range(17))  # one segment each: 17 small shards per folder, so closing compacts them (COMPACT_AT_CLOSE)
NOTHING_TO_REPAIR = {"restored": False, "bad": [], "dropped": [], "tidied": [], "examples_rewritten": False}


def capture(out, examples, per_segment=1, layers=(0, 1)):
    sink = open_sink(out)
    batches = []
    todo = [e for e in examples if e not in sink.committed_ids()]
    for i in range(0, len(todo), per_segment):
        batches += run_examples(sink, todo[i : i + per_segment], layers=layers, commit=False)
        sink.commit(todo[i : i + per_segment])
        sink.flush(timeout=10)
    sink.close()
    return batches


def quiet(out):
    return verify_dataset(out, log=lambda *_: None)


def repaired(out) -> tuple[int, list[str]]:
    lines = []
    return repair_dataset(out, log=lines.append), lines


def flip(path: Path, at: int) -> None:
    """One bit, size unchanged."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def vector_page_byte(path: Path, row_group: int = 0) -> int:
    """A byte in the middle of the vector column's data of one row group (past its page header)."""
    group = pq.read_metadata(path).row_group(row_group)
    column = next(
        group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema.startswith("vector")
    )
    return column.data_page_offset + column.total_compressed_size * 2 // 3


@pytest.fixture(scope="module")
def compacted(tmp_path_factory):
    """17 examples committed one per segment, compacted at close into one shard per folder;
    and the uninterrupted reference rows."""
    out = tmp_path_factory.mktemp("faults") / "compacted"
    batches = capture(out, MANY)
    manifest = read_manifest(out)
    assert all(len(names) == 1 for names in manifest["shards"].values())  # merged
    return out, sort_rows(reference(batches))


def copy_of(compacted, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(compacted[0], out)
    return out


def assert_complete(out, want):
    """Every example committed, rows equal to the uninterrupted reference, verify and repair agree
    (verify passes and repair finds nothing to do)."""
    assert sorted(map(int, read_manifest(out)["examples"])) == MANY
    assert sort_rows(folder_table(out)).equals(want)
    assert quiet(out) == []
    assert repair(out, log=lambda *_: None) == NOTHING_TO_REPAIR


def test_a_bit_flip_in_a_data_page_is_refused_on_resume_never_compacted_and_costs_one_segment(compacted, tmp_path):
    out = copy_of(compacted, tmp_path)
    key = "l01h00q"
    name = read_manifest(out)["shards"][key][0]
    path = out / key / name
    groups = read_manifest(out)["shard_info"][f"{key}/{name}"]["row_groups"]
    assert len(groups) == pq.read_metadata(path).num_row_groups == len(MANY)  # one row group per part
    flip(path, vector_page_byte(path, row_group=5))
    assert any(name in p and "sha256" in p for p in quiet(out))
    with pytest.raises(DamagedDataset, match=f"qk-sniff repair {out}"):  # a resume never builds on it
        open_sink(out)
    with pytest.raises(CorruptShard):  # nor does compaction copy it into a new shard
        compact.merge(out / key, [name], "s999999-p0000.parquet", key, read_manifest(out))
    assert not (out / key / ".s999999-p0000.parquet.tmp").exists()
    with pytest.raises(CorruptShard):
        qk_attn.load(out, layer=1, head=0, kind="q")

    lost = sorted(segment_examples(read_manifest(out), groups[5]["segments"]))
    assert len(lost) == 1
    code, lines = repaired(out)
    assert code == 0 and quiet(out) == []
    assert sorted(map(int, read_manifest(out)["examples"])) == sorted(set(MANY) - set(lost))  # only that one
    kept = sort_rows(folder_table(out))
    want = compacted[1]
    intact = want.filter(~np.isin(want.column("example_id").to_numpy(), lost))
    assert kept.equals(intact)  # no intact row deleted, no damaged one kept
    card = (out / "README.md").read_text()
    assert f"{len(MANY) - 1} " in card  # the card follows the manifest

    capture(out, MANY)  # the same command again: recaptures exactly the dropped example
    assert_complete(out, want)


def test_a_bit_flip_in_a_footer_is_reported_without_traceback_and_repaired(compacted, tmp_path, capsys):
    out = copy_of(compacted, tmp_path)
    key = "l00h01q"
    name = read_manifest(out)["shards"][key][0]
    path = out / key / name
    flip(path, path.stat().st_size - 200)  # inside the footer's Thrift metadata
    code = cli.main(["verify", str(out)])
    text = capsys.readouterr()
    assert code == 1 and "Traceback" not in text.err and name in text.out
    code, lines = repaired(out)
    assert code == 0 and quiet(out) == []
    capture(out, MANY)
    assert_complete(out, compacted[1])


def test_stray_and_duplicate_files_are_quarantined_or_removed_never_read(compacted, tmp_path):
    out = copy_of(compacted, tmp_path)
    key = "l00h00k"
    name = read_manifest(out)["shards"][key][0]
    shutil.copy(out / key / name, out / key / "copy of shard.parquet")  # a person's duplicate
    shutil.copy(out / key / name, out / key / "s000900-p0000.parquet")  # a writer's orphan
    (out / key / ".s000901-p0000.parquet.tmp").write_bytes(b"half")
    assert len(quiet(out)) == 1
    code, lines = repaired(out)
    assert code == 0 and quiet(out) == []
    assert (out / QUARANTINE / key / "copy of shard.parquet").is_file()
    assert sorted(p.name for p in (out / key).iterdir()) == [name]
    assert_complete(out, compacted[1])


@pytest.mark.parametrize(
    "change",
    ["seed", "row_count", "valid_length", "shard_key", "rope_without_digest", "seed_without_digest_or_history"],
)
def test_a_changed_manifest_value_is_found_by_verify_and_repaired(compacted, tmp_path, change, capsys):
    out = copy_of(compacted, tmp_path)
    text = (out / MANIFEST).read_text()
    manifest = json.loads(text)
    if change == "seed":
        manifest["sampler"]["seed"] += 1
    elif change == "row_count":
        manifest["row_counts"]["l00h00q"] += 1
    elif change == "valid_length":
        manifest["examples"]["3"] -= 1
    elif change == "rope_without_digest":  # the digest removed too, as a hand edit that "fixes" the refusal would
        manifest["config"]["rope"] = "pre"
        del manifest["digest"]
    elif change == "seed_without_digest_or_history":  # what dates it removed too: the signed card still does
        manifest["sampler"]["seed"] += 1
        del manifest["digest"], manifest["release_history"]
    else:  # one flipped letter in a key turns off checking of that shard
        info = manifest["shard_info"]
        old = sorted(info)[0]
        info[old.replace("l00", "l08")] = info.pop(old)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    problems = quiet(out)
    assert len(problems) == 1 and "digest" in problems[0]
    assert cli.main(["verify", str(out)]) == 1 and "Traceback" not in capsys.readouterr().err
    code, lines = repaired(out)
    assert code == 0 and any(PREVIOUS in line for line in lines) and quiet(out) == []
    capture(out, MANY)  # examples committed after the previous manifest are captured again
    assert_complete(out, compacted[1])


def test_the_examples_table_is_rebuilt_when_it_lags_the_manifest(tmp_path, monkeypatch):
    from qk_attn.storage import saver

    monkeypatch.setattr(saver, "EXPORT_EVERY_S", 1e9)  # exported at the first commit and at close only
    out, crashed = tmp_path / "out", tmp_path / "crashed"
    sink = open_sink(out)
    batches = []
    for example in (0, 1):
        batches += run_examples(sink, [example])
        sink.flush(timeout=10)
    shutil.copytree(out, crashed)  # the state a kill leaves now: two examples, the table lists one
    sink.close()
    problems = quiet(crashed)
    # a run killed before its close also leaves no card: datasets.load_dataset would find no configs
    assert len(problems) == 2 and "lags the manifest" in problems[0] and "README.md (the dataset card" in problems[1]
    second = tmp_path / "second"
    shutil.copytree(crashed, second)
    open_sink(crashed).close()  # the next run rebuilds it
    assert repaired(second)[0] == 0  # and so does repair
    for folder in (crashed, second):
        assert quiet(folder) == []
        assert pq.read_table(folder / EXAMPLES).equals(qk_attn.load_examples(folder))


def test_failed_and_finished_commands_leave_no_lock(compacted, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["repair", str(foreign)]) == 2
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = copy_of(compacted, tmp_path)
    assert cli.main(["repair", str(out)]) == 0
    open_sink(out).close()
    assert not list(out.glob("*.lock")) and not list(out.glob(".*.lock"))


# ---- SIGKILL at random points of compaction and repair ------------------------------------------
SERVER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from support.storage import open_sink
    from qk_attn.dataset.repair import repair
    # What compaction, repair and the card import on first use, imported once here: a forked child
    # then spends its time in the work being killed, not in imports.
    from qk_attn.storage import card, compact, shards  # noqa: F401
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
    import pyarrow.dataset  # noqa: F401 - pq.read_table's first call imports it (and pandas): 0.4 s
    print("ready", flush=True)
    for line in sys.stdin:  # "<what> <folder> <delay s>": fork, run it, SIGKILL it after the delay
        what, folder, delay = line.split()
        pid = os.fork()
        if pid == 0:
            if what == "compact":
                open_sink(folder).close()  # closing compacts the 17 small shards of each folder
            else:
                repair(folder, log=lambda *_: None)
            os._exit(0)
        started = time.monotonic()
        deadline = started + float(delay)
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                print("killed", flush=True)
                break
            time.sleep(0.001)
        else:
            print(f"finished {time.monotonic() - started:.4f}", flush=True)  # how long the whole command took
""")


@pytest.fixture
def killer(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(SERVER)
    tests, repo = Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tests)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    ready = []

    def kill(what: str, folder: Path, delay: float) -> str:
        """'killed', or 'finished SECONDS' when the command ended before the delay."""
        if not ready:  # the server imports while the test captures its reference
            assert proc.stdout.readline().strip() == "ready"
            ready.append(True)
        proc.stdin.write(f"{what} {folder} {delay:.4f}\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    yield kill
    proc.stdin.close()
    proc.wait(timeout=30)


def test_sigkill_at_random_points_of_compaction_and_repair(tmp_path, killer):
    rng = random.Random(18)
    small = tmp_path / "small"  # 17 committed small shards per folder (3 folders: one layer), not compacted yet
    want = sort_rows(reference(capture_uncompacted(small, layers=(0,))))
    start = time.perf_counter()
    outcomes = []
    shutil.copytree(small, tmp_path / "timed")
    outcome, span = killer("compact", tmp_path / "timed", 30).split()  # how long an uninterrupted one takes
    assert outcome == "finished"
    spans = [span := float(span)]
    for i in range(10):
        out = tmp_path / f"c{i}"
        shutil.copytree(small, out)
        outcomes.append(killer("compact", out, rng.uniform(0, span)))
        if i % 2:
            assert repaired(out)[0] == 0
        else:
            open_sink(out).close()  # the next run
        assert_complete(out, want)
    # repair of a damaged merged shard, killed at random points, then repaired again
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "timed", damaged)
    key = "l00h01q"
    name = read_manifest(damaged)["shards"][key][0]
    flip(damaged / key / name, vector_page_byte(damaged / key / name, row_group=2))
    lost = segment_examples(
        read_manifest(damaged), read_manifest(damaged)["shard_info"][f"{key}/{name}"]["row_groups"][2]["segments"]
    )
    timed = tmp_path / "timed-repair"
    shutil.copytree(damaged, timed)
    outcome, span = killer("repair", timed, 30).split()
    assert outcome == "finished"
    spans.append(span := float(span))
    for i in range(10):
        out = tmp_path / f"r{i}"
        shutil.copytree(damaged, out)
        outcomes.append(killer("repair", out, rng.uniform(0, span)))
        assert repaired(out)[0] == 0  # 0 only when verify then passes
        committed = set(map(int, read_manifest(out)["examples"]))
        assert set(MANY) - committed <= lost  # never more than the damaged row group's examples
        capture(out, MANY, layers=(0,))
        assert_complete(out, want)
    assert len(outcomes) == 20 and outcomes.count("killed") >= 10, outcomes
    print(
        f"20 kills in {time.perf_counter() - start:.1f} s (compaction {spans[0]:.2f} s, repair {spans[1]:.2f} s): "
        f"{outcomes.count('killed')} killed mid-way"
    )


def capture_uncompacted(out, layers=(0, 1)):
    """MANY committed one per segment, closed without compaction (a kill then compacts nothing twice)."""
    from qk_attn.storage import saver

    at_close = saver.COMPACT_AT_CLOSE
    saver.COMPACT_AT_CLOSE = 10**6
    try:
        return capture(out, MANY, layers=layers)
    finally:
        saver.COMPACT_AT_CLOSE = at_close


def test_a_card_behind_its_manifest_is_reported_and_written_again(tmp_path):
    """A run stopped between its last manifest and its card (a kill, a full disk) left the earlier card:
    its counts and configs named fewer examples, and verify passed. verify now holds the card to the
    manifest it was written from; repair writes it again (also a card that is missing)."""
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0])
    sink.close()
    earlier = (out / "README.md").read_text()
    sink = open_sink(out)
    run_examples(sink, [1, 2])
    sink.close()
    assert quiet(out) == []
    (out / "README.md").write_text(earlier)
    problems = quiet(out)
    assert len(problems) == 1 and problems[0].startswith("README.md was written from an earlier manifest"), problems
    code, lines = repaired(out)
    assert code == 0 and any(line.startswith("wrote README.md again") for line in lines)
    assert quiet(out) == [] and "| 3 |" in (out / "README.md").read_text()
    (out / "README.md").unlink()
    assert quiet(out)[0].startswith("README.md (the dataset card")
    assert repaired(out)[0] == 0 and quiet(out) == []
