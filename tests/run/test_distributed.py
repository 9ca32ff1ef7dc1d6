"""Several ranks capture one dataset: `torchrun --nproc-per-node 2` (gloo, CPU), a rank killed and
re-run, and independent `--shard i/2` jobs + `qk-sniff merge` all end with exactly the dataset a
single process writes (same rows, committed ids, row counts, card), loadable the same ways."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

import qk_attn
from qk_attn import cli
from qk_attn.errors import ConfigError
from qk_attn.run import distributed
from qk_attn.storage.manifest import read_manifest
from support.run import text
from support.storage import folder_table, sort_rows

BIN = Path(sys.executable).parent
INDEX = ["example_id", "position", "bucket", "layer", "head", "kind"]
N_DOCS = 8


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):  # noqa: F811
    """Documents, a config writer, and the single-process reference run."""
    root = tmp_path_factory.mktemp("dist")
    lengths = [5, 40, 1, 23, 80, 12, 30, 9]
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"doc": f"doc-{i}", "body": text(n, i)}) + "\n" for i, n in enumerate(lengths)))

    def config(out: Path, **capture) -> Path:
        data = {
            "dataset": {"path": str(docs), "text_column": "body", "id_column": "doc"},
            "model": {"name": str(tiny_model), "dtype": "float32", "device": "cpu"},
            "inference": {"batch_size": 2},
            "capture": {"sampler": "log_uniform", "min_bucket_size": 4, "base_rate": 2, **capture},
            "output": {"data_root": str(out)},
        }
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(data))
        return path

    single = root / "single"
    assert cli.main(["run", "--config", str(config(single)), "-q"]) == 0
    return root, config, single


def assert_same_dataset(got: Path, want: Path) -> None:
    a, b = sort_rows(folder_table(want)), sort_rows(folder_table(got))
    assert b.select(INDEX).equals(a.select(INDEX))  # same rows (hence no duplicates: the reference has none)
    # Batches differ (2 per forward either way, but other partners and padding): float noise only.
    np.testing.assert_allclose(
        np.stack(b["vector"].to_numpy(zero_copy_only=False)),
        np.stack(a["vector"].to_numpy(zero_copy_only=False)),
        rtol=1e-4,
        atol=1e-5,
    )
    m, w = read_manifest(got), read_manifest(want)
    assert len(w["examples"]) == N_DOCS
    for field in ("examples", "row_counts", "buckets", "config", "source", "model", "plan", "sampler"):
        assert m[field] == w[field], field
    assert m["shards"].keys() == w["shards"].keys()
    assert m["ranks"]["world_size"] == 2 and m["ranks"]["incomplete"] == []

    def card(out: Path) -> str:  # the card without its path and timestamps
        body = (out / "README.md").read_text().replace(str(out.resolve()), "OUT").replace(repr(out.name), "'OUT'")
        body = re.sub(r"<!-- qk-sniff wrote this card; sha256 .* -->", "", body)  # signs the text with its paths
        body = re.sub(r"<!-- qk-sniff manifest sha256 .* -->", "", body)  # the manifest's, with its timestamps
        body = re.sub(r"\n  (description|download_size): .*", "", body)  # the shards' digest and bytes: other files
        return re.sub(r"\| (created|updated) \| .* \|", "", body)

    assert card(got) == card(want)
    assert (got / "buckets.png").is_file()
    assert cli.verify_dataset(got, log=lambda *_: None) == []
    # the merged examples table is the single process's, up to which segment an example was in
    assert qk_attn.load_examples(got).equals(qk_attn.load_examples(want))
    assert pq.read_table(got / "examples.parquet").equals(qk_attn.load_examples(got))


def run_both_shards_and_merge(config: str, out: Path) -> None:
    """`--shard 0/2` and `--shard 1/2` as independent jobs, then `qk-sniff merge OUT`."""
    for shard in ("0/2", "1/2"):
        assert cli.main(["run", "--config", config, "--shard", shard, "-q"]) == 0
    assert cli.main(["merge", str(out)]) == 0


def torchrun(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    # cwd outside the repository: its kernels/ folder would shadow Hugging Face's `kernels`.
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    environ.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_rank_detection_and_assignment():
    assert distributed.detect(env={}).is_single
    r = distributed.detect(env={"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h"})
    assert (r.rank, r.world_size, r.launched, r.sharded) == (1, 4, True, False)
    assert [i for i in range(10) if r.owns(i)] == [1, 5, 9]
    r = distributed.detect("2/3", env={})
    assert (r.rank, r.world_size, r.launched, r.sharded, r.sink_rank()) == (2, 3, False, True, (2, 3))
    r = distributed.detect("1/3", env={"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})  # torchrun per array task
    assert (r.rank, r.world_size, r.sharded) == (3, 6, True)
    for bad in ("3/3", "x", "1/2/3", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            distributed.detect(bad, env={})


def test_torchrun_two_ranks_equal_a_single_process(setup):
    root, config, single = setup
    out = root / "torchrun"
    done = torchrun(["--no-python", str(BIN / "qk-sniff"), "run", "--config", str(config(out)), "-q"], root)
    assert done.returncode == 0, done.stdout + done.stderr
    names = {p.name for p in out.glob("l*/*.parquet")}
    assert {n[:5] for n in names} == {"r000-", "r001-"}  # each rank wrote its own shards
    assert (out / "qk_sniff.rank000.json").is_file() and (out / "qk_sniff.rank001.json").is_file()
    assert_same_dataset(out, single)

    import datasets

    ds = datasets.load_dataset(str(out), "l00h00q", split="train")
    assert (
        ds.num_rows
        == qk_attn.load(out, layer=0, head=0, kind="q").num_rows
        == read_manifest(single)["row_counts"]["l00h00q"]
    )


# Rank 1 makes its first batch durable, waits until rank 0 has finished all its documents, then
# dies hard (torchrun then stops rank 0, which waits at the barrier).
KILLER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from qk_attn import cli
    from qk_attn.run import runner

    forward = runner._forward

    def forward_then_die(s, *args):
        forward(s, *args)
        if os.environ["RANK"] == "1":
            s.flush()
            part0 = Path(os.environ["QK_TEST_OUT"]) / "qk_sniff.rank000.json"
            deadline = time.monotonic() + 200  # the test's torchrun timeout is 240 s
            while not (part0.exists() and json.loads(part0.read_text())["part"]["complete"]):
                if time.monotonic() > deadline:
                    sys.exit("killer: rank 0 never marked its part complete")
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)

    runner._forward = forward_then_die
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_a_killed_rank_is_rerun_without_touching_the_others(setup):
    root, config, single = setup
    out = root / "killed"
    yaml_path = config(out)
    killer = root / "killer.py"
    killer.write_text(KILLER)
    dead = torchrun([str(killer), "run", "--config", str(yaml_path), "-q"], root, QK_TEST_OUT=str(out))
    assert dead.returncode != 0
    assert not (out / "qk_sniff.json").exists()  # nobody merged
    part0, part1 = read_manifest(out, "qk_sniff.rank000.json"), read_manifest(out, "qk_sniff.rank001.json")
    assert part0["part"]["complete"], dead.stdout + dead.stderr
    assert len(part0["examples"]) == N_DOCS // 2, part0["examples"]
    assert not part1["part"]["complete"] and 0 < len(part1["examples"]) < N_DOCS // 2, dead.stdout + dead.stderr
    rank0 = {p: p.read_bytes() for p in out.glob("l*/r000-*.parquet")}

    again = torchrun(["--no-python", str(BIN / "qk-sniff"), "run", "--config", str(yaml_path), "-q"], root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {p: p.read_bytes() for p in out.glob("l*/r000-*.parquet")} == rank0  # rank 0's rows untouched
    assert not list(out.glob("l*/.*.tmp"))
    assert_same_dataset(out, single)


def test_shard_jobs_then_merge(setup, capsys):
    root, config, single = setup
    out = root / "shards"
    good = str(config(out))
    assert cli.main(["run", "--config", good, "--shard", "0/2", "-q"]) == 0
    assert "qk-sniff merge" in capsys.readouterr().out
    assert cli.main(["merge", str(out)]) == 1
    assert "ranks [1] of 2 have no manifest part" in capsys.readouterr().err
    assert cli.main(["run", "--config", good, "-q"]) == 2  # a single process must not write into it
    assert "written by ranks" in capsys.readouterr().err

    rank0 = {p: p.read_bytes() for p in out.glob("l*/r000-*.parquet")}
    other = config(root / "shards-seed", seed=7)  # rank 1 with another seed, into the same folder
    other.write_text(other.read_text().replace(str(root / "shards-seed"), str(out)))
    assert cli.main(["run", "--config", str(other), "--shard", "1/2", "-q"]) == 0
    assert cli.main(["merge", str(out)]) == 1
    assert "rank 1 captured with different settings than rank 0 (seed" in capsys.readouterr().err
    assert cli.main(["run", "--config", good, "--shard", "1/3", "-q"]) == 2
    assert "resume with the same number of ranks" in capsys.readouterr().err

    # Rank 1 again, right settings: overwrite removes only rank 1's files.
    assert cli.main(["run", "--config", good, "--shard", "1/2", "--set", "output.overwrite=true", "-q"]) == 0
    assert {p: p.read_bytes() for p in out.glob("l*/r000-*.parquet")} == rank0
    assert cli.main(["merge", str(out)]) == 0
    first = (out / "qk_sniff.json").read_bytes()
    assert cli.main(["merge", str(out)]) == 0  # idempotent
    assert (out / "qk_sniff.json").read_bytes() == first
    assert_same_dataset(out, single)


def test_ranks_keep_their_own_previous_manifest(tmp_path):
    """Ranks write their parts into one folder at once; each keeps its own last good version
    (one shared backup name once let a rank's commit fail with FileNotFoundError)."""
    from concurrent.futures import ThreadPoolExecutor

    from qk_attn.storage.layout import previous_name
    from qk_attn.storage.manifest import write_json_atomic

    def write(rank: int) -> None:
        for i in range(300):
            write_json_atomic(
                tmp_path / f"qk_sniff.rank{rank:03d}.json", {"rank": rank, "i": i}, False, keep_previous=True
            )

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(write, rank) for rank in (0, 1)]:
            done.result()
    for rank in (0, 1):
        previous = json.loads((tmp_path / previous_name(f"qk_sniff.rank{rank:03d}.json")).read_text())
        assert previous.pop("digest") and previous == {"rank": rank, "i": 298}


def test_merge_refuses_ranks_that_went_through_other_documents(setup, capsys):
    """Each rank says it is complete, but over another document list (another max_samples, or
    another docs.jsonl of the same name): some documents are no rank's, so merge refuses."""
    root, config, single = setup
    out = root / "lists"
    good = str(config(out))
    assert cli.main(["run", "--config", good, "--shard", "0/2", "--set", "dataset.max_samples=4", "-q"]) == 0
    assert cli.main(["run", "--config", good, "--shard", "1/2", "-q"]) == 0
    assert cli.main(["merge", str(out)]) == 1  # rank 0 went through documents 0-3 only: 4 and 6 are no rank's
    err = capsys.readouterr().err
    assert "different document lists (rank 0: 4 documents" in err and "rank 1: 8 documents" in err, err
    assert not (out / "qk_sniff.json").exists()
    assert cli.main(["run", "--config", good, "--shard", "0/2", "-q"]) == 0  # rank 0 resumes over all 8
    assert cli.main(["merge", str(out)]) == 0
    assert read_manifest(out)["examples"] == read_manifest(single)["examples"]
    assert cli.verify_dataset(out, log=lambda *_: None) == []

    # The other way round: rank 1 went through all 8, then was re-run with max_samples=4 like rank 0.
    # Their lists agree now, but rank 1 still holds documents 5 and 7: 4 and 6 would be no rank's.
    shorter = root / "shorter"
    assert cli.main(["run", "--config", str(config(shorter)), "--shard", "1/2", "-q"]) == 0
    for rank in ("0/2", "1/2"):
        assert (
            cli.main(["run", "--config", str(config(shorter)), "--shard", rank, "--set", "dataset.max_samples=4", "-q"])
            == 0
        )
    capsys.readouterr()
    assert cli.main(["merge", str(shorter)]) == 1
    assert "rank 1 holds documents [5, 7] beyond its latest document list of 4" in capsys.readouterr().err

    # Rank 1 reads another docs.jsonl (the same ids in the same order, other texts): local files
    # are recorded by name, so only their fingerprints tell them apart.
    other = root / "other" / "docs.jsonl"
    other.parent.mkdir()
    other.write_text((root / "docs.jsonl").read_text().replace('"body": "', '"body": "w0 '))
    mixed = root / "mixed"
    assert cli.main(["run", "--config", str(config(mixed)), "--shard", "0/2", "-q"]) == 0
    moved = config(root / "mixed-other")
    moved.write_text(
        moved.read_text().replace(str(root / "mixed-other"), str(mixed)).replace(str(root / "docs.jsonl"), str(other))
    )
    assert cli.main(["run", "--config", str(moved), "--shard", "1/2", "-q"]) == 0
    assert cli.main(["merge", str(mixed)]) == 1
    assert "rank 1 captured with different settings than rank 0 (dataset.path: other files" in capsys.readouterr().err


def test_a_rank_rerun_after_merge_takes_the_merged_manifest_away(setup, capsys):
    """A rank that writes again changes what the merge listed (here: its shards, overwritten with
    another seed under the same names); the stale merged manifest is removed, and merge writes it
    again. A merged copy without its parts (pulled from the Hub) is refused to ranks: they would
    delete the shards only the merged manifest lists."""
    root, config, single = setup
    out = root / "remerged"
    good = str(config(out))
    run_both_shards_and_merge(good, out)
    assert not list(out.glob(".qk_sniff*.lock"))  # merge leaves no lock file behind
    assert (
        cli.main(
            [
                "run",
                "--config",
                good,
                "--shard",
                "1/2",
                "--set",
                "output.overwrite=true",
                "--set",
                "capture.seed=3",
                "-q",
            ]
        )
        == 0
    )
    assert not (out / "qk_sniff.json").exists() and not (out / ".qk_sniff.json.prev").exists()
    with pytest.raises(FileNotFoundError):
        qk_attn.load(out)  # not the rows of the merge before: rank 1's shards now hold other rows
    assert cli.main(["merge", str(out)]) == 1  # seed 3 against seed 0
    capsys.readouterr()
    assert cli.main(["run", "--config", good, "--shard", "1/2", "--set", "output.overwrite=true", "-q"]) == 0
    assert cli.main(["merge", str(out)]) == 0
    assert_same_dataset(out, single)

    for part in out.glob("*rank*"):  # what `qk-sniff pull` brings back: the merged manifest and the shards
        part.unlink()
    shards = {p: p.read_bytes() for p in out.glob("l*/*.parquet")}
    assert cli.main(["run", "--config", good, "--shard", "1/2", "-q"]) == 2
    assert "holds a merged capture without its manifest parts" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.glob("l*/*.parquet")} == shards
    assert cli.verify_dataset(out, log=lambda *_: None) == []


@pytest.mark.parametrize(
    "vocabularies, differs",
    [
        ((["a", "b", "c"], ["x", "y", "z"]), "vocabulary_sha256"),  # token_str would give one id two strings
        ((["a", "b", "c"], None), "columns, vocabulary_sha256"),  # rank 1's shards lack token_str
    ],
)
def test_merge_refuses_ranks_with_another_vocabulary_or_schema(tmp_path, vocabularies, differs):
    from support.storage import open_sink, run_examples

    out = tmp_path / "out"
    for rank, vocabulary in enumerate(vocabularies):
        sink = open_sink(out, rank=(rank, 2), vocabulary=vocabulary)
        run_examples(sink, [rank])
        sink.complete = True
        sink.close()
    with pytest.raises(ValueError, match=rf"rank 1 captured with different settings than rank 0 \({differs}\)"):
        distributed.merge(out)


def test_repair_mends_a_folder_written_by_ranks(setup, capsys):
    """The recovery every damage message names (`qk-sniff repair OUT`) works on a rank folder too: a
    damaged shard of rank 1 drops rank 1's examples from its part only, an altered part of rank 0 is
    restored from that rank's own previous manifest, a Parquet file no rank wrote is quarantined,
    and the merged manifest (which listed the lost files) is taken away. Re-running the ranks and
    merging then gives exactly the single-process dataset."""
    root, config, single = setup
    out = root / "repaired-ranks"
    good = str(config(out))
    run_both_shards_and_merge(good, out)
    rank0 = {p: p.read_bytes() for p in out.glob("l*/r000-*.parquet")}
    shard = sorted(out.glob("l00h00q/r001-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    part0 = out / "qk_sniff.rank000.json"
    part0.write_text(part0.read_text().replace('"complete": true', '"complete": false'))  # digest now wrong
    stray = out / "l00h00k" / "s000000-p0000.parquet"  # a single writer's name: no rank owns it
    stray.write_bytes(sorted(out.glob("l00h00k/r000-*.parquet"))[0].read_bytes())
    problems = cli.verify_dataset(out, log=lambda *_: None)
    assert any("sha256 differs" in line for line in problems) and any("not listed" in line for line in problems)

    capsys.readouterr()
    assert cli.main(["repair", str(out)]) == 0
    said = capsys.readouterr().out
    assert "restored qk_sniff.rank000.json from .qk_sniff.rank000.json.prev" in said
    assert "re-run ranks [0, 1] (the same command resumes them), then `qk-sniff merge" in said
    assert not (out / "qk_sniff.json").exists() and not stray.exists()
    assert (out / ".qk_sniff.quarantine" / "l00h00k" / stray.name).is_file()
    assert {p: p.read_bytes() for p in out.glob("l*/r000-*.parquet")} == rank0  # rank 0's rows untouched
    part1 = read_manifest(out, "qk_sniff.rank001.json")
    assert part1["part"]["complete"] is False and len(part1["examples"]) < N_DOCS // 2
    assert cli.main(["merge", str(out)]) == 1  # incomplete parts: refused until the ranks ran again
    assert cli.main(["merge", str(out), "--allow-incomplete"]) == 0  # readable meanwhile, and says so
    assert (
        "**Incomplete:** merged with `qk-sniff merge --allow-incomplete` while ranks [0, 1] of 2"
        in (out / "README.md").read_text()
    )
    assert cli.verify_dataset(out, log=lambda *_: None) == []
    assert len(qk_attn.load_examples(out)) == len(part1["examples"]) + len(read_manifest(out, part0.name)["examples"])

    run_both_shards_and_merge(good, out)
    assert_same_dataset(out, single)
    assert cli.main(["repair", str(out)]) == 0  # sound now: nothing to do, merged manifest kept
    assert "nothing to repair" in capsys.readouterr().out and (out / "qk_sniff.json").exists()

    # A single process told to overwrite the rank folder leaves none of the ranks' files behind.
    assert cli.main(["run", "--config", good, "--set", "output.overwrite=true", "-q"]) == 0
    assert not list(out.glob("*rank*")) and not list(out.glob("l*/r0*")), sorted(out.glob("*rank*"))
    assert read_manifest(out)["examples"] == read_manifest(single)["examples"]
    assert cli.verify_dataset(out, log=lambda *_: None) == []


def test_repair_of_a_rank_folder_keeps_what_the_merged_manifest_lists_and_refuses_two_captures(setup, capsys):
    """A rank whose part and previous part are both gone: its shards, which the merged manifest lists,
    were quarantined and the folder left unreadable; now repair leaves them (verify passes). A rank part
    and its previous version both unreadable: the recovery repair names (re-run that rank with
    overwrite) once failed reading the part. A single process's manifest among rank parts: refused."""
    root, config, single = setup
    out = root / "repair-edges"
    good = str(config(out))
    run_both_shards_and_merge(good, out)
    kept = (out / "qk_sniff.rank001.json").read_bytes(), (out / ".qk_sniff.rank001.json.prev").read_bytes()
    (out / "qk_sniff.rank001.json").unlink()
    (out / ".qk_sniff.rank001.json.prev").unlink()
    capsys.readouterr()
    assert cli.main(["repair", str(out)]) == 0
    assert not (out / ".qk_sniff.quarantine").exists() and cli.verify_dataset(out, log=lambda *_: None) == []
    (out / "qk_sniff.rank001.json").write_bytes(kept[0])
    (out / ".qk_sniff.rank001.json.prev").write_bytes(kept[1])

    for name in ("qk_sniff.rank000.json", ".qk_sniff.rank000.json.prev"):
        (out / name).write_text("{}")
    assert cli.main(["repair", str(out)]) == 2
    assert "re-run rank 0 with output.overwrite: true" in capsys.readouterr().err
    assert cli.main(["run", "--config", good, "--shard", "0/2", "--set", "output.overwrite=true", "-q"]) == 0
    assert cli.main(["merge", str(out)]) == 0
    assert_same_dataset(out, single)

    (out / "qk_sniff.json").write_bytes((single / "qk_sniff.json").read_bytes())
    capsys.readouterr()
    assert cli.main(["repair", str(out)]) == 2
    assert "is a single process's capture, but" in capsys.readouterr().err


def test_a_shard_that_runs_no_forward_ends_without_the_recorded_nothing_warning(setup, caplog):
    """A rank that owns no document (three shards of two), or whose documents are all committed (its
    resume), runs no forward on purpose: its manifest part is written and merged, and the warning that
    blames a model's attention for an empty session is not given."""
    root, config, single = setup
    out = root / "three-shards"
    path = str(config(out))
    two = ["--set", "dataset.max_samples=2", "-q"]
    with caplog.at_level(logging.WARNING, logger="qk_attn"):
        for shard in ("0/3", "1/3", "2/3", "0/3"):  # 2/3 owns none; 0/3 again resumes its one document
            assert cli.main(["run", "--config", path, "--shard", shard, *two]) == 0
    assert not [r.getMessage() for r in caplog.records if "recorded nothing" in r.getMessage()]
    assert cli.main(["merge", str(out)]) == 0
    got = sort_rows(folder_table(out)).select(INDEX)
    want = sort_rows(folder_table(single)).select(INDEX)
    want = want.filter(pc.is_in(want["example_id"], pa.array(np.unique(got["example_id"].to_numpy()))))
    assert len(read_manifest(out)["examples"]) == 2 and got.equals(want)
