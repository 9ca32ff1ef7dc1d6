"""The default session configured only by QK_SNIFF_* variables, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq

from support.models import build

SCRIPT = textwrap.dedent("""
    import sys, torch, qk_attn
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="qk_sniff").eval()
    ids = torch.arange(2, 34)[None]
    with torch.no_grad():
        model(input_ids=ids)
        qk_attn.flush()          # commits example 0 now
        model(input_ids=ids)     # example 1: committed at interpreter exit
    print("done")
""")


def test_env_only_capture_commits_on_flush_and_at_exit(tmp_path):
    build("llama3").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    env = dict(
        os.environ,
        QK_SNIFF_OUTPUT=str(out),
        QK_SNIFF_SAMPLER="all",
        QK_SNIFF_LAYERS="1",
        QK_SNIFF_HEADS="2",
        QK_SNIFF_CAPTURE="q",
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "model")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["l01h02q"]
    table = pq.read_table(out / "l01h02q")
    assert sorted(table["example_id"].to_pylist()) == [0] * 32 + [1] * 32
    assert sorted(set(table["position"].to_pylist())) == list(range(32))
    assert (out / "README.md").exists() and (out / "qk_sniff.json").exists()
