"""The estimate's staging line (issue 20): before a run, whether every forward's rows are staged whole
in half of the pinned pool, or which document lengths stream call by call."""

from __future__ import annotations

import pytest

from qk_attn import cli
from qk_attn.capture.plan import HeadPlan, ModelShape
from qk_attn.capture.staging import forward_bytes
from qk_attn.config import SniffConfig
from qk_attn.run.estimate import format_staging, staging_bound, staging_fit
from qk_attn.sampler import Sampler
from support.run import HEAD_DIM, HEADS, KV_HEADS, LAYERS, write_config

SHAPE = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
DENSE = HeadPlan.build(SniffConfig(sampler="all"), SHAPE)


def test_dense_threshold_is_the_longest_length_within_half_the_pool():
    # 2 documents, 2 layers x (4 query + 2 key heads) x 16 float32, token ids: 832 + 1696 bytes per token,
    # so 308 tokens (523,584 bytes) fit half of 1 MiB (524,288) and 309 (525,376) do not.
    assert forward_bytes(DENSE, 2 * 308, 2, 16, 4, True) == 523_584 <= 2**19
    assert forward_bytes(DENSE, 2 * 309, 2, 16, 4, True) > 2**19
    assert staging_bound(DENSE, Sampler("all"), 1000, 2, 16) == 832 + 1696 * 1000

    whole = staging_fit(DENSE, Sampler("all"), 308, 2, 16, "float32", 1)
    assert whole.fits and whole.threshold == 308 and whole.bound == 523_584 and whole.limit == 2**19
    assert format_staging(whole) == (
        "qk-sniff: estimate: every forward is staged whole: at most 0.50 MiB of rows per forward (2 document(s) of "
        "up to 308 tokens), within the staging limit of 0.50 MiB (half of inference.pinned_mb=1)"
    )

    streams = staging_fit(DENSE, Sampler("all"), 309, 2, 16, "float32", 1)
    assert not streams.fits and streams.threshold == 308 and streams.needed_mb == 2
    assert staging_fit(DENSE, Sampler("all"), 1000, 2, 16, "float32", 1).threshold == 308
    long = staging_fit(DENSE, Sampler("all"), 1000, 2, 16, "float32", 1)
    assert long.bound == 1_696_832 and long.needed_mb == 4  # 4 MiB: a 2 MiB limit holds 1,696,832 bytes
    assert format_staging(long) == (
        "qk-sniff: estimate: forwards with a document longer than 308 tokens exceed the staging limit of 0.50 MiB "
        "(half of inference.pinned_mb=1): up to 1.62 MiB of rows (2 document(s) of 1,000 tokens); they stream call "
        "by call and may wait for the saver inside the forward; raise inference.pinned_mb to at least 4 (MiB) to "
        "stage them whole"
    )
    # The advice is the least pool that stages them whole.
    assert staging_fit(DENSE, Sampler("all"), 1000, 2, 16, "float32", 4).fits
    assert not staging_fit(DENSE, Sampler("all"), 1000, 2, 16, "float32", 3).fits


def test_sampled_threshold_follows_the_sampler_capacity_and_the_vector_dtype():
    sampler = Sampler("uniform", 16, 1.0)
    plan = HeadPlan.build(SniffConfig(sampler="uniform", min_bucket_size=16), SHAPE)
    fit = staging_fit(plan, sampler, 100_000, 1, 16, "float16", 1)
    n = fit.threshold
    assert n == 13_990 and not fit.fits and fit.needed_mb == 7
    assert forward_bytes(plan, sampler.capacity(n), 1, 16, 2, True) <= 2**19
    assert forward_bytes(plan, sampler.capacity(n + 1), 1, 16, 2, True) > 2**19
    assert staging_fit(plan, sampler, n, 1, 16, "float16", 1).fits
    assert not staging_fit(plan, sampler, n + 1, 1, 16, "float16", 1).fits
    assert staging_fit(plan, sampler, 100_000, 1, 16, "float32", 1).threshold < n  # float32 rows: twice the bytes


def test_a_forward_of_one_token_over_the_limit_says_every_forward():
    shape = ModelShape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
    plan = HeadPlan.build(SniffConfig(sampler="all"), shape)
    fit = staging_fit(plan, Sampler("all"), 4096, 8, 128, "float32", 1)
    assert fit.threshold == 0 and not fit.fits
    assert format_staging(fit).startswith(
        "qk-sniff: estimate: every forward exceeds the staging limit of 0.50 MiB (half of inference.pinned_mb=1): "
        "up to 20,520.0 MiB of rows (8 document(s) of 4,096 tokens); they stream call by call"
    )


@pytest.mark.parametrize("pre_rope", [False, True])
def test_dry_run_prints_the_staging_line(tiny_model, docs, tmp_path, capsys, pre_rope):
    config = write_config(
        tmp_path,
        tiny_model,
        docs[0],
        tmp_path / "out",
        capture={"capture_pre_rope": pre_rope, "vector_dtype": "float16"},
    )
    assert cli.main(["run", "--config", config, "--dry-run", "--quiet", "--set", "inference.batch_size=4"]) == 0
    printed = capsys.readouterr().out
    plan = HeadPlan.build(SniffConfig(sampler="all"), ModelShape(LAYERS, HEADS, KV_HEADS, HEAD_DIM))
    dtype = "float32" if pre_rope else "float16"  # pre-RoPE rows are staged in float32
    fit = staging_fit(plan, Sampler("all"), 81, 4, HEAD_DIM, dtype, 256)  # the longest document: 80 words and BOS
    assert fit.fits and format_staging(fit) in printed.splitlines()
    assert "every forward is staged whole" in printed and "(4 document(s) of up to 81 tokens)" in printed


def test_a_streaming_dataset_bounds_the_staging_line_by_max_length(tiny_model, docs, tmp_path, capsys):
    config = write_config(
        tmp_path,
        tiny_model,
        docs[0],
        tmp_path / "out",
        dataset={"streaming": True, "max_samples": 2},
        tokenizer={"max_length": 30},
        inference={"batch_size": 4, "pinned_mb": 1},
    )
    assert cli.main(["run", "--config", config, "--dry-run", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    plan = HeadPlan.build(SniffConfig(sampler="all"), ModelShape(LAYERS, HEADS, KV_HEADS, HEAD_DIM))
    fit = staging_fit(plan, Sampler("all"), 30, 2, HEAD_DIM, "float32", 1)  # 2 documents at most, cut at 30 tokens
    assert format_staging(fit) in printed
