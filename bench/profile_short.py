"""Where the fixed cost of one short capture goes (issue 20).

    .venv/bin/python bench/profile_short.py [--write] [--arms uniform,all] [--repeat 3]

The case of `test_short_capture`: 4 documents x 1024 tokens through the 12-layer backbone of
the SmolLM2-135M shape, one session opened and closed. The run's wall time is split into
session open, the forwards, begin + commit, and close. Inside open and close the storage steps
are timed by wrappers around qk_attn functions (this process only); a wrapped call's time
excludes the wrapped calls nested in it, per thread, so rows do not count anything twice. The
close's work runs on the saver thread while the caller waits, so it is also profiled with
cProfile there, in one extra run per arm (the profiler slows what it watches). Shares are of
the sdpa time of the same 4 forwards. --write: bench/results/short-capture-profile.md.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import harness  # first: clears QK_SNIFF_* before qk_attn is imported
import torch
from harness import ARM_BY_NAME

from qk_attn.capture.recorder import Session
from qk_attn.storage import card, compact, folder, saver, shards, sink, transfer
from qk_attn.storage.commit import Committer

RESULT = Path(__file__).resolve().parent / "results" / "short-capture-profile.md"


# ---- timers --------------------------------------------------------------------------------
def _group(thread: threading.Thread) -> str:
    """main, saver, writers or fsync: the thread a timed call ran on."""
    for prefix, group in (("qk-sniff-saver", "saver"), ("qk-sniff-writer", "writers"), ("qk-sniff-fsync", "fsync")):
        if thread.name.startswith(prefix):
            return group
    return "main" if thread is threading.main_thread() else "other"


class Timers:
    """Exclusive and inclusive wall seconds and calls per (thread group, label)."""

    def __init__(self) -> None:
        self.own: Counter = Counter()  # exclusive: nested timed calls subtracted
        self.inclusive: Counter = Counter()
        self.calls: Counter = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()

    def wrap(self, owner, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        @functools.wraps(inner, updated=())  # classes too (Writers, HostPool): no __dict__ copy
        def timed(*args, **kwargs):
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(0.0)  # seconds of the timed calls nested in this one
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                nested = stack.pop()
                if stack:
                    stack[-1] += seconds
                key = (_group(threading.current_thread()), label)
                with self._lock:
                    self.own[key] += seconds - nested
                    self.inclusive[key] += seconds
                    self.calls[key] += 1

        setattr(owner, attr, timed)

    def snapshot(self) -> tuple[Counter, Counter, Counter]:
        with self._lock:
            return Counter(self.own), Counter(self.inclusive), Counter(self.calls)


def install(timers: Timers) -> None:
    """Wrap the steps of a session's open and close (module attributes, where the callers look them up)."""
    for owner, attr, label in (
        (sink, "take_lock", "lock"),
        (sink, "open_capture", "open_capture"),
        (sink, "read_manifest", "read manifest"),
        (sink, "Writers", "writer pool"),
        (sink, "release_lock", "release lock"),
        (threading.Thread, "start", "thread start"),
        (transfer, "HostPool", "host pool"),
        (folder, "write_json_atomic", "manifest"),
        (saver, "write_json_atomic", "manifest"),
        (saver, "write_examples", "examples"),
        (saver, "write_buffer", "shard encode + write"),
        (os, "fsync", "os.fsync"),
        (shards.Writers, "fsync", "fsync wait"),
        (shards.Writers, "close", "stop writers"),
        (saver.SaverThread, "_handle", "other saver work"),
        (saver.SaverThread, "_accept", "accept"),
        (Committer, "_finalize", "finalise"),
        (Committer, "_complete", "finalise"),
        (Committer, "_compact", "compaction"),
        (compact, "merge", "compaction"),
        (card, "write_card", "card"),
        (card, "card_text", "card"),
        (card, "bucket_chart", "chart"),
        (sink.ParquetSink, "_wait", "wait for saver"),
        (Session, "capture", "capture"),
    ):
        timers.wrap(owner, attr, label)


# ---- one run -------------------------------------------------------------------------------
class Phases:
    """Main-thread wall time per phase, and the timers' totals within each phase."""

    def __init__(self, timers: Timers) -> None:
        self.timers = timers
        self.seconds: Counter = Counter()
        self.background_cpu: Counter = Counter()  # CPU seconds of the threads other than the caller's
        self.foreign = 0.0  # others' share of the machine during the run (harness.CpuMeter)
        self.own: dict[str, Counter] = {}
        self.inclusive: dict[str, Counter] = {}
        self.calls: dict[str, Counter] = {}
        self._name = None

    def start(self, name: str | None) -> None:
        now, (own, inclusive, calls) = time.perf_counter(), self.timers.snapshot()
        background = sum(os.times()[:2]) - time.thread_time()
        if self._name is not None:
            self.seconds[self._name] += now - self._since
            self.background_cpu[self._name] += background - self._background
            for total, now_, then in ((self.own, own, self._own), (self.inclusive, inclusive, self._inclusive)):
                total.setdefault(self._name, Counter()).update(now_ - then)
            self.calls.setdefault(self._name, Counter()).update(calls - self._calls)
        self._name, self._since, self._own, self._inclusive, self._calls = name, now, own, inclusive, calls
        self._background = background


def run(model, arm, docs, out: Path, timers: Timers) -> Phases:
    """begin -> forward -> commit per document in one session, phase by phase."""
    harness.use_arm(model, arm)
    phases = Phases(timers)
    gc.collect()
    with harness.CpuMeter() as meter:
        phases.start("open")
        with harness.qk_attn.session(output=str(out), **arm.settings) as session:
            for index, doc in enumerate(docs):
                phases.start("begin + commit")
                session.begin([index])
                phases.start("forwards")
                harness.forward(model, doc)
                phases.start("begin + commit")
                session.commit()
            phases.start("close")
        phases.start(None)
    phases.foreign = meter.foreign
    harness.remove(out)
    return phases


def profile_close(model, arm, docs, out: Path, top: int) -> list[tuple]:
    """cProfile of the saver thread's final flush (what close waits for): the `top` functions by own time."""
    profiler = cProfile.Profile()
    handle = saver.SaverThread._handle

    def profiled(self, item):
        if not (isinstance(item, saver._Flush) and item.final):
            return handle(self, item)
        profiler.enable()
        try:
            return handle(self, item)
        finally:
            profiler.disable()

    saver.SaverThread._handle = profiled
    try:
        run(model, arm, docs, out, Timers())
    finally:
        saver.SaverThread._handle = handle
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [(_where(func), calls, own, cumulative) for func, (_, calls, own, cumulative, _) in rows]


def _where(func: tuple) -> str:
    path, line, name = func
    if path == "~":
        return name  # a builtin
    for root in ("site-packages/", str(harness.REPO) + "/", sys.base_prefix + "/"):
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{path}:{line} {name}"


def first_close_imports() -> float:
    """Seconds to import what close imports lazily (the card module, matplotlib for the chart),
    paid by the first close of a process: measured in a fresh one, after what harness imports."""
    code = (
        "import time, harness; start = time.perf_counter(); "
        "import qk_attn.storage.card, matplotlib.figure, matplotlib.backends.backend_agg; "
        "print(time.perf_counter() - start)"
    )
    here = Path(__file__).resolve().parent
    return float(
        subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, check=True, text=True).stdout
    )


# ---- the table -----------------------------------------------------------------------------
def rows(phases: list[Phases]) -> list[tuple[str, float]]:
    """(phase, median ms over the runs); rows marked "·" are parts of the unmarked row above them."""

    def med(value) -> float:
        return statistics.median(value(p) for p in phases) * 1e3

    def own(phase: str, group: str, *labels: str):
        return lambda p: sum(p.own.get(phase, Counter())[(group, label)] for label in labels)

    def inclusive(phase: str, group: str, label: str):
        return lambda p: p.inclusive.get(phase, Counter())[(group, label)]

    open_parts = {
        "lock (take_lock)": own("open", "main", "lock"),
        "folder checks (open_capture)": own("open", "main", "open_capture", "read manifest"),
        "manifest write": own("open", "main", "manifest"),
        "fsync": own("open", "main", "os.fsync"),
        "thread starts (saver, 2 writers, 16 fsync)": own("open", "main", "thread start"),
        "writer pool (rest)": own("open", "main", "writer pool"),
    }
    saver_parts = {
        "saver: rows of the last documents into buffers": own("close", "saver", "accept"),
        "saver: finalise (shards to writers, wait, rename)": own("close", "saver", "finalise"),
        "saver: fsync (own and waits for the fsync threads)": own("close", "saver", "os.fsync", "fsync wait"),
        "saver: manifest writes": own("close", "saver", "manifest"),
        "saver: examples.parquet": own("close", "saver", "examples"),
        "saver: compaction": own("close", "saver", "compaction"),
        "saver: card (README.md)": own("close", "saver", "card"),
        "saver: chart (buckets.png)": own("close", "saver", "chart"),
        "saver: other (_handle)": own("close", "saver", "other saver work"),
    }
    wait = inclusive("close", "main", "wait for saver")
    out = [("session open", med(lambda p: p.seconds["open"]))]
    out += [(f"· {name}", med(f)) for name, f in open_parts.items()]
    out.append(
        (
            "· rest (config, recorder, sink set-up)",
            med(lambda p: p.seconds["open"] - sum(f(p) for f in open_parts.values())),
        )
    )
    out += [
        ("forwards", med(lambda p: p.seconds["forwards"])),
        ("· in-call capture (Session.capture)", med(own("forwards", "main", "capture"))),
        ("· host pool allocation (first batch)", med(own("forwards", "main", "host pool"))),
        ("· (CPU of the saver, writer and fsync threads meanwhile)", med(lambda p: p.background_cpu["forwards"])),
        ("begin + commit", med(lambda p: p.seconds["begin + commit"])),
        ("close", med(lambda p: p.seconds["close"])),
        ("· caller waits for the saver's final flush", med(wait)),
    ]
    out += [(f"· · {name}", med(f)) for name, f in saver_parts.items()]
    out.append(
        ("· after the flush: join saver, stop writers, release lock", med(lambda p: p.seconds["close"] - wait(p)))
    )
    out.append(("total (open → closed)", med(lambda p: sum(p.seconds.values()))))
    return out


def off_thread(phases: list[Phases]) -> list[tuple[str, float, float]]:
    """Work on the writer and fsync threads during close (overlaps the saver's waits): (what, calls, ms)."""
    items = (("writers", "shard encode + write"), ("writers", "compaction"), ("fsync", "os.fsync"))
    return [
        (
            f"{group}: {label}",
            statistics.median(p.calls.get("close", Counter())[(group, label)] for p in phases),
            statistics.median(p.own.get("close", Counter())[(group, label)] for p in phases) * 1e3,
        )
        for group, label in items
    ]


def fsyncs(phases: list[Phases]) -> float:
    """os.fsync calls in a whole run (all threads), median over the runs."""
    return statistics.median(
        sum(n for calls in p.calls.values() for (_, label), n in calls.items() if label == "os.fsync") for p in phases
    )


def markdown(arms, results, sdpa: float, profiles, imports, args) -> str:
    names = [arm.name for arm in arms]
    lines = [
        "# Fixed cost of one short capture (issue 20)",
        "",
        f"Produced by `{' '.join(['.venv/bin/python bench/profile_short.py', *sys.argv[1:]])}`.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in harness.machine_description(args.threads).items()]
    lines += [
        "",
        f"{harness.SHORT_CAPTURE_DOCS} documents × {harness.SHORT_CAPTURE_SEQ} tokens through the "
        f"{harness.SHORT_LAYERS}-layer backbone (SmolLM2-135M shape, random weights, fp32), one session: "
        f"begin → forward → commit per document, then close. Medians over {args.repeat} runs per arm, "
        f"interleaved with sdpa. sdpa runs the same forwards in **{sdpa * 1e3:.0f} ms**; *share* is of that.",
        "Rows marked · are parts of the row above (timers around qk_attn functions, nested timers "
        "subtracted); close's parts run on the saver thread while the caller waits. The row in "
        "brackets is CPU time of the other threads, which overlaps the forwards.",
        "",
        "| phase | " + " | ".join(f"{n} ms | {n} share" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    tables = [rows(results[n]) for n in names]
    for index, (label, _) in enumerate(tables[0]):
        cells = [f"{t[index][1]:.1f} | {t[index][1] / (sdpa * 1e3):.1%}" for t in tables]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for t in tables:
        over = t[-1][1] - sdpa * 1e3
        cells.append(f"{over:.1f} | {over / (sdpa * 1e3):.1%}")
    lines.append("| **overhead over sdpa** | " + " | ".join(cells) + " |")
    lines += ["", "Off the saver thread during close (overlapping its waits; calls, ms summed over threads):", ""]
    lines += ["| thread: work | " + " | ".join(f"{n} calls | {n} ms" for n in names) + " |"]
    lines += ["|---|" + "---|---|" * len(names)]
    others = [off_thread(results[n]) for n in names]
    for index, (label, _, _) in enumerate(others[0]):
        lines.append(f"| {label} | " + " | ".join(f"{o[index][1]:.0f} | {o[index][2]:.1f}" for o in others) + " |")
    lines.append("")
    lines.append("fsync calls per run (all threads): " + ", ".join(f"{n} {fsyncs(results[n]):.0f}" for n in names))
    lines.append(
        "Others' share of the machine during the runs (harness.CpuMeter): "
        + ", ".join(f"{n} median {statistics.median(p.foreign for p in results[n]):.0%}" for n in names)
    )
    lines.append(
        f"\nImports at the first close of a process (qk_attn.storage.card, matplotlib for the chart): "
        f"{imports * 1e3:.0f} ms, once per process, not in the rows above (a warm-up run paid them)."
    )
    for name, top in profiles.items():
        lines += [
            "",
            f"cProfile of the saver thread's final flush, arm {name} (one extra run; own time under the profiler):",
            "",
            "| function | calls | own ms | cumulative ms |",
            "|---|---|---|---|",
        ]
        lines += [f"| `{where}` | {calls} | {own * 1e3:.1f} | {cum * 1e3:.1f} |" for where, calls, own, cum in top]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="uniform,all")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per arm (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark's default: 1)")
    parser.add_argument("--top", type=int, default=12, help="cProfile rows per arm")
    parser.add_argument("--write", action="store_true", help=f"also write {RESULT.relative_to(harness.REPO)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    imports = first_close_imports()
    arms = [ARM_BY_NAME[name] for name in args.arms.split(",")]
    model = harness.build_backbone(num_hidden_layers=harness.SHORT_LAYERS)
    docs = harness.documents(harness.SHORT_CAPTURE_SEQ, harness.SHORT_CAPTURE_DOCS)
    timers = Timers()
    install(timers)
    with tempfile.TemporaryDirectory(prefix="qk-profile-") as tmp:
        tmp = Path(tmp)
        run(model, ARM_BY_NAME["all"], harness.documents(128, 2), tmp / "warm", timers)  # imports, first sink
        sdpa, results = [], {arm.name: [] for arm in arms}
        for repeat in range(args.repeat):
            sdpa.append(harness.run_end_to_end(model, ARM_BY_NAME["sdpa"], docs, None).seconds)
            for arm in harness.rotated(arms, repeat):
                results[arm.name].append(run(model, arm, docs, tmp / f"{arm.name}-{repeat}", timers))
        profiles = {arm.name: profile_close(model, arm, docs, tmp / f"profile-{arm.name}", args.top) for arm in arms}
    text = markdown(arms, results, statistics.median(sdpa), profiles, imports, args)
    print(text)
    if args.write:
        RESULT.write_text(text)
        print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
