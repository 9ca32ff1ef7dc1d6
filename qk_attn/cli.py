"""`qk-sniff`: run a dataset through a model and check what was recorded.

    qk-sniff run [--config FILE] [--set section.key=value ...] [--push]
    qk-sniff inspect OUT          rows, coverage, bucket distribution, plot path
    qk-sniff verify OUT           schema, uniqueness, manifest counts, buckets, exact selection
    qk-sniff push OUT --repo ID [--revision BRANCH] [--private]
    qk-sniff pull --repo ID OUT [--revision BRANCH]
    qk-sniff merge OUT            manifest parts of several ranks -> qk_sniff.json + card

`run` under torchrun / accelerate launch, or with `--shard i/n`, captures the documents of one
rank (qk_attn.distributed); see README "Multi-GPU and multi-node runs".

`run` without `--config` runs the embedded offline demo (SmolLM2-135M over four KJV books,
written to ./qk-sniff-demo/). Exit status: 0 success, 1 `verify` found problems or a
command failed, 2 a configuration or usage error.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

CONFIG_DIR = re.compile(r"l(\d+)h(\d+)([qk])")
MANIFEST = "qk_sniff.json"
INDEX_COLUMNS = ["example_id", "position", "bucket", "layer", "head", "kind"]


# Dataset reading, verify and inspect live in qk_attn.verify (the storage side).
from .verify import Dataset, expected_positions, inspect_dataset, repair_dataset, verify_dataset  # noqa: E402,F401


# ---- commands --------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .demo import DEMO_CONFIG
    from .run_config import RunConfig
    from .runner import format_load_hint, output_files, run

    is_demo = args.config is None
    config = RunConfig.load(args.config, args.set or [], base=DEMO_CONFIG if is_demo else None)
    if is_demo:
        print("qk-sniff: no --config given: running the embedded demo (configs/demo.yaml)", flush=True)
        _quiet_libraries()
    start = time.perf_counter()
    summary = run(config, push_to_hub=args.push, progress=not args.quiet, shard=args.shard)
    print()
    print(f"qk-sniff run finished in {time.perf_counter() - start:.1f} s")
    for line in summary.lines() + output_files(config.output.data_root):
        print("  " + line)
    print()
    if summary.rank and not summary.merged:  # launched ranks: rank 0 merges; --shard jobs: the user does
        from .distributed import detect

        if detect(args.shard).sharded:
            print(f"When every rank has finished: qk-sniff merge {config.output.data_root}")
        return 0
    for line in format_load_hint(config.output.data_root):
        print(line)
    return 0


def cmd_merge(args) -> int:
    from .distributed import merge

    try:
        manifest = merge(args.out, allow_incomplete=args.allow_incomplete)
    except ValueError as error:  # parts that must not be merged: the message says which and why
        print(f"qk-sniff merge: {error}", file=sys.stderr)
        return 1
    ranks = manifest["ranks"]
    print(f"merged {ranks['world_size']} rank(s) into {Path(args.out) / MANIFEST}: {len(manifest['examples'])} examples, "
          f"{sum(manifest['row_counts'].values()):,} rows; card written"
          + (f" (ranks {ranks['incomplete']} incomplete)" if ranks["incomplete"] else ""))
    return 0


def cmd_inspect(args) -> int:
    for line in inspect_dataset(args.out):
        print(line)
    return 0


def cmd_verify(args) -> int:
    problems = verify_dataset(args.out)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.out}")
        for p in problems:
            print("  - " + p)
        return 1
    print(f"OK: {args.out} is consistent (schema, uniqueness, manifest counts, buckets, exact sampler selection)")
    return 0


def cmd_push(args) -> int:
    from . import hub

    hub.push(args.out, args.repo, revision=args.revision, private=args.private)
    print(f"pushed {args.out} to {args.repo}{'@' + args.revision if args.revision else ''}")
    return 0


def cmd_pull(args) -> int:
    from . import hub

    hub.pull(args.repo, args.out, revision=args.revision)
    print(f"pulled {args.repo}{'@' + args.revision if args.revision else ''} into {args.out}")
    return 0


def _quiet_libraries() -> None:
    """The demo's output is the progress bar and the summary, not every library's bars."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qk-sniff",
        description="Record sampled query/key vectors of a transformers model over a dataset.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a dataset through a model and record q/k (no --config: the offline demo)")
    p.add_argument("--config", "-c", help="YAML run configuration (see configs/); omit for the embedded demo")
    p.add_argument("--set", "-s", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set tokenizer.max_length=4096 (repeatable)")
    p.add_argument("--push", action="store_true",
                   help="pull output.hf_repo_id before capture (if it exists) and push the dataset after the run")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--shard", metavar="I/N",
                   help="capture only documents d with d %% N == I (0-based; e.g. $SLURM_ARRAY_TASK_ID/8), "
                        "then run `qk-sniff merge OUT` once all N jobs finished")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("merge", help="merge the manifest parts of a multi-rank / --shard capture; writes the card")
    p.add_argument("out", help="capture output folder")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="merge even if some ranks did not finish their documents (the card counts what is committed)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="rows, coverage, bucket distribution and plot of a capture dataset")
    p.add_argument("out", help="capture output folder")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check a capture dataset against its manifest and the sampler")
    p.add_argument("out", help="capture output folder")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("push", help="upload a capture dataset to the Hugging Face Hub")
    p.add_argument("out", help="capture output folder")
    p.add_argument("--repo", required=True, help="dataset repo id, e.g. org/sniffed-qk")
    p.add_argument("--revision", help="branch (created when missing), e.g. llama-3.1-8b")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="download a capture dataset from the Hub so a run can resume into it")
    p.add_argument("out", help="local folder to fill")
    p.add_argument("--repo", required=True, help="dataset repo id")
    p.add_argument("--revision", help="branch")
    p.set_defaults(func=cmd_pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .demo import DemoUnavailable
    from .hub import HubError
    from .saver import OutputLocked

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"qk-sniff {args.command}: configuration error: {error}", file=sys.stderr)
        return 2
    # Expected failures print their message (a Hub error carries the Hub's own wording);
    # anything else keeps its traceback.
    except (FileNotFoundError, DemoUnavailable, HubError, OutputLocked) as error:
        print(f"qk-sniff {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qk-sniff {args.command}: interrupted; committed examples are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
