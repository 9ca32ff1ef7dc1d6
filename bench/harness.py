"""Shared pieces of the CPU overhead benchmark (issue 7): the model, the arms, one timed run.

Used by `test_overhead.py` (timings, interleaved arms, pytest-benchmark) and by `rss.py`
(peak RSS, one process per arm). Everything the results depend on is defined here once:

    model   random-weight Llama with the shape of SmolLM2-135M, fp32, eval, backbone only
            (`LlamaModel`: no LM head), batch 1, use_cache=False
    arms    sdpa         vanilla transformers SDPA
            off          attn_implementation="qk_sniff", no session, QK_SNIFF_* unset
            uniform      session(sampler="uniform", min_bucket_size=8192, base_rate=1)
            log_uniform  session(sampler="log_uniform", min_bucket_size=128, base_rate=1)
            all          session(sampler="all")
    forward only   one forward; capture arms run everything the attention call does in a
                   Parquet session (select, gather, copy into the host pool) but no saver
    end to end     N documents: begin -> forward -> commit each, session closed at the end
                   (rows durable in Parquet); the saver overlaps the next forward
    short runs     (issue 20) a 12-layer model of the same shape, one session per run, timed
                   from session open to session closed: `generate()` with the LM head
                   (`LlamaForCausalLM`), and a few 1024-token documents through its backbone

Importing this module clears QK_SNIFF_* from the environment *before* importing qk_attn:
the "off" arm is defined as "no session and no QK_SNIFF_OUTPUT".
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

CLEARED_ENV = {k: os.environ.pop(k) for k in sorted(os.environ) if k.startswith("QK_SNIFF_")}

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402

import qk_attn  # noqa: E402  (registers "qk_sniff")
from qk_attn.capture.sinks import Sink  # noqa: E402
from qk_attn.storage.transfer import Transfer  # noqa: E402

if CLEARED_ENV:  # in case qk_attn was imported before this module: drop its env-configured session
    qk_attn.reload_env()

REPO = Path(__file__).resolve().parent.parent

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json), weights random.
SMOLLM2_135M_SHAPE = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class Arm:
    name: str
    attn: str  # attn_implementation
    settings: dict | None = None  # qk_attn.session() keywords; None: no session

    @property
    def captures(self) -> bool:
        return self.settings is not None


ARMS = (
    Arm("sdpa", "sdpa"),
    Arm("off", "qk_sniff"),
    Arm("uniform", "qk_sniff", dict(sampler="uniform", min_bucket_size=8192, base_rate=1.0)),
    Arm("log_uniform", "qk_sniff", dict(sampler="log_uniform", min_bucket_size=128, base_rate=1.0)),
    Arm("all", "qk_sniff", dict(sampler="all")),
)
ARM_BY_NAME = {arm.name: arm for arm in ARMS}
BASELINE = "sdpa"
# "off" has nothing to commit; its end-to-end run would be its forward run again.
END_TO_END_ARMS = tuple(arm for arm in ARMS if arm.name != "off")

# Issue 7 targets at 2048 tokens: ratio to sdpa (forward, end to end), peak RSS over sdpa.
TARGETS = {
    "off": {"forward": 1.01, "rss": 0.02},
    "uniform": {"forward": 1.01, "end_to_end": 1.02, "rss": 0.05},
    "log_uniform": {"forward": 1.02, "end_to_end": 1.03, "rss": 0.05},
    "all": {"forward": 1.03, "end_to_end": 1.08, "rss": "bounded"},
}
TARGET_SEQ = 2048


# ---- model and inputs ------------------------------------------------------------------
def _config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**SMOLLM2_135M_SHAPE, **overrides}, attn_implementation="sdpa")


def build_backbone(seed: int = 0, **overrides) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(_config(**overrides)).eval()


def build_lm(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The model with its LM head, for `generate()`; `.model` is its backbone."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(**overrides)).eval()
    model.generation_config.pad_token_id = model.config.eos_token_id  # else generate() warns every call
    return model


def documents(seq: int, count: int, seed: int = 1) -> list[torch.Tensor]:
    """`count` distinct (1, seq) token sequences, the same for every arm."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + seq)
    vocab = SMOLLM2_135M_SHAPE["vocab_size"]
    return [torch.randint(0, vocab, (1, seq), generator=generator) for _ in range(count)]


def forward(model: LlamaModel, input_ids: torch.Tensor) -> None:
    with torch.inference_mode():
        model(input_ids=input_ids, use_cache=False)


def use_arm(model: LlamaModel, arm: Arm) -> None:
    if model.config._attn_implementation != arm.attn:
        model.set_attn_implementation(arm.attn)


def _session(arm: Arm, out_dir: Path | None):
    """The arm's Parquet session at `out_dir`, or no session (a null context yielding None)."""
    return qk_attn.session(output=str(out_dir), **arm.settings) if arm.captures else contextlib.nullcontext()


# ---- one measurement ---------------------------------------------------------------------
QUIET = 0.05  # a measurement is "quiet" when other processes used <= 5% of the machine meanwhile


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (user..steal, not idle/iowait) since boot."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Wall seconds of a block, CPU seconds of this process and of this thread, and the share
    of the machine other processes used meanwhile.

    foreign = (machine busy CPU - this process's CPU, saver thread included) / (wall x cores).
    On a shared machine this tells a clean measurement from one that competed for cores.
    """

    seconds: float = 0.0
    cpu: float = 0.0  # this process, all threads (the saver's included)
    thread_cpu: float = 0.0  # the calling thread only
    foreign: float = 0.0

    def __enter__(self) -> CpuMeter:
        self._own = sum(os.times()[:2])
        self._thread = time.thread_time()
        self._busy = _machine_busy_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self.thread_cpu = time.thread_time() - self._thread
        own = self.cpu = sum(os.times()[:2]) - self._own
        other = _machine_busy_seconds() - self._busy - own
        self.foreign = max(0.0, other) / (self.seconds * (os.cpu_count() or 1))


class CaptureClock:
    """Seconds spent inside `Session.capture` (the whole in-call capture path: context,
    sampler, gather, sink.put) -- measured directly, so it is not lost in run-to-run noise."""

    def __init__(self, session) -> None:
        self.seconds = 0.0
        inner = session.capture

        def capture(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        session.capture = capture  # capture.py calls current_session().capture(...)


@dataclass
class Measurement:
    seconds: float
    cpu: float  # CPU seconds of this process meanwhile
    foreign: float  # share of the machine other processes used meanwhile (see CpuMeter)
    capture: float = 0.0  # seconds inside Session.capture


class TransferOnlySink(Sink):
    """What a Parquet session does inside the attention call, without the saver thread.

    `put` runs the production transfer (copy into the bounded host pool, piece by piece) and
    releases each piece at once, so a forward-only measure holds exactly the in-call work:
    sampler mask, compaction, gather, copy out.
    """

    def __init__(self, config) -> None:
        self.transfer = Transfer(config.pinned_mb << 20)

    def put(self, batch) -> None:
        for piece in self.transfer.pieces(batch):
            piece.release()


def time_forward(model: LlamaModel, arm: Arm, input_ids: torch.Tensor) -> Measurement:
    """One forward; capture arms run the in-call production path (`TransferOnlySink`); the
    session is opened and closed outside the timing."""
    use_arm(model, arm)
    meter = CpuMeter()
    if not arm.captures:
        with meter:
            forward(model, input_ids)
        return Measurement(meter.seconds, meter.cpu, meter.foreign)
    sink = TransferOnlySink(qk_attn.SniffConfig.from_env(**arm.settings))
    with qk_attn.session(sink=sink, **arm.settings) as session:
        clock = CaptureClock(session)
        with meter:
            forward(model, input_ids)
    return Measurement(meter.seconds, meter.cpu, meter.foreign, clock.seconds)


@dataclass
class EndToEnd:
    seconds: float  # first forward start -> session closed (rows durable)
    cpu: float  # CPU seconds of this process meanwhile (saver thread included)
    foreign: float  # share of the machine other processes used meanwhile
    drain: float  # last forward end -> session closed: the part not overlapped with compute
    docs: int
    tokens: int
    bytes_written: int = 0
    rows: int = 0
    peak_rss_after_doc: list[int] = field(default_factory=list)  # bytes, monotone (closing not included)
    capture: float = 0.0  # seconds inside Session.capture (all documents)
    other_threads_cpu: float = 0.0  # process CPU minus the main thread's: saver (+ torch workers)


def run_end_to_end(model: LlamaModel, arm: Arm, docs: list[torch.Tensor], out_dir: Path | None) -> EndToEnd:
    """Every doc: begin -> forward -> commit; then close the session. `out_dir` must not exist
    (None: an in-memory session)."""
    use_arm(model, arm)
    peaks: list[int] = []
    tokens = sum(doc.numel() for doc in docs)
    meter = CpuMeter()
    if not arm.captures:
        with meter:
            for doc in docs:
                forward(model, doc)
                peaks.append(peak_rss())
        return EndToEnd(
            meter.seconds,
            meter.cpu,
            meter.foreign,
            0.0,
            len(docs),
            tokens,
            peak_rss_after_doc=peaks,
            other_threads_cpu=meter.cpu - meter.thread_cpu,
        )
    with meter:
        with qk_attn.session(output=None if out_dir is None else str(out_dir), **arm.settings) as session:
            clock = CaptureClock(session)
            for index, doc in enumerate(docs):
                session.begin([index])
                forward(model, doc)
                session.commit()
                peaks.append(peak_rss())
            last = time.perf_counter()
    drain = time.perf_counter() - last
    written = directory_bytes(out_dir) if out_dir is not None else 0
    return EndToEnd(
        meter.seconds,
        meter.cpu,
        meter.foreign,
        drain,
        len(docs),
        tokens,
        written,
        session.rows_written,
        peaks,
        clock.seconds,
        meter.cpu - meter.thread_cpu,
    )


# Issue 13: capture overhead per generated token (dynamic cache, 2048-token prompt, 128 new tokens).
DECODE_PROMPT = 2048
DECODE_NEW_TOKENS = 128
# Issue 20: ratio to sdpa per generated token.
DECODE_TARGETS = {"uniform": 1.02, "log_uniform": 1.02, "all": 1.10}


@dataclass
class Decode:
    seconds: float  # the decode steps only (prefill and closing excluded)
    cpu: float
    foreign: float
    steps: int
    close: float = 0.0  # commit + session close after the last step (rows durable)
    capture: float = 0.0  # seconds inside Session.capture during the decode steps
    thread_cpu: float = 0.0  # CPU seconds of the main thread (torch runs one thread): the in-line cost

    @property
    def per_token_ms(self) -> float:
        return self.seconds / self.steps * 1e3


def run_decode(
    model: LlamaModel, arm: Arm, prompt: torch.Tensor, new_tokens: torch.Tensor, out_dir: Path | None
) -> Decode:
    """Prefill `prompt` into a DynamicCache, then one forward per token of `new_tokens` (what
    generate() runs per step, minus the LM head and sampling, which the backbone has not).
    Capture arms record into a Parquet session at `out_dir`: begin -> prefill -> steps -> commit."""
    from transformers import DynamicCache

    use_arm(model, arm)
    cache = DynamicCache(config=model.config)
    meter = CpuMeter()
    with _session(arm, out_dir) as session, torch.inference_mode():
        if session is not None:
            session.begin([0])
        model(input_ids=prompt, cache=cache, use_cache=True)
        clock = CaptureClock(session) if session is not None else None
        with meter:
            for step in range(new_tokens.shape[1]):
                model(input_ids=new_tokens[:, step : step + 1], cache=cache, use_cache=True)
        closing = time.perf_counter()
    close = time.perf_counter() - closing
    capture = clock.seconds if clock else 0.0
    return Decode(meter.seconds, meter.cpu, meter.foreign, new_tokens.shape[1], close, capture, meter.thread_cpu)


# Issue 20, measured a second way: the two arms' steps alternate in blocks of this many tokens.
PAIRED_BLOCK = 8


@dataclass
class PairedDecode:
    """Seconds per token of each block of decode steps, the sdpa model's and the capture arm's blocks
    alternating (same weights, two model objects, each with its own cache at the same length)."""

    sdpa: list[float]
    arm: list[float]
    sdpa_cpu: list[float]  # the main thread's CPU seconds per token of the same blocks
    arm_cpu: list[float]

    def ratios(self) -> list[float]:
        return [arm / sdpa for arm, sdpa in zip(self.arm, self.sdpa)]

    def cpu_ratios(self) -> list[float]:
        return [arm / sdpa for arm, sdpa in zip(self.arm_cpu, self.sdpa_cpu)]


def run_decode_paired(
    sdpa_model: LlamaModel, model: LlamaModel, arm: Arm, prompt: torch.Tensor, new_tokens: torch.Tensor, out_dir: Path
) -> PairedDecode:
    """`run_decode`'s steps, as pairs of blocks: PAIRED_BLOCK steps of `sdpa_model` (vanilla sdpa, never
    touched by qk_attn), then as many of `model` under the capture arm, in alternating order. A slow
    minute of a shared machine then hits both arms alike, where whole runs one after the other (the
    rounds of `run_decode`) differ by more than the 2% a target allows."""
    from transformers import DynamicCache

    use_arm(model, arm)
    sdpa_cache, cache = DynamicCache(config=sdpa_model.config), DynamicCache(config=model.config)
    times: dict[str, list[float]] = {"sdpa": [], "arm": []}
    cpu: dict[str, list[float]] = {"sdpa": [], "arm": []}
    with _session(arm, out_dir) as session, torch.inference_mode():
        session.begin([0])
        sdpa_model(input_ids=prompt, cache=sdpa_cache, use_cache=True)
        model(input_ids=prompt, cache=cache, use_cache=True)
        for block, start in enumerate(range(0, new_tokens.shape[1] - PAIRED_BLOCK + 1, PAIRED_BLOCK)):
            order = (("sdpa", sdpa_model, sdpa_cache), ("arm", model, cache))
            for name, runs, kv in order if block % 2 == 0 else order[::-1]:
                begin, begin_cpu = time.perf_counter(), time.thread_time()
                for step in range(start, start + PAIRED_BLOCK):
                    runs(input_ids=new_tokens[:, step : step + 1], cache=kv, use_cache=True)
                times[name].append((time.perf_counter() - begin) / PAIRED_BLOCK)
                cpu[name].append((time.thread_time() - begin_cpu) / PAIRED_BLOCK)
    return PairedDecode(times["sdpa"], times["arm"], cpu["sdpa"], cpu["arm"])


# Issue 20: short runs as a researcher runs them, on a 12-layer model of the SmolLM2-135M shape.
SHORT_LAYERS = 12
GENERATE_PROMPT = 512
GENERATE_NEW_TOKENS = 64
SHORT_CAPTURE_SEQ = 1024
SHORT_CAPTURE_DOCS = 4
# Issue 20 gives short captures the long-session end-to-end targets (uniform and all only).
SHORT_CAPTURE_TARGETS = {name: TARGETS[name]["end_to_end"] for name in ("uniform", "all")}


@dataclass
class Generation:
    seconds: float  # session open -> generate() -> session closed (rows durable)
    cpu: float
    foreign: float
    new_tokens: int
    open: float = 0.0  # session open (sink set-up)
    close: float = 0.0  # generate() returned -> session closed
    capture: float = 0.0  # seconds inside Session.capture


def run_generate(model: LlamaForCausalLM, arm: Arm, prompt: torch.Tensor, out_dir: Path | None) -> Generation:
    """One greedy `generate()` of GENERATE_NEW_TOKENS tokens after `prompt`; capture arms open a
    Parquet session at `out_dir` around it (fresh cache: fresh example ids, committed at close)."""
    use_arm(model, arm)
    meter = CpuMeter()
    with meter:
        start = time.perf_counter()
        with _session(arm, out_dir) as session:
            opened = time.perf_counter()
            clock = CaptureClock(session) if session is not None else None
            output = model.generate(
                prompt, max_new_tokens=GENERATE_NEW_TOKENS, min_new_tokens=GENERATE_NEW_TOKENS, do_sample=False
            )
            closing = time.perf_counter()
        close = time.perf_counter() - closing
    return Generation(
        meter.seconds,
        meter.cpu,
        meter.foreign,
        output.shape[1] - prompt.shape[1],
        opened - start,
        close,
        clock.seconds if clock else 0.0,
    )


def peak_rss() -> int:
    """Peak resident set size of this process in bytes: VmHWM since the last `reset_peak_rss()`
    (Linux), else the lifetime peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss()


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS (Linux >= 4.0: `5` > /proc/self/clear_refs).

    Building the model peaks well above what it keeps (init temporaries); without the reset
    that peak would hide every arm's difference."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---- statistics ----------------------------------------------------------------------------
@dataclass
class Ratio:
    median: float
    low: float
    high: float
    n: int  # rounds used
    total: int  # rounds measured (quiet ones are used when there are at least two)

    def cell(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}–{self.high:.3f})"


def quiet(round_: dict) -> bool:
    return all(m.foreign <= QUIET for m in round_.values())


def used_rounds(rounds: list[dict]) -> list[dict]:
    """The quiet rounds when there are at least two, else all of them."""
    calm = [r for r in rounds if quiet(r)]
    return calm if len(calm) >= 2 else rounds


def pairwise_ratios(rounds: list[dict], arm: str, baseline: str = BASELINE, measure: str = "seconds") -> Ratio | None:
    """Median (min–max) over rounds of arm/baseline seconds within the same round.

    Rounds in which other processes took more than QUIET of the machine are left out when
    at least two quiet rounds remain (a 2-core machine shared with test runs)."""
    rounds = [r for r in rounds if arm in r and baseline in r]
    used = used_rounds(rounds)
    values = [getattr(r[arm], measure) / getattr(r[baseline], measure) for r in used]
    if not values:
        return None
    return Ratio(statistics.median(values), min(values), max(values), len(values), len(rounds))


def rounds_at(base: int, seq: int) -> int:
    """Rounds at `seq` tokens: twice as many for short (cheap) sequences."""
    return base * 2 if seq <= 512 else base


def rotated(arms, round_index: int):
    """Arm order for one round: rotate so every arm runs in every slot over the rounds."""
    arms = list(arms)
    shift = round_index % len(arms)
    return arms[shift:] + arms[:shift]


# ---- machine -------------------------------------------------------------------------------
def machine_description(threads: int) -> dict[str, str]:
    import pyarrow
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{mem_kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        memory = "?"
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {len(os.sched_getaffinity(0))} cores usable ({os.cpu_count()} online), "
        f"{torch.backends.cpu.get_cpu_capability()}",
        "memory": memory,
        "torch threads": str(threads),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, pyarrow {pyarrow.__version__}, qk-attn {qk_attn.__version__}",
        "commit": git_revision(),
    }
    for name in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if name in os.environ:
            info[name] = os.environ[name]
    if CLEARED_ENV:
        info["cleared"] = ", ".join(CLEARED_ENV)
    return info


def git_revision() -> str:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read-only: no index refresh
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, env=env, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" + uncommitted changes" if dirty else "")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
