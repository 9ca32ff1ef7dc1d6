"""How long after `commit()` a committed document is durable (listed in OUT/qk_sniff.json on
disk), with the sink's defaults (fsync on): the bound a SIGKILL can lose besides documents in flight.

    .venv/bin/python bench/durability.py [--docs 12] [--dense]

Each document: its batches are put, `end_forward`, `commit`; then the next document's rows start
arriving while it "runs" for `--forward-s` (its examples are in flight, so the open segment is not
complete: the committed one must still become durable on time). A thread polls the manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import threading
import time
from pathlib import Path

from saver_throughput import KH, LAYERS, QH, batch

from qk_attn.capture.batch import CaptureBatch
from qk_attn.config import SniffConfig
from qk_attn.storage.sink import ParquetSink


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=12)
    parser.add_argument("--forward-s", type=float, default=3.0, help="time each document's forward takes")
    parser.add_argument("--dense", action="store_true", help="2048 tokens x every head of 12 layers per document")
    parser.add_argument("--out", default="/tmp/qk-bench-durability")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    sink = ParquetSink(out, SniffConfig(output=str(out), sampler="all", min_bucket_size=1024))
    templates = [batch(layer, kind, 0, QH if kind == "q" else KH) for layer in range(LAYERS) for kind in "qk"]
    if not args.dense:  # a sampled capture: a few rows per call
        templates = [CaptureBatch(**{**t.__dict__, "count": t.count.new_tensor(16)}) for t in templates]
    committed_at: dict[int, float] = {}
    durable_at: dict[int, float] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                listed = json.loads((out / "qk_sniff.json").read_text())["examples"]
            except (OSError, ValueError):
                listed = {}
            now = time.monotonic()
            for e in map(int, listed):
                durable_at.setdefault(e, now)
            time.sleep(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    for doc in range(args.docs):
        for t in templates[: len(templates) // 2]:  # the first half of the forward
            sink.put(CaptureBatch(**{**t.__dict__, "example_ids": (doc,)}))
        time.sleep(args.forward_s)
        for t in templates[len(templates) // 2 :]:
            sink.put(CaptureBatch(**{**t.__dict__, "example_ids": (doc,)}))
        sink.end_forward()
        sink.commit([doc])
        committed_at[doc] = time.monotonic()
    time.sleep(sink.commit_every_s + 2)
    stop.set()
    watcher.join()
    sink.close()
    lags = [durable_at[d] - committed_at[d] for d in range(args.docs) if d in durable_at]
    print(
        json.dumps(
            {
                "dense": args.dense,
                "docs": args.docs,
                "forward_s": args.forward_s,
                "commit_every_s": sink.commit_every_s,
                "durable": len(lags),
                "lag_median_s": round(statistics.median(lags), 2),
                "lag_max_s": round(max(lags), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
