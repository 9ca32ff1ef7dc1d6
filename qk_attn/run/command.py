"""`qk-sniff run`: what the command does with its parsed arguments and what it prints.

The embedded demo when `--config` is missing, `--dry-run` (every check, then stop), the run
itself, then its summary and how to load or merge what it wrote. The parser and the mapping of
errors onto exit statuses stay in `qk_attn.cli`; the run's steps are in `runner` and `prepare`.
"""

from __future__ import annotations

import time
from pathlib import Path

from qk_attn.errors import ConfigError


def cmd_run(args) -> int:
    from qk_attn.demo import DEMO_CONFIG
    from qk_attn.run.config import RunConfig
    from qk_attn.run.runner import run
    from qk_attn.run.summary import format_load_hint, output_files

    is_demo = args.config is None
    if not is_demo:
        _check_config_file(args.config)
    else:
        _refuse_other_sources_in_the_demo(args.set or [])
    config = RunConfig.load(args.config, args.set or [], base=DEMO_CONFIG if is_demo else None)
    if is_demo:
        print("qk-sniff: no --config given: running the embedded demo (configs/demo.yaml)", flush=True)
    if is_demo or args.quiet:
        quiet_libraries()
    if args.dry_run:
        from qk_attn.run.prepare import check
        from qk_attn.run.runner import check_push

        if args.push:
            check_push(config)
        check(config, shard=args.shard)
        print(
            f"qk-sniff run --dry-run: every check passed; no weights loaded, nothing written to "
            f"{config.output.data_root}"
        )
        return 0
    start = time.perf_counter()
    summary = run(config, push_to_hub=args.push, progress=not args.quiet, shard=args.shard)
    print()
    print(f"qk-sniff run finished in {time.perf_counter() - start:.1f} s")
    for line in summary.lines() + output_files(config.output.data_root):
        print("  " + line)
    print()
    if summary.rank and not summary.merged:  # launched ranks: rank 0 merges; --shard jobs: the user does
        from qk_attn.run.distributed import detect

        if detect(args.shard).sharded:
            print(f"When every rank has finished: qk-sniff merge {config.output.data_root}")
        return 0
    for line in format_load_hint(config.output.data_root):
        print(line)
    return 0


# What --set may not change without --config: the demo's other settings (4 documents, its sampler, ids, lengths)
# would silently apply to another dataset or model.
DEMO_SOURCES = ("dataset.path", "dataset.name", "dataset.data_files", "model.name")


def _refuse_other_sources_in_the_demo(overrides: list[str]) -> None:
    changed = [item.split("=", 1)[0].strip() for item in overrides if "=" in item]
    other = next((key for key in changed if key in DEMO_SOURCES), None)
    if other is not None:
        raise ConfigError(
            f"--set {other}=... without --config runs the embedded demo on another source, keeping the demo's other "
            "settings (dataset.max_samples: 4, its sampler, id column and lengths); write a run configuration "
            "(configs/demo.yaml is one to copy) and pass it with --config"
        )


def _check_config_file(path: str) -> None:
    """What reading `--config` would otherwise word without naming the file: a folder, or bytes
    that are not UTF-8 (the file, the byte and its offset)."""
    file = Path(path).expanduser()
    if not path.strip():
        raise ConfigError("--config '' names no file; give the YAML run configuration file (e.g. configs/demo.yaml)")
    if file.is_dir():
        raise ConfigError(
            f"--config {path!r} is a folder; give the YAML run configuration file (e.g. configs/demo.yaml)"
        )
    try:
        data = file.read_bytes()
    except OSError:
        return  # missing or unreadable: RunConfig.load says so
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"--config {path!r}: {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            f"convert it, e.g. `iconv -f latin1 -t utf-8 {path} > run.utf8.yaml`"
        ) from None


def quiet_libraries() -> None:
    """The demo's output is our progress bar and the summary, not every library's bars (--quiet: no bars at all)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
