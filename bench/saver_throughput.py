"""Throughput of ParquetSink on capture-all-like rows (issue 13): float32 vector payload MB/s into
committed Parquet, time the producer spends inside `put`, and the drain after the last batch.

    .venv/bin/python bench/saver_throughput.py [--gib 1] [--out /tmp/qk-bench] [--commit-every-s S]

Shape: a 12-layer SmolLM2-like model (9 query / 3 key heads, head_dim 64), one 2048-token
document per forward, every token kept (sampler `all`), bf16-valued vectors. Every document's
vectors are distinct (identical ones would compress unrealistically well) and are made before
the clock starts, so the producer costs almost nothing and the number is the sink's; peak RSS
therefore includes the whole payload (see `sink_held_mib` for what the sink itself held).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

from qk_attn.capture.batch import CaptureBatch
from qk_attn.config import SniffConfig
from qk_attn.storage.sink import ParquetSink

LAYERS, QH, KH, DIM, TOKENS = 12, 9, 3, 64, 2048


def batch(layer: int, kind: str, example: int, heads: int) -> CaptureBatch:
    g = torch.Generator().manual_seed((example * LAYERS + layer) * 2 + (kind == "k"))
    return CaptureBatch(
        layer=layer,
        kind=kind,
        heads=tuple(range(heads)),
        example_ids=(example,),
        sliding_window=None,
        cross_attention=False,
        count=torch.tensor(TOKENS),
        row=torch.zeros(TOKENS, dtype=torch.int64),
        position=torch.arange(TOKENS, dtype=torch.int32),
        bucket=torch.arange(TOKENS, dtype=torch.int32) // 1024,
        vectors=torch.randn(heads, TOKENS, DIM, generator=g).to(torch.bfloat16).float(),
        valid=torch.tensor([TOKENS]),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--out", default="/tmp/qk-bench-saver")
    parser.add_argument("--commit-every-s", type=float, default=None, help="sink default when omitted")
    parser.add_argument("--sink", action="append", help="ParquetSink keyword=int, e.g. writer_threads=4")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    config = SniffConfig(output=str(out), sampler="all", min_bucket_size=1024)
    kwargs = {} if args.commit_every_s is None else {"commit_every_s": args.commit_every_s}
    for item in args.sink or []:  # e.g. --sink writer_threads=4 --sink fsync=0
        name, value = item.split("=")
        kwargs[name] = int(value)
    plan = [(layer, kind, QH if kind == "q" else KH) for layer in range(LAYERS) for kind in "qk"]
    per_doc = sum(heads * TOKENS * DIM * 4 for _, _, heads in plan)
    docs = max(1, round(args.gib * (1 << 30) / per_doc))
    batches = [[batch(layer, kind, example, heads) for layer, kind, heads in plan] for example in range(docs)]
    sink = ParquetSink(out, config, **kwargs)
    blocked = 0.0
    cpu_start = time.process_time()
    start = time.perf_counter()
    for example in range(docs):
        for b in batches[example]:
            s = time.perf_counter()
            sink.put(b)
            blocked += time.perf_counter() - s
        if hasattr(sink, "end_forward"):
            s = time.perf_counter()
            sink.end_forward()
            blocked += time.perf_counter() - s
        sink.commit([example])
    last = time.perf_counter()
    sink.flush()  # every document committed: the payload is in committed Parquet
    committed = time.perf_counter()
    sink.close()  # + card and chart
    end = time.perf_counter()
    cpu = time.process_time() - cpu_start  # all threads of this process
    payload = docs * per_doc
    disk = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    shards = len(list(out.rglob("l*/*.parquet")))
    result = {
        "payload_mib": round(payload / 2**20),
        "docs": docs,
        "seconds_to_committed": round(committed - start, 2),
        "mb_per_s": round(payload / 1e6 / (committed - start), 1),
        "producer_blocked_s": round(blocked, 2),
        "drain_after_last_forward_s": round(committed - last, 2),
        "close_card_s": round(end - committed, 2),
        "mb_per_s_with_close": round(payload / 1e6 / (end - start), 1),
        "disk_mib": round(disk / 2**20),
        "shards": shards,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "sink_held_mib": round(sink.max_buffered_bytes / 2**20),
        # CPU seconds the whole pipeline spent (all threads), and the rate two otherwise idle
        # cores would allow if it spread perfectly: a check on numbers taken on a busy machine.
        "cpu_s": round(cpu, 2),
        "mb_per_cpu_s": round(payload / 1e6 / cpu, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
