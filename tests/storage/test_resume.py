"""Resume: orphan shards of a killed run are removed; a SIGKILLed capture re-run with the same
command ends with exactly the rows of an uninterrupted run (same set, no duplicates)."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from qk_attn.dataset.verify import verify_dataset
from qk_attn.storage import shards
from qk_attn.storage.manifest import read_manifest
from support.storage import folder_table, open_sink, reference, run_examples, sort_rows

TESTS = Path(__file__).resolve().parents[1]  # where tests/support lives

# One capture "command": a tiny random Llama (3 layers, 4 query / 2 KV heads) run through
# qk_attn.session over N examples, two per forward, skipping what OUT already committed.
SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from support.models import build
    import qk_attn
    from qk_attn.config import SniffConfig
    from qk_attn.storage.sink import ParquetSink

    out, total = sys.argv[1], int(sys.argv[2])
    settings = dict(sampler="log_uniform", min_bucket_size=4, base_rate=2, heads="0,3")
    model = build("llama3", "qk_sniff")
    sink = ParquetSink(out, SniffConfig(output=out, **settings), commit_every_s=0, fsync=False)
    with torch.inference_mode(), qk_attn.session(sink=sink, **settings) as s:
        todo = [e for e in range(total) if e not in s.committed_ids()]
        print("resuming with", len(todo), "examples", flush=True)
        for i in range(0, len(todo), 2):
            ids = todo[i:i + 2]
            lengths = [20 + (e * 37) % 60 for e in ids]
            tokens = torch.zeros(len(ids), max(lengths), dtype=torch.long)
            mask = torch.zeros_like(tokens)
            for row, (e, n) in enumerate(zip(ids, lengths)):
                tokens[row, :n] = torch.randint(2, 90, (n,), generator=torch.Generator().manual_seed(e))
                mask[row, :n] = 1
            s.begin(ids)
            model(input_ids=tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
            s.commit()
            print("committed", ids, flush=True)
            time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)  # stands in for a long forward
    """
).format(tests=str(TESTS))


def _capture(script: Path, out: Path, total: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), str(out), str(total)], capture_output=True, text=True, timeout=120
    )


def test_sigkilled_capture_resumes_to_exactly_the_uninterrupted_rows(tmp_path):
    script = tmp_path / "capture.py"
    script.write_text(SCRIPT)
    total = 16

    clean = tmp_path / "clean"  # the uninterrupted run, in this process (same script, saves a start-up)
    argv = sys.argv
    try:
        sys.argv = [str(script), str(clean), str(total)]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed), str(total), "0.3"], stdout=subprocess.PIPE, text=True
    )
    # Kill mid-run, once the saver has made some examples durable (it writes asynchronously,
    # so a fixed number of "committed" lines is no guarantee): it may be writing more right now.
    deadline = time.monotonic() + 60
    while len((read_manifest(killed) or {}).get("examples", ())) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    partial = read_manifest(killed)["examples"]
    assert 0 < len(partial) < total

    resumed = _capture(script, killed, total)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming with {total - len(partial)} examples" in resumed.stdout

    a, b = sort_rows(folder_table(clean)), sort_rows(folder_table(killed))
    index = ["example_id", "position", "bucket", "layer", "head", "kind"]
    assert b.select(index).equals(a.select(index))  # same set of rows ...
    keys = np.stack([b[c].to_numpy(zero_copy_only=False).astype(str) for c in index[:1] + index[1:2] + index[3:]], 1)
    assert len(np.unique(keys, axis=0)) == b.num_rows  # ... and no duplicates
    np.testing.assert_allclose(
        np.stack(b["vector"].to_numpy(zero_copy_only=False)),
        np.stack(a["vector"].to_numpy(zero_copy_only=False)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert read_manifest(killed)["examples"] == read_manifest(clean)["examples"]

    from qk_attn.cli import verify_dataset

    assert verify_dataset(killed, log=lambda *_: None) == []


def test_orphans_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    sink = open_sink(out)
    batches = run_examples(sink, [0, 1])
    sink.close()
    listed = read_manifest(out)["shards"]["l00h00q"][0]
    # What a SIGKILL can leave: a renamed shard the manifest never listed, a temporary shard,
    # a folder of a (layer, head) whose first shard was never committed.
    pq.write_table(pq.read_table(out / "l00h00q" / listed), out / "l00h00q" / "s000099-p0000.parquet")
    (out / "l00h00q" / ".s000099-p0001.parquet.tmp").write_bytes(b"partial")
    (out / "l02h01q").mkdir()
    (out / "l02h01q" / ".s000099-p0002.parquet.tmp").write_bytes(b"partial")
    (out / "notes.txt").write_text("mine")
    (out / "l00h00q" / "keep.txt").write_text("not a shard")

    sink = open_sink(out)
    assert sorted(p.name for p in sink.removed_orphans) == [
        ".s000099-p0001.parquet.tmp",
        ".s000099-p0002.parquet.tmp",
        "s000099-p0000.parquet",
    ]
    assert sink.committed_ids() == {0, 1}
    assert not (out / "l02h01q").exists() and (out / "notes.txt").exists() and (out / "l00h00q" / "keep.txt").exists()
    sink.close()
    assert sort_rows(folder_table(out)).equals(sort_rows(__import__("test_saver").reference(batches)))


# The shard options before 2026-12-05 (zstd on every column, dictionaries for kind and token_str
# only): a folder written with them is resumed, merged and read with today's.
EARLIER_WRITE_OPTIONS = dict(
    compression="zstd",
    compression_level=1,
    use_dictionary=["kind", "token_str"],
    column_encoding={"vector.list.element": "BYTE_STREAM_SPLIT"},
    write_statistics=["example_id", "position", "bucket", "layer", "head"],
    write_page_checksum=True,
)


def test_a_capture_written_with_earlier_shard_encodings_resumes_merges_and_reads_back_exactly(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def layer_compression() -> set[str]:
        manifest = read_manifest(out)
        files = [out / key / name for key, names in manifest["shards"].items() for name in names]
        return {pq.read_metadata(f).row_group(0).column(3).compression for f in files}  # column 3: layer

    with monkeypatch.context() as earlier:
        for option, value in EARLIER_WRITE_OPTIONS.items():
            earlier.setitem(shards.WRITE_OPTIONS, option, value)
        sink = open_sink(out)
        batches = run_examples(sink, range(20))  # one shard per folder and commit: merged at close
        sink.close()
    assert layer_compression() == {"ZSTD"}
    sink = open_sink(out)
    assert sink.committed_ids() == set(range(20))
    batches += run_examples(sink, range(20, 40))
    sink.close()
    assert "UNCOMPRESSED" in layer_compression()  # today's shards sit beside the earlier ones
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(batches)))
    assert verify_dataset(out, log=lambda *_: None) == []


def test_a_folder_with_nothing_committed_takes_the_next_runs_settings(tmp_path):
    """A session refused at its first forward (layers beyond the model) leaves a manifest with no
    examples: the corrected run writes there instead of being refused for "different settings"."""
    import pytest
    import torch

    import qk_attn
    from qk_attn.errors import ConfigError
    from support.models import build

    model, out = build("llama3", "qk_sniff"), tmp_path / "out"
    ids = torch.randint(2, 90, (1, 6))
    with pytest.raises(ConfigError, match="layers"):
        with torch.no_grad(), qk_attn.session(output=out, sampler="all", layers="5"):
            model(input_ids=ids)
    assert read_manifest(out)["examples"] == {}
    with torch.no_grad(), qk_attn.session(output=out, sampler="all", layers="1"):
        model(input_ids=ids)
    manifest = read_manifest(out)
    assert manifest["config"]["layers"] == [1] and list(manifest["examples"]) == ["0"]
    assert verify_dataset(out, log=lambda *_: None) == []


def test_a_local_model_folder_with_other_weights_does_not_resume_into_the_capture(tmp_path):
    """A checkpoint saved again under one path (same name, type and dtype) is another model: its rows
    are refused, not mixed with the first weights' (the folder's config and weight files are fingerprinted)."""
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    import qk_attn
    from support.models import build

    folder, out = tmp_path / "checkpoint", tmp_path / "out"
    ids = torch.randint(2, 90, (1, 6))
    for seed, example in ((0, 0), (0, 1), (1, 2)):
        build("llama3", seed=seed).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="qk_sniff").eval()
        with torch.no_grad(), qk_attn.session(output=out, sampler="all", layers="0") as s:
            s.begin([example])
            if seed == 0:  # the same weights saved again: the capture resumes
                model(input_ids=ids)
            else:
                with pytest.raises(ValueError, match=r"holds captures of model .*weight files sha256"):
                    model(input_ids=ids)
    assert sorted(read_manifest(out)["examples"]) == ["0", "1"]
    assert verify_dataset(out, log=lambda *_: None) == []


def test_the_dtype_attention_ran_in_is_the_captures_dtype(tmp_path):
    """`model.half()` leaves config.dtype as loaded: the manifest once said float32 for float16 rows,
    and a float32 model then resumed into them. The dtype is now what attention ran in: a resume in
    another dtype is refused, and so is a dtype change between forwards of one session."""
    import pytest
    import torch

    import qk_attn
    from qk_attn.errors import CaptureError
    from support.models import build

    out, ids = tmp_path / "out", torch.randint(2, 90, (1, 6))
    model = build("llama3", "qk_sniff").half()
    with torch.no_grad(), qk_attn.session(output=out, sampler="all", layers="0") as s:
        s.begin([0])
        model(input_ids=ids)
        s.commit()
        model.float()
        s.begin([1])
        with pytest.raises(CaptureError, match="layer 0's attention runs in float32 in this forward, but in float16"):
            model(input_ids=ids)
    assert read_manifest(out)["model"]["dtype"] == "float16"
    assert sorted(read_manifest(out)["examples"]) == ["0"]
    with torch.no_grad(), qk_attn.session(output=out, sampler="all", layers="0") as s:
        s.begin([2])
        with pytest.raises(ValueError, match=r"holds captures of model .*float16.*this run uses .*float32"):
            model(input_ids=ids)
    assert sorted(read_manifest(out)["examples"]) == ["0"]
    assert verify_dataset(out, log=lambda *_: None) == []


def test_a_refused_first_forward_binds_no_dtype(tmp_path):
    """A forward refused before anything of it was kept (positions that skip) once fixed the folder's
    dtype: the next forward, the model corrected to float32, was refused as a dtype change."""
    import pytest
    import torch

    import qk_attn
    from qk_attn.errors import CaptureError
    from support.models import build

    out, ids = tmp_path / "out", torch.randint(2, 90, (1, 6))
    model = build("llama3", "qk_sniff").to(torch.bfloat16)
    with torch.no_grad(), qk_attn.session(output=out, sampler="all", layers="0") as s:
        s.begin([1])
        with pytest.raises(CaptureError, match="do not count up by one"):
            model(input_ids=ids, position_ids=torch.arange(0, 12, 2)[None])
        model.float()
        s.begin([2])
        model(input_ids=ids)
    assert sorted(read_manifest(out)["examples"]) == ["2"]
    assert read_manifest(out)["model"]["dtype"] == "float32"
    assert verify_dataset(out, log=lambda *_: None) == []
