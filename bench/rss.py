"""Peak RSS of one benchmark arm, measured in a fresh process (one process per arm).

    .venv/bin/python bench/rss.py --arm all --seq 2048 --docs 4 --threads 2

prints one JSON object: RSS after building the model, then the peak RSS (restarted after
the model is built, see `harness.reset_peak_rss`) after each document and at the end, plus
bytes and rows written. The process runs the arm's end-to-end loop
(begin -> forward -> commit per document into a ParquetSink in a temporary directory).
`measure_all` runs every arm this way, one after another.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A fixed glibc mmap threshold: large blocks are mapped and unmapped, never kept by the heap,
# so the peak is memory actually held. With glibc's dynamic threshold, two identical sdpa
# processes peaked 40-50 MB apart (1101 vs 1140 MB), more than the +2% target.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", required=True)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    import harness  # clears QK_SNIFF_* before importing qk_attn
    import torch

    torch.set_num_threads(args.threads)
    arm = harness.ARM_BY_NAME[args.arm]
    model = harness.build_backbone()
    docs = harness.documents(args.seq, args.docs)
    gc.collect()
    after_model = harness.current_rss()
    reset = harness.reset_peak_rss()
    with tempfile.TemporaryDirectory(prefix="qk-bench-rss-") as tmp:
        out_dir = Path(tmp) / "out"
        result = harness.run_end_to_end(model, arm, docs, out_dir)
    print(
        json.dumps(
            {
                "arm": arm.name,
                "seq": args.seq,
                "docs": args.docs,
                "threads": args.threads,
                "mode": "parquet",
                "rss_after_model": after_model,
                "peak_reset": reset,
                "peak_rss_after_doc": result.peak_rss_after_doc,
                "peak_rss": harness.peak_rss(),
                "bytes_written": result.bytes_written,
                "rows": result.rows,
                "seconds": result.seconds,
            }
        )
    )


def measure(arm: str, seq: int, docs: int, threads: int) -> dict:
    """Run `main` for one arm in a child process and return its JSON."""
    command = [
        sys.executable,
        str(HERE / "rss.py"),
        "--arm",
        arm,
        "--seq",
        str(seq),
        "--docs",
        str(docs),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE, env=dict(os.environ, **MALLOC_ENV))
    if done.returncode != 0:
        raise RuntimeError(f"rss.py --arm {arm} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_all(arms, seq: int, docs: int, threads: int, parallel: int = 1) -> dict[str, dict]:
    """One process per arm, `parallel` at a time (peak RSS does not depend on CPU contention)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        results = list(pool.map(lambda arm: measure(arm, seq, docs, threads), arms))
    return dict(zip(arms, results))


if __name__ == "__main__":
    main()
