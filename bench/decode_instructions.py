"""Instructions per decode step, each capture arm against sdpa, counted by valgrind's callgrind.

The decode tables of `make bench` time steps on a shared machine whose CPU speed itself moves by
a third within one run; the 2% targets of issue 20 sit inside that spread. An instruction count
does not move with the machine: the same step runs the same instructions, so the ratio of two
arms' counts is the work capture adds, read to a tenth of a percent. It is not a time: the base
step streams the weights from memory and capture's Python is cache-friendly, so the instruction
ratio overstates the time ratio rather than hiding it.

    .venv/bin/python bench/decode_instructions.py [--steps 8] [--prompt 2048] [--layers 30] [--jobs 1] [--keep DIR]

Per arm, one process under `valgrind --tool=callgrind --instr-atstart=no`: the benchmark's model
(`harness.build_backbone`, one torch thread), a prefill of `--prompt` tokens and three decode steps
run uninstrumented, then `--steps` one-token forwards counted between two callgrind client
requests (a 6-line C helper compiled here with gcc; needs valgrind's headers). Counts are
reported for the whole process (the saver thread included) and for the main thread alone (torch
and capture run there: the in-line cost).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT_REQUESTS = r"""
#include <valgrind/callgrind.h>
void count_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void count_stop(void) { CALLGRIND_DUMP_STATS_AT("decode"); CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _client_requests(folder: Path) -> ctypes.CDLL:
    source, library = folder / "requests.c", folder / "requests.so"
    source.write_text(CLIENT_REQUESTS)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return ctypes.CDLL(str(library))


def child(arm_name: str, steps: int, prompt_len: int, layers: int, folder: Path) -> None:
    """Runs under callgrind: prefill and warm-up uncounted, `steps` decode forwards counted."""
    sys.path.insert(0, str(HERE))
    import harness  # clears QK_SNIFF_* before importing qk_attn
    import torch
    from transformers import DynamicCache

    torch.set_num_threads(1)  # no OpenMP pool spinning between ops: only the work is counted
    requests = _client_requests(folder)
    arm = harness.ARM_BY_NAME[arm_name]
    model = harness.build_backbone(num_hidden_layers=layers)
    harness.use_arm(model, arm)
    (prompt,) = harness.documents(prompt_len, 1)
    (tokens,) = harness.documents(steps + 3, 1, seed=2)
    cache = DynamicCache(config=model.config)
    with harness._session(arm, folder / "out") as session, torch.inference_mode():
        if session is not None:
            session.begin([0])
        model(input_ids=prompt, cache=cache, use_cache=True)
        for step in range(3):  # one-time checks and allocations of the first decode forwards
            model(input_ids=tokens[:, step : step + 1], cache=cache, use_cache=True)
        requests.count_start()
        for step in range(3, steps + 3):
            model(input_ids=tokens[:, step : step + 1], cache=cache, use_cache=True)
        requests.count_stop()


def _instructions(dump: str) -> int:
    """The `summary:` (or `totals:`) Ir of one callgrind output file."""
    text = Path(dump).read_text()
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no instruction total in {dump}")
    return int(match.group(1))


def count(arm_name: str, steps: int, prompt_len: int, layers: int, keep: Path | None = None) -> tuple[int, int]:
    """(process, main thread) instructions per decode step of one arm, from its own valgrind run; with `keep`,
    its dumps are copied to keep/ARM/ (read them per function with `callgrind_annotate`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = folder / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={out}", sys.executable, __file__, "--child", arm_name,
            f"--steps={steps}", f"--prompt={prompt_len}", f"--layers={layers}", f"--folder={folder}",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = sorted(str(p) for p in folder.glob("callgrind.out.*") if _is_decode_dump(p))
        if not dumps:
            raise SystemExit(f"{arm_name}: callgrind wrote no decode dump in {folder}")
        if keep is not None:
            (keep / arm_name).mkdir(parents=True, exist_ok=True)
            for dump in dumps:
                shutil.copy(dump, keep / arm_name)
        per_thread = {dump: _instructions(dump) for dump in dumps}
        main = per_thread[min(dumps, key=lambda d: int(d.rsplit("-", 1)[1]))]  # thread 1: the main thread
        return sum(per_thread.values()) // steps, main // steps


def _is_decode_dump(path: Path) -> bool:
    with path.open() as f:
        return any(line.startswith("desc: Trigger: Client Request: decode") for line in f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--arms", default="sdpa,uniform,log_uniform,all")
    parser.add_argument("--jobs", type=int, default=1, help="arms counted at once (a count does not depend on load)")
    parser.add_argument("--keep", type=Path, help="copy each arm's callgrind dumps to KEEP/ARM/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.steps, args.prompt, args.layers, args.folder)
    arms = args.arms.split(",")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {arm: pool.submit(count, arm, args.steps, args.prompt, args.layers, args.keep) for arm in arms}
        counts = {arm: future.result() for arm, future in futures.items()}
    base_process, base_main = counts["sdpa"]
    print(f"{args.layers} layers, {args.prompt}-token prompt, {args.steps} decode steps counted per arm\n")
    print("| arm | instructions per step (process) | ratio | main thread | ratio |\n|---|---|---|---|---|")
    for arm, (process, main_thread) in counts.items():
        print(
            f"| {arm} | {process:,} | {process / base_process:.4f} | {main_thread:,} | {main_thread / base_main:.4f} |"
        )


if __name__ == "__main__":
    main()
