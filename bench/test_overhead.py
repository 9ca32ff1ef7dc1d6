"""Overhead of "qk_sniff" versus vanilla SDPA (issue 7), with pytest-benchmark.

Each benchmark's target is one *round*: every arm once, on the same model and input, in an
order rotated from round to round, so slow drift on a shared machine hits all arms alike.
`test_short_*` (issue 20) time short runs with a session opened and closed per run, where the
session's fixed cost counts.
pytest-benchmark times the rounds; the per-arm seconds of each round go to `extra_info`
and to the ratio table that conftest prints and writes (median of per-round ratios to sdpa).
"""

from __future__ import annotations

import gc
import os

import harness
import rss
from harness import ARM_BY_NAME, ARMS, END_TO_END_ARMS, TARGET_SEQ


def capture_round(measured: list[dict], tmp_root, name: str, run):
    """One round: every end-to-end arm in rotated order, `run(arm, out)` each (out: a fresh folder
    for capture arms, None for sdpa), appended to `measured`."""

    def one_round():
        runs = {}
        for arm in harness.rotated(END_TO_END_ARMS, len(measured)):
            out = tmp_root / f"{name}-{len(measured)}-{arm.name}"
            gc.collect()
            runs[arm.name] = run(arm, out if arm.captures else None)
            harness.remove(out)
        measured.append(runs)

    return one_round


def top_up(one_round, measured: list[dict], wanted: int, config, seq: int) -> None:
    """Extra rounds (outside pytest-benchmark's timing) while fewer than `wanted` were quiet."""
    extra = harness.rounds_at(config.getoption("qk_extra_rounds"), seq)
    while extra > 0 and sum(harness.quiet(r) for r in measured) < wanted:
        one_round()
        extra -= 1


def interleaved(benchmark, tmp_root, name: str, wanted: int, config, seq: int, run) -> list[dict]:
    """`wanted` capture rounds timed by pytest-benchmark, topped up while too few were quiet."""
    measured: list[dict] = []
    one_round = capture_round(measured, tmp_root, name, run)
    benchmark.pedantic(one_round, rounds=wanted, iterations=1)
    top_up(one_round, measured, wanted, config, seq)
    return measured


def warm_up(model, tmp_root, name: str) -> None:
    """A first small capture: imports, thread start, Parquet writer set-up stay out of the rounds."""
    warm = tmp_root / f"warm-{name}"
    harness.run_end_to_end(model, ARM_BY_NAME["all"], harness.documents(128, 2), warm)
    harness.remove(warm)


def test_forward(benchmark, backbone, qk_results, seq, request):
    benchmark.group = f"forward-{seq}"
    (input_ids,) = harness.documents(seq, 1)
    for name in ("sdpa", "all"):  # warm-up: oneDNN primitives, allocator, the capture path
        harness.time_forward(backbone, ARM_BY_NAME[name], input_ids)
    measured: list[dict[str, float]] = []

    def one_round():
        times = {}
        for arm in harness.rotated(ARMS, len(measured)):
            gc.collect()
            times[arm.name] = harness.time_forward(backbone, arm, input_ids)
        measured.append(times)

    wanted = harness.rounds_at(request.config.getoption("qk_forward_rounds"), seq)
    benchmark.pedantic(one_round, rounds=wanted, iterations=1)
    top_up(one_round, measured, wanted, request.config, seq)
    qk_results.forward[seq] = measured
    benchmark.extra_info["seconds"] = [{name: vars(m) for name, m in r.items()} for r in measured]
    benchmark.extra_info["ratio_to_sdpa"] = {
        arm.name: vars(harness.pairwise_ratios(measured, arm.name)) for arm in ARMS if arm.name != "sdpa"
    }


def test_end_to_end(benchmark, backbone, qk_results, seq, tmp_root, request):
    benchmark.group = f"end-to-end-{seq}"
    docs = harness.documents(seq, request.config.getoption("qk_docs"))
    warm_up(backbone, tmp_root, str(seq))
    wanted = harness.rounds_at(request.config.getoption("qk_e2e_rounds"), seq)

    def run_arm(arm, out):
        return harness.run_end_to_end(backbone, arm, docs, out)

    measured = interleaved(benchmark, tmp_root, str(seq), wanted, request.config, seq, run_arm)
    qk_results.end_to_end[seq] = measured
    benchmark.extra_info["seconds"] = [{name: (run.seconds, run.foreign) for name, run in r.items()} for r in measured]
    benchmark.extra_info["bytes_written"] = {name: run.bytes_written for name, run in measured[-1].items()}


def test_decode(benchmark, backbone, qk_results, tmp_root, request):
    """Capture overhead per generated token: decode steps over a dynamic cache (issue 13)."""
    benchmark.group = "decode"
    (prompt,) = harness.documents(harness.DECODE_PROMPT, 1)
    (new_tokens,) = harness.documents(harness.DECODE_NEW_TOKENS, 1, seed=2)
    wanted = request.config.getoption("qk_e2e_rounds")

    def run_arm(arm, out):
        return harness.run_decode(backbone, arm, prompt, new_tokens, out)

    measured = interleaved(benchmark, tmp_root, "decode", wanted, request.config, harness.DECODE_PROMPT, run_arm)
    qk_results.decode = measured
    benchmark.extra_info["ms_per_token"] = [{name: run.per_token_ms for name, run in r.items()} for r in measured]


def test_decode_paired(benchmark, backbone, sdpa_backbone, qk_results, tmp_root):
    """test_decode's steps with the arms alternating every few tokens (harness.run_decode_paired): one
    run per capture arm, against a second model object of the same weights that only sdpa ever runs."""
    benchmark.group = "decode-paired"
    (prompt,) = harness.documents(harness.DECODE_PROMPT, 1)
    (new_tokens,) = harness.documents(harness.DECODE_NEW_TOKENS, 1, seed=2)

    def run_all():
        for arm in END_TO_END_ARMS:
            if arm.captures:
                out = tmp_root / f"decode-paired-{arm.name}"
                gc.collect()
                qk_results.decode_paired[arm.name] = harness.run_decode_paired(
                    sdpa_backbone, backbone, arm, prompt, new_tokens, out
                )
                harness.remove(out)

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    benchmark.extra_info["ratios"] = {name: run.ratios() for name, run in qk_results.decode_paired.items()}


def test_short_generation(benchmark, short_lm, qk_results, tmp_root, request):
    """Issue 20: one `generate()` (512-token prompt, 64 greedy tokens) of the 12-layer model with
    its LM head, one session opened and closed per generation, timed end to end."""
    benchmark.group = "short-generation"
    (prompt,) = harness.documents(harness.GENERATE_PROMPT, 1)
    warm = tmp_root / "warm-generate"  # generate()'s own first-call set-up, and a first sink
    harness.run_generate(short_lm, ARM_BY_NAME["all"], prompt[:, :16], warm)
    harness.remove(warm)
    wanted = request.config.getoption("qk_short_rounds")

    def run_arm(arm, out):
        return harness.run_generate(short_lm, arm, prompt, out)

    measured = interleaved(benchmark, tmp_root, "generate", wanted, request.config, harness.GENERATE_PROMPT, run_arm)
    qk_results.generation = measured
    benchmark.extra_info["seconds"] = [{name: run.seconds for name, run in r.items()} for r in measured]


def test_short_capture(benchmark, short_lm, qk_results, tmp_root, request):
    """Issue 20: 4 documents x 1024 tokens through the 12-layer backbone (`short_lm.model`, no LM
    head, like the long end-to-end runs), one session per run, timed from open to closed."""
    benchmark.group = "short-capture"
    backbone = short_lm.model
    docs = harness.documents(harness.SHORT_CAPTURE_SEQ, harness.SHORT_CAPTURE_DOCS)
    warm_up(backbone, tmp_root, "short")
    wanted = request.config.getoption("qk_short_rounds")

    def run_arm(arm, out):
        return harness.run_end_to_end(backbone, arm, docs, out)

    measured = interleaved(benchmark, tmp_root, "short", wanted, request.config, harness.SHORT_CAPTURE_SEQ, run_arm)
    qk_results.short_capture = measured
    benchmark.extra_info["seconds"] = [{name: run.seconds for name, run in r.items()} for r in measured]


def test_peak_rss(benchmark, qk_results, threads, request):
    """One fresh process per arm (bench/rss.py) running the end-to-end loop at 2048 tokens,
    as many at a time as `threads` leaves cores for."""
    benchmark.group = "peak-rss"
    docs = request.config.getoption("qk_docs")
    parallel = max(1, (os.cpu_count() or 1) // threads)  # RSS does not depend on CPU contention
    measured: dict[str, dict] = {}
    benchmark.pedantic(
        lambda: measured.update(rss.measure_all([arm.name for arm in ARMS], TARGET_SEQ, docs, threads, parallel)),
        rounds=1,
        iterations=1,
    )
    qk_results.rss = measured
    benchmark.extra_info["peak_rss"] = {name: info["peak_rss"] for name, info in measured.items()}
