"""Options, shared fixtures and the end-of-run table for the overhead benchmark.

    make bench            # = .venv/bin/pytest -q bench --benchmark-only -p no:cacheprovider

Run with the `pytest` binary, not `python -m pytest` (the repo root on sys.path would let
kernels/ shadow Hugging Face's `kernels` package). The ratio table is printed at the end and,
when every measurement ran, written to bench/results/cpu.md (or --qk-results PATH).
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

import harness  # first: clears QK_SNIFF_* before qk_attn is imported
import pytest
from report import OPTIONAL, Results, render

RESULTS_DEFAULT = Path(__file__).resolve().parent / "results" / "cpu.md"


def pytest_addoption(parser):
    group = parser.getgroup("qk-bench", "qk_sniff overhead benchmark")
    group.addoption("--qk-seqs", default="512,2048", help="sequence lengths (default 512,2048)")
    group.addoption(
        "--qk-forward-rounds", type=int, default=3, help="interleaved forward rounds at 2048 (x2 at <= 512)"
    )
    group.addoption("--qk-e2e-rounds", type=int, default=2, help="interleaved end-to-end rounds at 2048 (x2 at <= 512)")
    group.addoption(
        "--qk-extra-rounds",
        type=int,
        default=1,
        help="extra rounds (x2 at <= 512) while fewer rounds than asked were quiet",
    )
    group.addoption(
        "--qk-short-rounds", type=int, default=5, help="interleaved rounds of each short-run benchmark (issue 20)"
    )
    group.addoption("--qk-docs", type=int, default=4, help="documents per end-to-end run (>= 4)")
    group.addoption(
        "--qk-threads",
        type=int,
        default=1,
        help="torch.set_num_threads in every process (default 1: see bench/results/cpu.md for why)",
    )
    group.addoption("--qk-results", default=None, help=f"Markdown output (default {RESULTS_DEFAULT}, full runs only)")
    group.addoption("--qk-tmp", default=tempfile.gettempdir(), help="where end-to-end runs write Parquet")


def pytest_configure(config):
    if not hasattr(config.option, "qk_seqs"):
        return
    seqs = tuple(int(s) for s in config.getoption("qk_seqs").split(","))
    config._qk_results = Results(
        command=shlex.join([".venv/bin/pytest", *sys.argv[1:]]),
        threads=config.getoption("qk_threads"),
        docs=config.getoption("qk_docs"),
        seqs=seqs,
        load_start=harness.load_average(),
    )
    if harness.CLEARED_ENV:
        config._qk_results.notes.append(f"cleared from the environment for this run: {', '.join(harness.CLEARED_ENV)}")


def pytest_generate_tests(metafunc):
    if "seq" in metafunc.fixturenames:
        seqs = metafunc.config._qk_results.seqs
        metafunc.parametrize("seq", seqs, ids=[str(s) for s in seqs])


@pytest.fixture(scope="session")
def qk_results(request) -> Results:
    return request.config._qk_results


@pytest.fixture(scope="session")
def threads(request) -> int:
    import torch

    count = request.config.getoption("qk_threads")
    torch.set_num_threads(count)
    return count


@pytest.fixture(scope="session")
def backbone(threads):
    return harness.build_backbone()


@pytest.fixture(scope="session")
def sdpa_backbone(threads):
    """A second backbone of the same weights, which only sdpa runs (test_decode_paired)."""
    return harness.build_backbone()


@pytest.fixture(scope="session")
def short_lm(threads):
    """Issue 20's 12-layer model with its LM head; `.model` is the backbone of the short captures."""
    return harness.build_lm(num_hidden_layers=harness.SHORT_LAYERS)


@pytest.fixture(scope="session")
def tmp_root(request):
    with tempfile.TemporaryDirectory(prefix="qk-bench-", dir=request.config.getoption("qk_tmp")) as path:
        yield Path(path)


def pytest_collection_finish(session):
    """The optional sections whose tests were selected: the table is complete only with them."""
    results: Results | None = getattr(session.config, "_qk_results", None)
    if results is not None:
        results.selected = {OPTIONAL[item.originalname] for item in session.items if item.originalname in OPTIONAL}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results: Results | None = getattr(config, "_qk_results", None)
    if results is None or not results.measured():
        return
    results.load_end = harness.load_average()
    results.machine = harness.machine_description(results.threads)
    text = render(results)
    terminalreporter.write_sep("=", "qk_sniff overhead (ratios to vanilla sdpa)")
    terminalreporter.write_line(text)
    target = config.getoption("qk_results")
    if target is None and results.complete():
        target = RESULTS_DEFAULT
    if target is None:
        terminalreporter.write_line("partial run: table not written (pass --qk-results PATH to write it)")
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    terminalreporter.write_line(f"written: {target}")
