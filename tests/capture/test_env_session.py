"""The default session configured only by QK_SNIFF_* variables, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from support.models import CACHE_ARG, build

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


STOPPED = textwrap.dedent("""
    import sys, torch, qk_attn
    from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="qk_sniff").eval()
    ids = torch.arange(2, 34)[None]

    class StopAtStep3(LogitsProcessor):  # Ctrl-C between two decode steps, outside any forward
        step = 0
        def __call__(self, input_ids, scores):
            self.step += 1
            if self.step == 3:
                raise KeyboardInterrupt
            return scores

    with torch.no_grad():
        model(input_ids=ids)  # example 0: complete
        if sys.argv[2] == "chunks":  # example 1: its first prefill chunk, then the script fails
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :16], use_cache=True, **{sys.argv[3]: cache})
            raise RuntimeError("failed between two chunks")
        model.generate(ids, max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([StopAtStep3()]))
""")


@pytest.mark.parametrize("stop", ["chunks", "generate"])
def test_an_uncaught_exception_between_forwards_commits_no_example_that_could_continue(tmp_path, stop):
    """The exit handler after an uncaught exception: example 1 stopped between two of its forwards (a
    prefill chunk, a generate() step) may be incomplete, so it is not committed; example 0 is."""
    build("llama3").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    env = dict(os.environ, QK_SNIFF_OUTPUT=str(out), QK_SNIFF_SAMPLER="all", QK_SNIFF_LAYERS="0", QK_SNIFF_HEADS="0")
    result = subprocess.run(
        [sys.executable, "-c", STOPPED, str(tmp_path / "model"), stop, CACHE_ARG],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # generate() forgets its examples as it raises; the exit handler those a later chunk could continue
    said = "could still be continued" if stop == "chunks" else "stopped between two forwards: generate() raised"
    assert result.returncode != 0 and said in result.stderr, result.stderr
    assert sorted(json.loads((out / "qk_sniff.json").read_text())["examples"]) == ["0"]
    table = pq.read_table(out / "l00h00q")
    assert table["example_id"].to_pylist() == [0] * 32
