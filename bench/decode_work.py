"""The Python work qk-attn's own code does per decode step: bytecodes executed and functions entered in
qk_attn's files, counted with sys.settrace. A count, not a time: it does not move with the load of a
shared machine, so it shows what a change to the decode path saves where the wall-time ratios
(`make bench`, a few percent of noise) cannot.

    .venv/bin/python bench/decode_work.py [--steps 20] [--layers 30]

Per arm: one session writing a Parquet folder, a 256-token prompt, then `--steps` one-token forwards
counted (after three uncounted ones). The backbone has the benchmark's layer count and tiny widths:
the count does not depend on them, and the run takes seconds.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path


def count_decode_work(arm, steps: int, layers: int) -> collections.Counter:
    import harness  # clears QK_SNIFF_* before importing qk_attn
    import torch
    from transformers import DynamicCache

    import qk_attn

    root = str(Path(qk_attn.__file__).parent)
    counts: collections.Counter = collections.Counter()

    def in_frame(frame, event, arg):
        if event == "opcode":
            counts["bytecodes"] += 1
        return in_frame

    def on_call(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(root):
            return None
        counts["calls"] += 1
        frame.f_trace_opcodes = True
        return in_frame

    model = harness.build_backbone(
        num_hidden_layers=layers, hidden_size=64, intermediate_size=64, num_attention_heads=8, num_key_value_heads=4,
        head_dim=8, vocab_size=1000,
    )  # fmt: skip
    model.set_attn_implementation(arm.attn)
    prompt = torch.randint(0, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
    token = prompt[:, -1:]
    with tempfile.TemporaryDirectory() as out, torch.inference_mode():
        with qk_attn.session(output=out, **arm.settings):
            cache = DynamicCache(config=model.config)
            model(prompt, past_key_values=cache, use_cache=True)
            for _ in range(3):  # first decode forwards: one-time checks and allocations
                model(token, past_key_values=cache, use_cache=True)
            sys.settrace(on_call)
            try:
                for _ in range(steps):
                    model(token, past_key_values=cache, use_cache=True)
            finally:
                sys.settrace(None)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness

    print("| arm | bytecodes per decode step | calls per decode step | per attention layer |\n|---|---|---|---|")
    for arm in (arm for arm in harness.ARMS if arm.captures):
        counts = count_decode_work(arm, args.steps, args.layers)
        bytecodes, calls = counts["bytecodes"] / args.steps, counts["calls"] / args.steps
        print(f"| {arm.name} | {bytecodes:,.0f} | {calls:,.0f} | {bytecodes / args.layers:,.0f} bytecodes |")


if __name__ == "__main__":
    main()
