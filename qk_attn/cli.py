"""`qk-sniff`: run a dataset through a model and check what was recorded.

    qk-sniff run [--config FILE] [--set section.key=value ...] [--push] [--dry-run]
    qk-sniff inspect OUT          rows, coverage, bucket distribution, plot path
    qk-sniff verify OUT           schema, uniqueness, manifest counts, buckets, exact selection
    qk-sniff repair OUT           drop the examples that bad or missing shards touched, so a re-run recaptures them
    qk-sniff push OUT --repo ID [--revision BRANCH] [--private]
    qk-sniff pull --repo ID OUT [--revision BRANCH]
    qk-sniff merge OUT            manifest parts of several ranks -> qk_sniff.json + card

`run` under torchrun / accelerate launch, or with `--shard i/n`, captures the documents of one
rank (qk_attn.distributed); see README "Multi-GPU and multi-node runs".

`run` without `--config` runs the embedded offline demo (SmolLM2-135M over four KJV books,
written to ./qk-sniff-demo/).

Exit status: 0 success; 1 `verify`/`merge` found problems in the data (`repair`: some
remain), or a Hub transfer failed; 2 the command cannot do what it was asked: a configuration or usage error, an output
folder that is locked, incompatible, not writable or full, a dataset that is empty, not UTF-8
or has duplicate ids, a run larger than `capture.max_gb`; 130 interrupted. Every expected
failure is one line on stderr naming the setting, the value and what is allowed; `--debug`
adds the traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
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


# ---- reading a capture dataset ---------------------------------------------------------------
@dataclass
class Dataset:
    """A capture output folder as `inspect` and `verify` read it (vectors are never loaded).

    Only shards the manifest lists are committed (qk_attn.saver); `folders` holds every
    (layer, head, kind) that the manifest or the disk knows of.
    """

    root: Path
    manifest: dict
    folders: dict[tuple[int, int, str], Path]  # (layer, head, kind) -> folder

    @classmethod
    def open(cls, root: str | Path) -> "Dataset":
        from .saver import parse_key, read_manifest

        root = Path(root)
        manifest = read_manifest(root) if root.is_dir() else None
        if manifest is None:
            raise FileNotFoundError(f"{root} is not a qk-sniff dataset: {MANIFEST} is missing")
        names = set(manifest.get("shards", {}))
        names |= {p.name for p in root.iterdir() if p.is_dir() and parse_key(p.name)}
        folders = {parse_key(name): root / name for name in sorted(names)}
        return cls(root, manifest, folders)

    def sampler(self):
        from .sampler import Sampler

        s = self.manifest["sampler"]
        return Sampler(s["sampler"], int(s["min_bucket_size"]), float(s["base_rate"]), int(s["seed"]))

    def committed(self) -> dict[int, int]:
        """example_id -> valid length (tokens) of every committed example."""
        return {int(k): int(v) for k, v in self.manifest.get("examples", {}).items()}

    def row_counts(self) -> dict[str, int]:
        """Folder name (e.g. "l00h00q") -> committed rows, as the manifest records them."""
        return {str(k): int(v) for k, v in self.manifest.get("row_counts", {}).items()}

    def plan(self) -> dict[tuple[int, str], tuple[int, ...]] | None:
        """(layer, kind) -> heads the capture was asked to record (None before any call ran)."""
        plan = self.manifest.get("plan")
        if not plan:
            return None
        out = {}
        for kind, key in (("q", "query_heads"), ("k", "key_heads")):
            for layer, heads in plan.get(key, {}).items():
                if heads:
                    out[(int(layer), kind)] = tuple(int(h) for h in heads)
        return out

    def files(self, key: tuple[int, int, str]) -> list[Path]:
        """The committed shards of one folder (listed in the manifest)."""
        folder = self.folders[key]
        return [folder / name for name in self.manifest.get("shards", {}).get(folder.name, [])]

    def stray_files(self, key: tuple[int, int, str]) -> list[Path]:
        """Parquet files in a folder that the manifest does not list (a glob reader would read them)."""
        listed = set(self.files(key))
        folder = self.folders[key]
        return sorted(p for p in folder.glob("*.parquet") if p not in listed) if folder.is_dir() else []

    def index(self, key: tuple[int, int, str]):
        """The non-vector columns of one folder's committed shards, as one Arrow table (or None)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = [f for f in self.files(key) if f.is_file()]
        if not files:
            return None
        return pa.concat_tables(pq.read_table(f, columns=INDEX_COLUMNS) for f in files)

    def plot_paths(self) -> list[Path]:
        from .card import CHART

        return [self.root / CHART] if (self.root / CHART).is_file() else []


# ---- verify ----------------------------------------------------------------------------------
def expected_positions(sampler, layer: int, kind: str, lengths: dict[int, int], chunk: int = 1 << 22):
    """example_id -> the positions the sampler selects in [0, valid length), vectorised over
    examples (at most `chunk` candidate positions at a time)."""
    import numpy as np
    import torch

    out: dict[int, np.ndarray] = {}
    items = sorted(lengths.items(), key=lambda kv: kv[1])
    i = 0
    while i < len(items):
        longest = max(items[i][1], 1)
        n = max(1, min(len(items) - i, chunk // longest))
        group = items[i : i + n]
        longest = max(length for _, length in group)
        ids = torch.tensor([e for e, _ in group], dtype=torch.int64)
        positions = torch.arange(longest, dtype=torch.int64).expand(len(group), -1)
        keep = sampler.keep(ids, layer, kind, positions)
        keep &= positions < torch.tensor([length for _, length in group])[:, None]
        for row, (example, _) in enumerate(group):
            out[example] = positions[row][keep[row]].numpy()
        i += n
    return out


def verify_dataset(root: str | Path, log=print) -> list[str]:
    """Every check of `qk-sniff verify`; returns the problems found (empty: the dataset is sound)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from .rows import arrow_schema

    data = Dataset.open(root)
    problems: list[str] = []
    sampler = data.sampler()
    committed = data.committed()
    manifest_counts = data.row_counts()
    plan = data.plan()
    seen_counts: dict[str, int] = {}
    # (layer, kind) -> {folder name: {example_id: sorted positions}}
    selections: dict[tuple[int, str], dict[str, dict[int, Any]]] = defaultdict(dict)

    for key, folder in data.folders.items():
        layer, head, kind = key
        name = folder.name
        files = data.files(key)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            problems.append(f"{name}: {len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
        stray = data.stray_files(key)
        if stray:
            problems.append(f"{name}: {len(stray)} Parquet file(s) not listed in the manifest (a glob reader such as "
                            f"datasets.load_dataset would read them), e.g. {stray[0].name}")
        for f in (f for f in files if f.is_file()):
            schema = pq.read_schema(f)
            dim = schema.field("vector").type.list_size if "vector" in schema.names else -1
            vector_type = schema.field("vector").type.value_type if dim > 0 else None
            want = arrow_schema(dim, vector_type) if dim > 0 else None
            base = [schema.field(n) for n in schema.names if n not in ("token_id", "token_str")]
            if want is None or [(f_.name, f_.type) for f_ in base] != [(w.name, w.type) for w in want]:
                problems.append(f"{f.relative_to(data.root)}: schema {schema.to_string(show_schema_metadata=False)!r} "
                                f"differs from the dataset schema")
        table = data.index(key)
        rows = 0 if table is None else table.num_rows
        seen_counts[name] = rows
        if table is None:
            continue
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in INDEX_COLUMNS}
        for column, value in (("layer", layer), ("head", head), ("kind", kind)):
            if not (cols[column] == value).all():
                problems.append(f"{name}: rows with {column} != {value!r}")
        ids = cols["example_id"].astype(np.int64)
        pos = cols["position"].astype(np.int64)
        bucket = cols["bucket"].astype(np.int64)
        want_bucket = sampler.bucket_of(torch.from_numpy(pos)).numpy()
        bad = np.flatnonzero(want_bucket != bucket)
        if bad.size:
            i = bad[0]
            problems.append(f"{name}: {bad.size} rows have a bucket inconsistent with their position "
                            f"(e.g. position {pos[i]} in bucket {bucket[i]}, expected {want_bucket[i]})")
        order = np.lexsort((pos, ids))
        ids, pos = ids[order], pos[order]
        dup = np.flatnonzero((ids[1:] == ids[:-1]) & (pos[1:] == pos[:-1]))
        if dup.size:
            problems.append(f"{name}: {dup.size} duplicate (example, position) rows, e.g. example {ids[dup[0]]} "
                            f"position {pos[dup[0]]}")
        uncommitted = set(np.unique(ids).tolist()) - set(committed)
        if uncommitted:
            problems.append(f"{name}: rows of {len(uncommitted)} example(s) the manifest does not list as committed, "
                            f"e.g. {sorted(uncommitted)[:3]}")
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        selections[(layer, kind)][name] = {int(ids[s]): pos[s:e] for s, e in zip(starts, ends)}

    # Row counts: the manifest against the files (both directions).
    for name in sorted(set(manifest_counts) | set(seen_counts)):
        if manifest_counts.get(name, 0) != seen_counts.get(name, 0):
            problems.append(f"{name}: the manifest records {manifest_counts.get(name, 0)} rows, the files hold "
                            f"{seen_counts.get(name, 0)}")

    # Exact selection: for each committed example, every recorded (layer, head, kind) holds
    # exactly the sampler's positions for that example's valid length. Planned heads with no
    # folder at all must then have selected nothing.
    # A planned head that received attention calls but has no folder selected nothing (possible
    # at low rates); one without calls never ran (e.g. a sliding-window layer skipped by
    # full_attention_only) and is the card's coverage business, not an error here.
    calls = data.manifest.get("calls", {})
    expected_keys = set(data.folders)
    if plan is not None:
        expected_keys |= {(layer, head, kind) for (layer, kind), heads in plan.items() for head in heads
                          if calls.get(f"l{layer:02d}h{head:02d}{kind}", 0) > 0}
    pairs = sorted({(layer, kind) for layer, _, kind in expected_keys})
    for layer, kind in pairs:
        want = expected_positions(sampler, layer, kind, committed)
        heads = sorted(h for (lay, h, k) in expected_keys if lay == layer and k == kind)
        for head in heads:
            name = f"l{layer:02d}h{head:02d}{kind}"
            got = selections.get((layer, kind), {}).get(name, {})
            wrong = [e for e, positions in want.items() if not np.array_equal(got.get(e, np.empty(0, np.int64)), positions)]
            if wrong:
                e = wrong[0]
                problems.append(
                    f"{name}: {len(wrong)} example(s) whose positions differ from the sampler's selection, e.g. example "
                    f"{e} (valid length {committed[e]}): recorded {len(got.get(e, []))} positions, expected {len(want[e])}"
                )
    log(f"checked {len(data.folders)} (layer, head, kind) folders, {sum(seen_counts.values()):,} rows, "
        f"{len(committed)} committed examples")
    return problems


# ---- inspect ---------------------------------------------------------------------------------
def inspect_dataset(root: str | Path) -> list[str]:
    """Rows, coverage, bucket distribution and plot path, as printable lines (from the files;
    coverage reasons from the manifest, as the card states them)."""
    import numpy as np

    from .card import coverage

    data = Dataset.open(root)
    sampler = data.sampler()
    committed = data.committed()
    config = data.manifest.get("config", {})
    model = data.manifest.get("model") or {}
    rows: dict[str, Counter] = {"q": Counter(), "k": Counter()}  # kind -> bucket -> rows
    heads: dict[str, set] = {"q": set(), "k": set()}
    for key in data.folders:
        table = data.index(key)
        if table is None or table.num_rows == 0:
            continue
        values, counts = np.unique(table.column("bucket").to_numpy(), return_counts=True)
        rows[key[2]].update(dict(zip(values.tolist(), counts.tolist())))
        heads[key[2]].add(key[:2])
    total = {kind: sum(c.values()) for kind, c in rows.items()}
    lines = [
        f"dataset    {data.root}",
        f"model      {model.get('id')}  ({model.get('model_type')}, {model.get('dtype')})",
        f"sampler    {sampler.strategy}, min_bucket_size {sampler.min_bucket_size}, base_rate {sampler.base_rate:g}, "
        f"seed {sampler.seed}; {config.get('rope', 'post')}-RoPE; captured {config.get('capture')}",
        f"examples   {len(committed)} committed, {sum(committed.values()):,} valid tokens, "
        f"longest {max(committed.values(), default=0):,}",
        f"rows       {total['q'] + total['k']:,}: q {total['q']:,}, k {total['k']:,}",
    ]
    plan = data.manifest.get("plan")
    if plan:
        layers = plan["num_layers"]
        lines.append(f"coverage   q: {len(heads['q'])} (layer, head) pairs with rows of {layers} layers x {plan['num_heads']} "
                     f"query heads; k: {len(heads['k'])} of {layers} x {plan['num_kv_heads']} key heads")
        for line in coverage(data.manifest).get("missing", []):
            lines.append(f"           {line}")
    lines.append("buckets    bucket  positions              q rows      k rows   q per example-head")
    n_examples = max(1, len(committed))
    for b in sorted(set(rows["q"]) | set(rows["k"])):
        start = sampler.bucket_start(b)
        span = f"[{start:,}, {start + sampler.bucket_size(b):,})"
        per = rows["q"][b] / n_examples / max(1, len(heads["q"]))
        lines.append(f"           {b:>6}  {span:<20} {rows['q'][b]:>10,}  {rows['k'][b]:>10,}   {per:10.2f}")
    plots = data.plot_paths()
    lines.append(f"plot       {plots[0] if plots else '(none: the card is written when a capture closes)'}")
    if data.folders:
        layer, head, kind = min((k for k in data.folders if data.files(k)), key=lambda k: (k[0], k[1], k[2] == "k"),
                                default=(0, 0, "q"))
        lines.append(f"load       qk_attn.load({str(data.root)!r}, layer={layer}, head={head}, kind={kind!r})")
    return lines


# ---- commands --------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .demo import DEMO_CONFIG
    from .run_config import RunConfig
    from .runner import format_load_hint, output_files, run

    is_demo = args.config is None
    config = RunConfig.load(args.config, args.set or [], base=DEMO_CONFIG if is_demo else None)
    if is_demo:
        print("qk-sniff: no --config given: running the embedded demo (configs/demo.yaml)", flush=True)
    if is_demo or args.quiet:
        _quiet_libraries()
    if args.dry_run:
        from .runner import check

        check(config, shard=args.shard)
        print(f"qk-sniff run --dry-run: every check passed; no weights loaded, nothing written to "
              f"{config.output.data_root}")
        return 0
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


def _verify_module():
    """verify_dataset / inspect_dataset / repair_dataset: qk_attn.verify when present, else here."""
    try:
        from . import verify

        return verify
    except ImportError:
        return sys.modules[__name__]


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
    lines = _verify_module().inspect_dataset(args.out)
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
            out.append(f"{indent}... {len(block) - keep} more lines (qk-sniff inspect --full; the card's Coverage "
                       "and Buckets sections list them all)")
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
    problems = _verify_module().verify_dataset(args.out)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.out}")
        for p in problems:
            print("  - " + p)
        return 1
    print(f"OK: {args.out} is consistent (schema, uniqueness, manifest counts, buckets, exact sampler selection)")
    return 0


def cmd_repair(args) -> int:
    try:
        from .verify import repair_dataset
    except ImportError:
        raise CommandError("this installation of qk-attn has no qk_attn.verify.repair_dataset; update qk-attn "
                           "(repair needs the shard checksums written by newer versions)") from None
    # repair_dataset prints what it dropped and returns the exit status: 0 when OUT is sound
    # afterwards (re-running the capture fills in what was dropped), 1 when problems remain.
    return int(repair_dataset(args.out, log=print))


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
    """The demo's output is our progress bar and the summary, not every library's bars (--quiet: no bars at all)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qk-sniff",
        description="Record sampled query/key vectors of a transformers model over a dataset.",
        epilog="exit status: 0 success; 1 verify/merge found problems (repair: some remain), or a Hub transfer "
               "failed; 2 a configuration, "
               "usage, output-folder, dataset or disk problem (one line on stderr; --debug for the traceback); "
               "130 interrupted",
    )
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --debug leaves `qk-sniff --debug run ...` as it was
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[common])  # every command takes --debug

    p = add("run", help="run a dataset through a model and record q/k (no --config: the offline demo)")
    p.add_argument("--config", "-c", help="YAML run configuration (see configs/); omit for the embedded demo")
    p.add_argument("--set", "-s", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set tokenizer.max_length=4096 (repeatable)")
    p.add_argument("--push", action="store_true",
                   help="pull output.hf_repo_id before capture (if it exists) and push the dataset after the run")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (ours and the libraries')")
    p.add_argument("--dry-run", action="store_true",
                   help="make every check and print the estimate, then stop: no weights loaded, nothing written")
    p.add_argument("--shard", metavar="I/N",
                   help="capture only documents d with d %% N == I (0-based; e.g. $SLURM_ARRAY_TASK_ID/8), "
                        "then run `qk-sniff merge OUT` once all N jobs finished")
    p.set_defaults(func=cmd_run)

    p = add("merge", help="merge the manifest parts of a multi-rank / --shard capture; writes the card")
    p.add_argument("out", help="capture output folder")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="merge even if some ranks did not finish their documents (the card counts what is committed)")
    p.set_defaults(func=cmd_merge)

    p = add("inspect", help="rows, coverage, bucket distribution and plot of a capture dataset")
    p.add_argument("out", help="capture output folder")
    p.add_argument("--full", action="store_true", help="every coverage and bucket line, however many")
    p.set_defaults(func=cmd_inspect)

    p = add("verify", help="check a capture dataset against its manifest and the sampler")
    p.add_argument("out", help="capture output folder")
    p.set_defaults(func=cmd_verify)

    p = add("repair", help="drop the examples that bad or missing shards touched from the manifest, "
                                      "so that re-running the same command captures exactly them again")
    p.add_argument("out", help="capture output folder")
    p.set_defaults(func=cmd_repair)

    p = add("push", help="upload a capture dataset to the Hugging Face Hub")
    p.add_argument("out", help="capture output folder")
    p.add_argument("--repo", required=True, help="dataset repo id, e.g. org/sniffed-qk")
    p.add_argument("--revision", help="branch (created when missing), e.g. llama-3.1-8b")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.set_defaults(func=cmd_push)

    p = add("pull", help="download a capture dataset from the Hub so a run can resume into it")
    p.add_argument("out", help="local folder to fill")
    p.add_argument("--repo", required=True, help="dataset repo id")
    p.add_argument("--revision", help="branch")
    p.set_defaults(func=cmd_pull)
    return parser


class CommandError(RuntimeError):
    """A command cannot run as asked (exit 2); the message is the whole story."""


class _SaverFailureFilter(logging.Filter):
    """The saver logs its failure in its own thread; the CLI prints the error it raises instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("qk-sniff saver failed")


TRACEBACK_HINT = " (--debug shows the traceback)"
OOM_HINT = "; lower tokenizer.max_length or inference.batch_size, or use model.device_map: auto"


def _expected_errors() -> list[tuple[tuple[type[BaseException], ...], int, str]]:
    """(exception types, exit status, hint after the message); the first match wins, and
    anything else keeps its traceback. Errors whose message is the whole story get no hint."""
    from .config import ConfigError
    from .demo import DemoUnavailable
    from .hub import HubError
    from .saver import OutputLocked, SaverError

    from . import saver

    storage = getattr(saver, "StorageError", ConfigError)  # one-line storage failures (ValueError)
    out_of_memory = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)  # a RuntimeError
    return [
        ((ConfigError, CommandError, DemoUnavailable, FileNotFoundError, storage), 2, ""),
        ((OutputLocked, SaverError), 2, TRACEBACK_HINT),
        *([((out_of_memory,), 2, OOM_HINT + TRACEBACK_HINT)] if out_of_memory is not None else []),
        ((HubError,), 1, ""),
        ((OSError, ValueError), 2, TRACEBACK_HINT),  # a full or unwritable disk, a folder that is not a capture, ...
    ]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    saver_log, quiet = logging.getLogger("qk_attn.saver"), _SaverFailureFilter()
    if not args.debug:
        saver_log.addFilter(quiet)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"qk-sniff {args.command}: interrupted; committed examples are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into expected (one line) and unexpected (traceback)
        match = next(((status, hint) for types, status, hint in _expected_errors() if isinstance(error, types)), None)
        if match is None:
            raise
        status, hint = match
        if _disk_full(error):
            hint = "; free space on the output's disk (or choose another output.data_root) before re-running" + hint
        if args.debug:
            import traceback

            traceback.print_exc()
            hint = hint.replace(TRACEBACK_HINT, "")
        print(f"qk-sniff {args.command}: {_one_line(error)}{hint}", file=sys.stderr)
        return status
    finally:
        saver_log.removeFilter(quiet)


if __name__ == "__main__":
    sys.exit(main())
