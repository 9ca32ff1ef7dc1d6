"""How much of a capture's end-to-end overhead is writing Parquet (issue 20).

    .venv/bin/python bench/encode_share.py [--arm all] [--rounds 4] [--long]

Runs the short capture of `test_short_capture` (4 x 1024 tokens, 12 layers; --long: the 30-layer
backbone, 4 x 2048 tokens) side by side with sdpa in every round (order rotated), three ways:

    parquet      the real session
    unencoded    the same session, but each shard's rows are not encoded or written: the writer
                 puts a placeholder file where the shard would be (everything else, including the
                 saver, the host pool, the commits and fsyncs, runs as usual)
    memory       an in-memory session (no saver thread)

A diagnostic, not a mode of the tool: the placeholder dataset is not readable. The difference
between `parquet` and `unencoded` is what encoding, hashing and writing the shards cost the run
(on a 2-core machine it competes with the model for the second core).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import harness  # first: clears QK_SNIFF_* before qk_attn is imported
import torch

from qk_attn.storage import saver, shards


def unencoded_shard(folder, name, key, buffer, index, segments, *_):
    """`write_buffer` without the shard: a 1-byte placeholder, and the rows counted as written."""
    folder.mkdir(exist_ok=True)
    (folder / f".{name}.tmp").write_bytes(b"\0")
    rows = buffer.key_buffer(index)
    return shards.Written(key, name, rows.rows, 1, "0" * 64, rows.buckets(), sorted(segments))


def run_way(way: str, model, arm, docs, out: Path, drains: dict) -> float:
    """Seconds of one end-to-end run of `way` (sdpa: the same forwards without capture)."""
    if way in ("sdpa", "memory"):
        return harness.run_end_to_end(model, harness.ARM_BY_NAME["sdpa"] if way == "sdpa" else arm, docs, None).seconds
    write_buffer = saver.write_buffer
    saver.write_buffer = unencoded_shard if way == "unencoded" else write_buffer
    try:
        run = harness.run_end_to_end(model, arm, docs, out)
    finally:
        saver.write_buffer = write_buffer
    shutil.rmtree(out)
    drains[way].append(run.drain)
    return run.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", default="all", choices=[a.name for a in harness.END_TO_END_ARMS if a.captures])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--long", action="store_true", help="30 layers, 4 x 2048 tokens (test_end_to_end)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the benchmark's setting: the second core is the saver's
    if args.long:
        model, docs = harness.build_backbone(), harness.documents(harness.TARGET_SEQ, 4)
    else:
        model = harness.build_lm(num_hidden_layers=harness.SHORT_LAYERS).model
        docs = harness.documents(harness.SHORT_CAPTURE_SEQ, harness.SHORT_CAPTURE_DOCS)
    arm = harness.ARM_BY_NAME[args.arm]
    ratios: dict[str, list[float]] = {"parquet": [], "unencoded": [], "memory": []}
    drains: dict[str, list[float]] = {"parquet": [], "unencoded": []}
    with tempfile.TemporaryDirectory(prefix="qk-encode-share-") as tmp:
        root = Path(tmp)
        harness.run_end_to_end(model, arm, harness.documents(128, 2), root / "warm-up")
        for index in range(args.rounds):
            seconds = {}
            for way in harness.rotated(("sdpa", "parquet", "unencoded", "memory"), index):
                seconds[way] = run_way(way, model, arm, docs, root / f"{way}-{index}", drains)
            for way in ratios:
                ratios[way].append(seconds[way] / seconds["sdpa"])
            print(f"round {index + 1}: " + ", ".join(f"{w} {r[-1]:.3f}" for w, r in ratios.items()), flush=True)
    print(f"\n{args.arm}, {len(docs)} x {docs[0].shape[1]} tokens, ratio to sdpa in the same round (median, range):\n")
    print("| session | end to end / sdpa | drain at close |\n|---|---|---|")
    for way, values in ratios.items():
        drain = f"{statistics.median(drains[way]):.2f} s" if way in drains else "—"
        print(f"| {way} | {statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f}) | {drain} |")


if __name__ == "__main__":
    main()
