"""`qk-sniff`: run a dataset through a model and check what was recorded.

    qk-sniff run [--config FILE] [--set section.key=value ...] [--push] [--quiet] [--dry-run] [--shard I/N]
    qk-sniff inspect OUT [--quiet]   rows, coverage, bucket distribution, plot path
    qk-sniff verify OUT [--quiet]    schema, uniqueness, manifest counts, buckets, exact selection
    qk-sniff repair OUT [--quiet]    drop the examples that bad or missing shards touched, so a re-run recaptures them
    qk-sniff push OUT --repo ID [--revision BRANCH] [--private] [--quiet]
    qk-sniff pull --repo ID OUT [--revision BRANCH] [--quiet]
    qk-sniff merge OUT            manifest parts of several ranks -> qk_sniff.json + card

`run` under torchrun / accelerate launch, or with `--shard i/n`, captures the documents of one
rank (qk_attn.run.distributed); see README "Multi-GPU and multi-node runs".

`run` without `--config` runs the embedded offline demo (SmolLM2-135M over four KJV books,
written to ./qk-sniff-demo/).

Progress: `run` shows a bar over documents; `verify`, `inspect`, `repair` and `push` one over
the shards or (layer, head, kind) folders of each pass they make, `push` and `pull` also
huggingface_hub's transfer bars; all on stderr, none with `--quiet`.

Exit status: 0 success; 1 `verify`/`merge` found problems in the data (`repair`: some
remain), or a Hub transfer failed; 2 the command cannot do what it was asked: a configuration or usage error, an output
folder that is locked, incompatible, not writable or full, a dataset that is empty, not UTF-8
or has duplicate ids, a run larger than `capture.max_gb`, a forward the capture refuses (nothing of it
is committed); 130 interrupted, 143 terminated (SIGTERM, handled as Ctrl-C) (qk_attn.errors.EXIT_STATUS
lists each error's status). Every expected
failure is one line on stderr naming the setting, the value and what is allowed; `--debug`
adds the traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from qk_attn.dataset.inspect import inspect_dataset
from qk_attn.dataset.repair import repair_dataset
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import EXIT_STATUS, Terminated, one_line
from qk_attn.run.command import cmd_run, quiet_libraries
from qk_attn.run.source import encode_source
from qk_attn.storage.layout import MANIFEST


# ---- commands (`run` is qk_attn.run.command: it is the run layer's own) ------------------------
def cmd_merge(args) -> int:
    from qk_attn.run.distributed import merge

    try:
        manifest = merge(args.out, allow_incomplete=args.allow_incomplete)
    except ValueError as error:  # parts that must not be merged: the message says which and why
        print(f"qk-sniff merge: {error}", file=sys.stderr)
        return 1
    ranks = manifest["ranks"]
    print(
        f"merged {ranks['world_size']} rank(s) into {Path(args.out) / MANIFEST}: {len(manifest['examples'])} examples, "
        f"{sum(manifest['row_counts'].values()):,} rows; card written"
        + (f" (ranks {ranks['incomplete']} incomplete)" if ranks["incomplete"] else "")
    )
    return 0


def cmd_inspect(args) -> int:
    lines = inspect_dataset(args.out, progress=not args.quiet)
    for line in lines if args.full else shorten(lines):
        print(line)
    return 0


def shorten(lines: list[str], keep: int = 10, slack: int = 4) -> list[str]:
    """A summary that stays short for sparse captures: each block of more than `keep + slack`
    indented continuation lines (coverage gaps, buckets) keeps its first `keep - 2` and last 2
    lines, and says how many it left out."""
    out: list[str] = []
    block: list[str] = []

    def close() -> None:
        if len(block) <= keep + slack:
            out.extend(block)
        else:
            indent = block[0][: len(block[0]) - len(block[0].lstrip())]
            out.extend(block[: keep - 2])
            out.append(
                f"{indent}... {len(block) - keep} more lines (qk-sniff inspect --full; the card's Coverage "
                "and Buckets sections list them all)"
            )
            out.extend(block[-2:])
        block.clear()

    for line in lines:
        if line.startswith(" "):
            block.append(line)
            continue
        close()
        out.append(line)
    close()
    return out


def cmd_verify(args) -> int:
    if args.quiet:  # (reading the source for the token check would show datasets' own bars)
        quiet_libraries()
    problems = verify_dataset(args.out, encode_source=encode_source, progress=not args.quiet)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.out}")
        for p in problems:
            print("  - " + p)
        return 1
    print(f"OK: {args.out} is consistent (schema, uniqueness, manifest counts, buckets, exact sampler selection)")
    return 0


def cmd_repair(args) -> int:
    # repair_dataset prints what it dropped and returns the exit status: 0 when OUT is sound
    # afterwards (re-running the capture fills in what was dropped), 1 when problems remain.
    if args.quiet:
        quiet_libraries()
    return int(repair_dataset(args.out, log=print, encode_source=encode_source, progress=not args.quiet))


def cmd_push(args) -> int:
    from qk_attn.dataset import hub

    hub.push(args.out, args.repo, revision=args.revision, private=args.private, progress=not args.quiet)
    print(f"pushed {args.out} to {args.repo}{'@' + args.revision if args.revision else ''}")
    return 0


def cmd_pull(args) -> int:
    from qk_attn.dataset import hub

    hub.pull(args.repo, args.out, revision=args.revision, progress=not args.quiet)
    print(f"pulled {args.repo}{'@' + args.revision if args.revision else ''} into {args.out}")
    return 0


def _folder_argument(value: str) -> str:
    """OUT of a subcommand: an empty string would be read as the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path names no folder")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qk-sniff",
        description="Record sampled query/key vectors of a transformers model over a dataset.",
        epilog="exit status: 0 success; 1 verify/merge found problems (repair: some remain), or a Hub transfer "
        "failed; 2 a configuration, "
        "usage, output-folder, dataset or disk problem (one line on stderr; --debug for the traceback); "
        "130 interrupted; 143 terminated (SIGTERM, handled as Ctrl-C)",
    )
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --debug leaves `qk-sniff --debug run ...` as it was
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[common])  # every command takes --debug

    def quiet(p: argparse.ArgumentParser, bars: str = "no progress bars") -> None:
        p.add_argument("--quiet", "-q", action="store_true", help=bars)

    p = add("run", help="run a dataset through a model and record q/k (no --config: the offline demo)")
    p.add_argument("--config", "-c", help="YAML run configuration (see configs/); omit for the embedded demo")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set tokenizer.max_length=4096 (repeatable)",
    )
    p.add_argument(
        "--push",
        action="store_true",
        help="pull output.hf_repo_id before capture (if it exists) and push the dataset after the run",
    )
    quiet(p, "no progress bars (ours and the libraries')")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="make every check and print the estimate, then stop: no weights loaded, nothing written",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="capture only documents d with d %% N == I (0-based; e.g. $SLURM_ARRAY_TASK_ID/8), "
        "then run `qk-sniff merge OUT` once all N jobs finished",
    )
    p.set_defaults(func=cmd_run)

    p = add("merge", help="merge the manifest parts of a multi-rank / --shard capture; writes the card")
    p.add_argument("out", type=_folder_argument, help="capture output folder")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="merge even if some ranks did not finish their documents (the card counts what is committed)",
    )
    p.set_defaults(func=cmd_merge)

    p = add("inspect", help="rows, coverage, bucket distribution and plot of a capture dataset")
    p.add_argument("out", type=_folder_argument, help="capture output folder")
    p.add_argument("--full", action="store_true", help="every coverage and bucket line, however many")
    quiet(p)
    p.set_defaults(func=cmd_inspect)

    p = add("verify", help="check a capture dataset against its manifest and the sampler")
    p.add_argument("out", type=_folder_argument, help="capture output folder")
    quiet(p)
    p.set_defaults(func=cmd_verify)

    p = add(
        "repair",
        help="drop the examples that bad or missing shards touched from the manifest, "
        "so that re-running the same command captures exactly them again",
    )
    p.add_argument("out", type=_folder_argument, help="capture output folder")
    quiet(p)
    p.set_defaults(func=cmd_repair)

    p = add("push", help="upload a capture dataset to the Hugging Face Hub")
    p.add_argument("out", type=_folder_argument, help="capture output folder")
    p.add_argument("--repo", required=True, help="dataset repo id, e.g. org/sniffed-qk")
    p.add_argument("--revision", help="branch (created when missing), e.g. llama-3.1-8b")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    quiet(p, "no progress bars (ours and huggingface_hub's)")
    p.set_defaults(func=cmd_push)

    p = add("pull", help="download a capture dataset from the Hub so a run can resume into it")
    p.add_argument("out", type=_folder_argument, help="local folder to fill")
    p.add_argument("--repo", required=True, help="dataset repo id")
    p.add_argument("--revision", help="branch")
    quiet(p, "no progress bars (huggingface_hub's)")
    p.set_defaults(func=cmd_pull)
    return parser


class _SaverFailureFilter(logging.Filter):
    """The saver logs its failure in its own thread; the CLI prints the error it raises instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("qk-sniff saver failed")


TRACEBACK_HINT = " (--debug shows the traceback)"
OOM_HINT = "; lower tokenizer.max_length or inference.batch_size, or use model.device_map: auto"


def _exit_status(error: BaseException) -> tuple[int, str] | None:
    """(exit status, hint after the message) of an expected error, from `qk_attn.errors.EXIT_STATUS`
    (the first match wins); None: the error keeps its traceback. Errors whose message is the whole
    story get no hint."""
    out_of_memory = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)  # a RuntimeError
    if out_of_memory is not None and isinstance(error, out_of_memory):
        return 2, OOM_HINT + TRACEBACK_HINT
    for kind, status, traceback_hint in EXIT_STATUS:
        if isinstance(error, kind):
            return None if status is None else (status, TRACEBACK_HINT if traceback_hint else "")
    return None


def _disk_full(error: BaseException | None) -> bool:
    """ENOSPC / EDQUOT anywhere in the error's chain (the saver wraps the OSError it met)."""
    import errno

    seen = 0
    while error is not None and seen < 16:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):  # pyarrow's IOError text
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _raise_terminated(signum, _frame) -> None:
    raise Terminated(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    saver_log, quiet = logging.getLogger("qk_attn.storage.saver"), _SaverFailureFilter()
    if not args.debug:
        saver_log.addFilter(quiet)
    # SIGTERM ends a run as Ctrl-C does (the default would kill it with its folder unclosed); a handler
    # of the caller's own is kept. Signal handlers can only be set from the main thread.
    terminate = threading.current_thread() is threading.main_thread()
    terminate = terminate and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if terminate:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except KeyboardInterrupt as interrupt:
        how = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(
            f"qk-sniff {args.command}: {how}; committed examples are kept, re-run the same command to resume",
            file=sys.stderr,
        )
        return 143 if isinstance(interrupt, Terminated) else 130
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as a shell's SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would raise again)
        return 141
    except Exception as error:  # noqa: BLE001 - sorted into expected (one line) and unexpected (traceback)
        match = _exit_status(error)
        if match is None:
            raise
        status, hint = match
        if _disk_full(error):
            hint = "; free space on the output's disk (or choose another output.data_root) before re-running" + hint
        if args.debug:
            import traceback

            traceback.print_exc()
            hint = hint.replace(TRACEBACK_HINT, "")
        message = one_line(error)
        if hint.startswith(";"):  # (a message that ends its own sentence takes the hint without a second stop)
            message = message.removesuffix(".")
        print(f"qk-sniff {args.command}: {message}{hint}", file=sys.stderr)
        return status
    finally:
        saver_log.removeFilter(quiet)
        if terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
