"""The results of one benchmark run and their Markdown table (printed and written to bench/results/)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import harness
from harness import ARMS, BASELINE, TARGET_SEQ, TARGETS, pairwise_ratios

MB = 1e6
# Issue 20's sections: test -> Results field. A run needs them for completeness only if it selected them.
OPTIONAL = {
    "test_short_generation": "generation",
    "test_short_capture": "short_capture",
    "test_decode_paired": "decode_paired",
}


@dataclass
class Results:
    command: str
    threads: int
    docs: int
    seqs: tuple[int, ...]
    machine: dict[str, str] = field(default_factory=dict)
    load_start: str = ""
    load_end: str = ""
    forward: dict[int, list[dict[str, harness.Measurement]]] = field(default_factory=dict)  # seq -> rounds
    end_to_end: dict[int, list[dict[str, harness.EndToEnd]]] = field(default_factory=dict)
    rss: dict[str, dict] = field(default_factory=dict)  # arm -> rss.py JSON (TARGET_SEQ)
    decode: list[dict[str, harness.Decode]] = field(default_factory=list)  # rounds
    decode_paired: dict[str, harness.PairedDecode] = field(default_factory=dict)  # arm -> its run
    generation: list[dict[str, harness.Generation]] = field(default_factory=list)  # rounds
    short_capture: list[dict[str, harness.EndToEnd]] = field(default_factory=list)  # rounds
    selected: set[str] = field(default_factory=set)  # OPTIONAL fields whose tests were selected
    notes: list[str] = field(default_factory=list)

    def complete(self) -> bool:
        return (
            all(seq in self.forward and seq in self.end_to_end for seq in self.seqs)
            and set(self.rss) == {arm.name for arm in ARMS}
            and bool(self.decode)
            and all(getattr(self, name) for name in self.selected)
        )

    def measured(self) -> bool:
        return any(
            (
                self.forward,
                self.end_to_end,
                self.rss,
                self.decode,
                self.decode_paired,
                self.generation,
                self.short_capture,
            )
        )

    # ---- derived numbers -------------------------------------------------------------
    def forward_ratio(self, seq: int, arm: str):
        return pairwise_ratios(self.forward.get(seq, []), arm)

    def end_to_end_ratio(self, seq: int, arm: str):
        return pairwise_ratios(self.end_to_end.get(seq, []), arm)

    def rss_over_baseline(self, arm: str) -> float | None:
        if arm not in self.rss or BASELINE not in self.rss:
            return None
        base = self.rss[BASELINE]["peak_rss"]
        return (self.rss[arm]["peak_rss"] - base) / base

    def runs(self, seq: int, arm: str) -> list[harness.EndToEnd]:
        return [r[arm] for r in self.end_to_end.get(seq, []) if arm in r]

    def bytes_per_token(self, seq: int, arm: str) -> float | None:
        runs = self.runs(seq, arm)
        return runs[-1].bytes_written / runs[-1].tokens if runs else None

    def direct(self, seq: int, arm: str) -> dict[str, float]:
        """Noise-robust measures (medians over the used rounds): capture share of the sdpa
        forward, per-doc capture/saver/drain of the end-to-end runs, and the bound."""
        med = lambda values: statistics.median(values) if values else None  # noqa: E731
        out: dict[str, float] = {}
        forward_rounds = [r for r in harness.used_rounds(self.forward.get(seq, [])) if arm in r]
        if forward_rounds:
            out["capture_ms"] = med([r[arm].capture * 1e3 for r in forward_rounds])
            out["capture_share"] = med([r[arm].capture / r[BASELINE].seconds for r in forward_rounds])
            out["forward"] = 1 + out["capture_share"]
        runs = [(r[arm], r[BASELINE]) for r in harness.used_rounds(self.end_to_end.get(seq, [])) if arm in r]
        if runs:
            out["doc_capture_ms"] = med([a.capture / a.docs * 1e3 for a, _ in runs])
            out["doc_capture_share"] = med([a.capture / b.seconds for a, b in runs])
            out["saver_cpu"] = med([(a.other_threads_cpu - b.other_threads_cpu) / a.docs for a, b in runs])
            out["saver_share"] = med([(a.other_threads_cpu - b.other_threads_cpu) / b.seconds for a, b in runs])
            out["drain"] = med([a.drain for a, _ in runs])
            out["bound"] = med([1 + (a.capture + a.drain) / b.seconds for a, b in runs])
        return out

    def rss_bounded(self, arm: str) -> bool | None:
        """Peak RSS stops growing with documents: from after doc 2 to the end it grows by less
        than a quarter of what one document writes."""
        info = self.rss.get(arm)
        if not info or len(info["peak_rss_after_doc"]) < 3:
            return None
        peaks = info["peak_rss_after_doc"]
        per_doc = max(info["bytes_written"] / info["docs"], harness.SMOLLM2_135M_SHAPE["head_dim"] * 4 * info["seq"])
        return peaks[-1] - peaks[1] < 0.25 * per_doc


def qk_attn_default(name: str):
    return getattr(harness.qk_attn.SniffConfig(), name)


def _seconds(values: list[float]) -> str:
    values = sorted(values)
    return f"{values[len(values) // 2]:.2f} s" if values else "n/a"


def _cell(ratio) -> str:
    return ratio.cell() if ratio else "n/a"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("✓" if ok else "✗")


def _target(ratio, target: float | None) -> str:
    return "—" if target is None or ratio is None else f"≤ {target:.2f} {_mark(ratio.median <= target)}"


def _arm_table(rounds: list[dict], header: list[str], absolute, targets: dict[str, float], details) -> list[str]:
    """One row per end-to-end arm over the used rounds: arm, `absolute(runs)`, then for capture
    arms the ratio to sdpa, the target mark and `details(arm name, runs)`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    used = harness.used_rounds(rounds)
    for arm in harness.END_TO_END_ARMS:
        runs = [r[arm.name] for r in used if arm.name in r]
        if not runs:
            continue
        cells = [f"**{arm.name}**", absolute(runs)]
        if arm.name == BASELINE:
            cells += ["—"] * (len(header) - 2)
        else:
            ratio = pairwise_ratios(rounds, arm.name)
            cells += [_cell(ratio), _target(ratio, targets.get(arm.name)), *details(arm.name, runs)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets_text(targets: dict[str, float]) -> str:
    return ", ".join(f"{name} ≤ {target:.2f}" for name, target in targets.items())


def _rounds_note(rounds: list[dict]) -> str:
    ratio = pairwise_ratios(rounds, "all")
    return "" if ratio is None else f" {ratio.n} of {ratio.total} rounds used."


def _decode_lines(rounds: list[dict[str, harness.Decode]]) -> list[str]:
    """Per generated token: decode steps over a dynamic cache after a prefill (issues 13, 20)."""
    med = statistics.median
    lines = [
        "",
        f"## Decode (issue 20, per generated token: {_targets_text(harness.DECODE_TARGETS)})",
        "",
        f"A {harness.DECODE_PROMPT}-token prompt prefilled into a `DynamicCache`, then "
        f"{harness.DECODE_NEW_TOKENS} one-token forwards (what `generate()` runs per step; the backbone has "
        "no LM head or sampling). Capture arms record prompt and new tokens into a Parquet session; only "
        "the decode steps are timed; *close* is the commit and session close after the last step. "
        "*Main-thread CPU* is the ratio of the CPU seconds the main thread spent in the steps (torch computes "
        "on that one thread; capture runs there too; the saver does not): it does not count time lost to other "
        "processes, so it moves less than wall time on a shared machine. *Process CPU* adds the saver's."
        + _rounds_note(rounds),
        "",
    ]
    lines += _arm_table(
        rounds,
        ["arm", "per token", "ratio to sdpa", "target", "main-thread CPU", "process CPU", "capture per token", "close"],
        lambda runs: f"{med(run.per_token_ms for run in runs):.1f} ms",
        harness.DECODE_TARGETS,
        lambda name, runs: [
            _cell(pairwise_ratios(rounds, name, measure="thread_cpu")),
            _cell(pairwise_ratios(rounds, name, measure="cpu")),
            f"{med(run.capture / run.steps * 1e3 for run in runs):.2f} ms",
            f"{med(run.close for run in runs):.2f} s",
        ],
    )
    return lines


def _decode_paired_lines(runs: dict[str, harness.PairedDecode]) -> list[str]:
    """The decode steps again, the arms alternating every PAIRED_BLOCK tokens (harness.run_decode_paired)."""
    block = harness.PAIRED_BLOCK
    lines = [
        "",
        f"## Decode, arms alternating every {block} tokens (issue 20: {_targets_text(harness.DECODE_TARGETS)})",
        "",
        f"The same prompt and steps; a second model object of the same weights runs sdpa only, and {block} "
        f"steps of it alternate with {block} steps of the capture arm, each model with its own cache at the same "
        "length, one run per arm. Each pair of blocks gives a ratio; the cell is their median, with the "
        "quartiles: slow drift of a shared machine hits both arms of a pair alike. The saver's work for a capture block "
        "may run on into the sdpa block after it (the other core), slowing that block: this flatters `all`, whose "
        "saver writes every row; judge `all` by the table above. *Main-thread CPU* is the same ratio of the "
        "main thread's CPU seconds (time lost to other processes not counted).",
        "",
        "| arm | sdpa per token | ratio to sdpa (median, quartiles) | target | main-thread CPU | block pairs |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        median, quartiles = _median_quartiles(run.ratios())
        target = harness.DECODE_TARGETS[name]
        cpu_median, cpu_quartiles = _median_quartiles(run.cpu_ratios())
        lines.append(
            f"| **{name}** | {statistics.median(run.sdpa) * 1e3:.1f} ms | {median:.3f} {quartiles} | "
            f"≤ {target:.2f} {'✓' if median <= target else '✗'} | {cpu_median:.3f} {cpu_quartiles} | "
            f"{len(run.ratios())} |"
        )
    return lines


def _median_quartiles(ratios: list[float]) -> tuple[float, str]:
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return statistics.median(ratios), f"({low:.3f}–{high:.3f})"


def _generation_lines(rounds: list[dict[str, harness.Generation]]) -> list[str]:
    """Issue 20: one generate() per session, end to end."""
    med = statistics.median
    lines = [
        "",
        "## Short generation, one session per `generate()` (issue 20)",
        "",
        f"`LlamaForCausalLM` (with the LM head) of the same shape with {harness.SHORT_LAYERS} layers; "
        f"`generate()` of {harness.GENERATE_NEW_TOKENS} greedy tokens after a {harness.GENERATE_PROMPT}-token "
        "prompt, timed from session open to session closed (rows durable). The issue sets no target of its "
        f"own: it should approach decode's ({_targets_text(harness.DECODE_TARGETS)}), which the target "
        "column applies; before issue 20 this case measured log_uniform 1.16, all 1.86. *Open* and "
        "*close* are the session's set-up and its close after `generate()` returned." + _rounds_note(rounds),
        "",
    ]
    lines += _arm_table(
        rounds,
        ["arm", "per generation", "ratio to sdpa", "decode's target", "CPU ratio", "capture", "open", "close"],
        lambda runs: (
            f"{med(run.seconds for run in runs):.2f} s "
            f"({med(run.seconds / run.new_tokens * 1e3 for run in runs):.0f} ms / new token)"
        ),
        harness.DECODE_TARGETS,
        lambda name, runs: [
            _cell(pairwise_ratios(rounds, name, measure="cpu")),
            f"{med(run.capture * 1e3 for run in runs):.0f} ms",
            f"{med(run.open * 1e3 for run in runs):.0f} ms",
            f"{med(run.close * 1e3 for run in runs):.0f} ms",
        ],
    )
    return lines


def _short_capture_lines(rounds: list[dict[str, harness.EndToEnd]]) -> list[str]:
    """Issue 20: a few short documents per session, end to end."""
    med = statistics.median
    lines = [
        "",
        f"## Short captures, one session per run (issue 20: {_targets_text(harness.SHORT_CAPTURE_TARGETS)})",
        "",
        f"{harness.SHORT_CAPTURE_DOCS} documents × {harness.SHORT_CAPTURE_SEQ} tokens through the "
        f"{harness.SHORT_LAYERS}-layer backbone (`LlamaModel`, no LM head), each `begin` → forward → `commit`, "
        "timed from session open to session closed: the session's fixed cost against a short capture "
        "(`bench/profile_short.py` splits it). *Drain* is the last forward's end to session closed."
        + _rounds_note(rounds),
        "",
    ]
    lines += _arm_table(
        rounds,
        ["arm", "per run", "ratio to sdpa", "target", "CPU ratio", "capture", "drain at close"],
        lambda runs: f"{med(run.seconds for run in runs):.2f} s",
        harness.SHORT_CAPTURE_TARGETS,
        lambda name, runs: [
            _cell(pairwise_ratios(rounds, name, measure="cpu")),
            f"{med(run.capture * 1e3 for run in runs):.0f} ms",
            f"{med(run.drain * 1e3 for run in runs):.0f} ms",
        ],
    )
    return lines


def render(results: Results) -> str:
    seqs = results.seqs
    docs = results.docs
    lines = [
        "# qk_sniff overhead versus vanilla SDPA on CPU (SmolLM2-135M shape)",
        "",
        f"Produced by `{results.command}` (what `make bench` runs; bench/test_overhead.py, bench/rss.py).",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in results.machine.items()]
    lines += [
        f"- load average (1/5/15 min) at start: {results.load_start}; at end: {results.load_end}"
        " (a shared machine: anything above the core count means other work competed)",
        "",
        "## Set-up",
        "",
        "Random-weight `LlamaModel` (backbone, no LM head) with the SmolLM2-135M shape: hidden 576, "
        "30 layers, 9 query / 3 KV heads, head_dim 64, intermediate 1536, vocab 49152; fp32, eval, "
        "batch 1, `use_cache=False`, `torch.inference_mode()`. One model, one input per length, "
        "arms interleaved inside every round (rotated order).",
        "",
        f"`torch.set_num_threads({results.threads})` in every process. "
        + (
            "One thread, on purpose: on this shared 2-core machine two OpenMP threads stall whenever "
            "another process takes a core (a 512-token forward took 0.8 s or 4.8 s at random), while one "
            "thread gives stable timings and leaves the second core to the saver thread, which is the "
            "overlap being measured. The CPU-time table gives the cost when compute uses every core."
            if results.threads == 1
            else ""
        ),
        "",
        '- **sdpa**: `attn_implementation="sdpa"` (vanilla).',
        '- **off**: `attn_implementation="qk_sniff"`, no session, `QK_SNIFF_OUTPUT` unset.',
        '- **uniform**: `session(sampler="uniform", min_bucket_size=8192, base_rate=1)`.',
        '- **log_uniform**: `session(sampler="log_uniform", min_bucket_size=128, base_rate=1)`.',
        '- **all**: `session(sampler="all")` (every query and key vector of every head).',
        "",
        "*Forward only*: one forward; capture arms do everything a Parquet session does inside the "
        "attention call (sampler mask, compaction, gather, copy into the bounded host pool) with no saver "
        "thread (pieces are released at once; `harness.TransferOnlySink`). "
        f"*End to end*: {docs} documents, each `begin` → forward → `commit`, then the session closes "
        "(every row durable in Parquet in a temporary directory); the saver overlaps the next "
        "forward. Ratios are per round (arm / sdpa in the same round); the cell is the median over "
        "rounds with min–max in brackets. *Peak RSS*: VmHWM of a fresh process per arm running the "
        f"end-to-end loop at {TARGET_SEQ} tokens, restarted after the model is built, with "
        "`MALLOC_MMAP_THRESHOLD_=1048576` (glibc's dynamic threshold made identical sdpa processes "
        "peak 40–50 MB apart).",
        "",
        "## Ratios to vanilla sdpa",
        "",
    ]
    header = ["arm"]
    header += [f"forward {s}" for s in seqs]
    header += [f"end to end {s} ({docs} docs)" for s in seqs]
    header += [f"peak RSS vs sdpa ({TARGET_SEQ})", f"bytes written / token ({TARGET_SEQ})"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in ARMS:
        name = arm.name
        row = [f"**{name}**"]
        if name == BASELINE:
            row += [
                _seconds([r[name].seconds for r in harness.used_rounds(results.forward.get(s, []))]) + " / forward"
                for s in seqs
            ]
            row += [
                _seconds([r[name].seconds / r[name].docs for r in harness.used_rounds(results.end_to_end.get(s, []))])
                + " / doc"
                for s in seqs
            ]
            info = results.rss.get(name)
            row += [f"{info['peak_rss'] / MB:.0f} MB" if info else "n/a", "—"]
        else:
            row += [_cell(results.forward_ratio(s, name)) for s in seqs]
            row += ["—" if name == "off" else _cell(results.end_to_end_ratio(s, name)) for s in seqs]
            over = results.rss_over_baseline(name)
            if over is None:
                row.append("n/a")
            else:
                delta = (results.rss[name]["peak_rss"] - results.rss[BASELINE]["peak_rss"]) / MB
                row.append(f"{over * 100:+.1f}% ({delta:+.0f} MB)")
            per_token = results.bytes_per_token(TARGET_SEQ, name)
            row.append("—" if name == "off" else ("n/a" if per_token is None else f"{per_token:,.1f}"))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "CPU time of the process (all threads, the saver's included) as ratios to sdpa, same rounds; "
        "it moves less than wall time when other processes compete for the cores:",
        "",
    ]
    header = ["arm"] + [f"forward {s} CPU" for s in seqs] + [f"end to end {s} CPU" for s in seqs]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in ARMS:
        if arm.name == BASELINE:
            continue
        row = [f"**{arm.name}**"]
        row += [_cell(pairwise_ratios(results.forward.get(s, []), arm.name, measure="cpu")) for s in seqs]
        row += [
            "—" if arm.name == "off" else _cell(pairwise_ratios(results.end_to_end.get(s, []), arm.name, measure="cpu"))
            for s in seqs
        ]
        lines.append("| " + " | ".join(row) + " |")
    used = []
    for label, table in (("forward", results.forward), ("end to end", results.end_to_end)):
        for s in seqs:
            ratio = pairwise_ratios(table.get(s, []), "all")
            if ratio:
                foreign = [m.foreign for r in table[s] for m in r.values()]
                used.append(
                    f"{label} {s}: {ratio.n} of {ratio.total} rounds used "
                    f"(others' share of the machine per measurement: median {statistics.median(foreign):.0%}, "
                    f"max {max(foreign):.0%})"
                )
    lines += [
        "",
        "The sdpa row gives its median absolute time. Rounds in which other processes used more than "
        f"{harness.QUIET:.0%} of the machine during any arm are left out when two or more quiet rounds remain:",
        "",
    ]
    lines += [f"- {line}" for line in used]
    lines += [
        "",
        f"## Targets (issue 7, {TARGET_SEQ} tokens)",
        "",
        "Judged twice: on the median wall-time ratio above, and on the direct measures below "
        "(forward: 1 + capture share; end to end: the bound), which do not drift with the machine.",
        "",
        "| arm | forward target | wall | direct | end-to-end target | wall | direct | peak RSS over sdpa |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, target in TARGETS.items():
        direct = results.direct(TARGET_SEQ, name)
        cells = [f"**{name}**", f"≤ {target['forward']:.2f}"]
        ratio = results.forward_ratio(TARGET_SEQ, name)
        cells.append("n/a" if ratio is None else f"{ratio.median:.3f} {_mark(ratio.median <= target['forward'])}")
        value = direct.get("forward")
        cells.append("n/a" if value is None else f"{value:.3f} {_mark(value <= target['forward'])}")
        if "end_to_end" in target:
            cells.append(f"≤ {target['end_to_end']:.2f}")
            ratio = results.end_to_end_ratio(TARGET_SEQ, name)
            cells.append(
                "n/a" if ratio is None else f"{ratio.median:.3f} {_mark(ratio.median <= target['end_to_end'])}"
            )
            value = direct.get("bound")
            cells.append("n/a" if value is None else f"{value:.3f} {_mark(value <= target['end_to_end'])}")
        else:
            cells += ["—", "—", "—"]
        over = results.rss_over_baseline(name)
        if target["rss"] == "bounded":
            extra = (
                ""
                if over is None
                else (
                    f" (+{(results.rss[name]['peak_rss'] - results.rss[BASELINE]['peak_rss']) / MB:.0f} MB; "
                    f"host pool pinned_mb={qk_attn_default('pinned_mb')})"
                )
            )
            cells.append("bounded, not growing with documents: " + _mark(results.rss_bounded(name)) + extra)
        else:
            cells.append(f"≤ +{target['rss'] * 100:.0f}%: " + _mark(None if over is None else over <= target["rss"]))
        lines.append("| " + " | ".join(cells) + " |")
    if results.decode:
        lines += _decode_lines(results.decode)
    if results.decode_paired:
        lines += _decode_paired_lines(results.decode_paired)
    if results.generation:
        lines += _generation_lines(results.generation)
    if results.short_capture:
        lines += _short_capture_lines(results.short_capture)
    lines += ["", "## Where the time goes (direct measures, robust to run-to-run noise)", ""]
    lines += [
        "Wall-time ratios on a shared VM move by a few percent from run to run, more than the "
        "1–3% forward targets. These numbers are measured directly instead: *capture* is the wall "
        "time inside `Session.capture` (the whole in-call path: token context, sampler, compaction, "
        "gather, `sink.put`), as a share of the sdpa forward; *saver CPU* is the process CPU outside "
        "the main thread, minus the same for sdpa in the same round; *drain* is the time from the end "
        "of the last forward until the session has closed. *Bound* = 1 + (capture + drain) / sdpa "
        "time over the documents: the end-to-end ratio when the saver has a core of its own and "
        "nothing else interferes.",
        "",
    ]
    for seq in seqs:
        if not results.forward.get(seq) and not results.end_to_end.get(seq):
            continue
        lines += [
            f"At {seq} tokens (medians over rounds):",
            "",
            "| arm | capture in one forward | capture per doc (end to end) | saver CPU per doc | drain at close | bound |",
            "|---|---|---|---|---|---|",
        ]
        for arm in ARMS:
            if not arm.captures:
                continue
            d = results.direct(seq, arm.name)
            cells = [f"**{arm.name}**"]
            cells.append(f"{d['capture_ms']:.0f} ms ({d['capture_share']:.1%})" if "capture_ms" in d else "n/a")
            if "bound" in d:
                cells += [
                    f"{d['doc_capture_ms']:.0f} ms ({d['doc_capture_share']:.1%})",
                    f"{d['saver_cpu']:.2f} s ({d['saver_share']:.1%})",
                    f"{d['drain']:.2f} s",
                    f"{d['bound']:.3f}",
                ]
            else:
                cells += ["n/a"] * 4
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Details", ""]
    if results.rss:
        lines += [
            f"RSS (MB) per process at {TARGET_SEQ} tokens, {docs} documents: after building the model, "
            "then the peak since then (VmHWM, restarted after the build) after each document, and at the end (session closed):",
            "",
            "| arm | rows went to | RSS after model | peak after each doc | peak at end |",
            "|---|---|---|---|---|",
        ]
        for arm in ARMS:
            info = results.rss.get(arm.name)
            if info:
                peaks = info["peak_rss_after_doc"]
                lines.append(
                    f"| {arm.name} | {'—' if not arm.captures else info['mode']} | {info['rss_after_model'] / MB:.0f} | "
                    + " → ".join(f"{p / MB:.0f}" for p in peaks)
                    + f" | {info['peak_rss'] / MB:.0f} |"
                )
        lines.append("")
    for seq in seqs:
        if not results.end_to_end.get(seq):
            continue
        lines += [
            f"End to end at {seq} tokens (medians over rounds):",
            "",
            "| arm | s / doc | drain after last forward | rows / doc | MB written / doc | rows/s of wall time |",
            "|---|---|---|---|---|---|",
        ]
        for arm in harness.END_TO_END_ARMS:
            runs = results.runs(seq, arm.name)
            if not runs:
                continue
            med = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
            per_doc = med([r.seconds / r.docs for r in runs])
            drain = med([r.drain for r in runs])
            rows = runs[-1].rows / runs[-1].docs
            written = runs[-1].bytes_written / runs[-1].docs / MB
            rate = med([r.rows / r.seconds for r in runs])
            lines.append(f"| {arm.name} | {per_doc:.2f} | {drain:.2f} s | {rows:,.0f} | {written:.1f} | {rate:,.0f} |")
        lines.append("")
    if results.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in results.notes] + [""]
    return "\n".join(lines)
