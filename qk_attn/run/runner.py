"""`qk-sniff run`: config -> checks -> documents -> tokenizer -> model backbone -> capture -> dataset.

    checks      before any weight loads (qk_attn.run.preflight): the model's config against the
                head filters, the output folder, the dataset (UTF-8, rows, unique ids), the
                estimated size of the run (qk_attn.run.estimate) against capture.max_gb
    documents   datasets.load_dataset (Hub id, local jsonl/json/parquet/csv/txt, folder),
                ids normalised to int64, texts truncated to tokenizer.max_length
    model       AutoModelForCausalLM with attn_implementation="qk_sniff"; only the backbone
                (`model.base_model`) runs, so no logits over 128k positions are materialised
    capture     one qk_attn.session() for the whole run; each batch: describe(ids) ->
                begin(ids) -> forward -> commit(); examples committed by an earlier run are
                skipped (resume); an unpadded batch passes input_ids only
    ranks       under torchrun / accelerate launch / --shard i/n each rank runs its documents
                (qk_attn.run.distributed) into its own files; rank 0 merges after a barrier
    hub         with --push: pull the remote dataset first (if it exists), push at the end

Progress: one bar over documents with tokens/s and rows written; a summary at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from qk_attn.errors import ConfigError
from qk_attn.run.config import DatasetSection, RunConfig

logger = logging.getLogger(__name__)

# Local file suffix -> `datasets` packaged builder.
LOCAL_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LATER_SOURCE_KEYS = ("weights",)  # source keys that captures made by earlier versions lack


# ---- example ids ---------------------------------------------------------------------------
def normalize_id(value: Any) -> int:
    """A dataset's id -> the int64 `example_id` of the capture dataset.

    Integers in int64 range pass through unchanged. Anything else (strings, floats, bools,
    out-of-range integers) is hashed: the first 8 bytes of blake2b over its UTF-8 text,
    read big-endian as a signed int64 — stable across runs, machines and Python versions:

        int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "big", signed=True)
    """
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX:
        return value
    data = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


@dataclass
class Document:
    example_id: int  # int64, what the capture dataset records
    source_id: Any  # the dataset's own id (or the row index)
    text: str
    index: int = 0  # row index in the dataset
    has_id: bool = False  # source_id came from dataset.id_column (not the row index)


# ---- documents ----------------------------------------------------------------------------
def _local_builder(path: str) -> str | None:
    """The packaged builder for a local file or glob, None for a folder or a Hub id."""
    expanded = os.path.expanduser(path)
    is_glob = any(ch in expanded for ch in "*?[")
    if not (is_glob or os.path.isfile(expanded)):
        return None
    name = expanded.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix, builder in LOCAL_BUILDERS.items():
        if name.endswith(suffix):
            return builder
    raise ConfigError(
        f"dataset.path={path!r}: unsupported file type; use one of {', '.join(LOCAL_BUILDERS)} "
        "(or a folder, or a Hub dataset id)"
    )


def load_rows(cfg: DatasetSection):
    """The dataset as `datasets` gives it (map-style, or iterable when streaming).

    Local text files are checked first (empty, not UTF-8), and the builder's own failures on
    them become one `ConfigError` naming `dataset.path`.
    """
    from qk_attn.run.preflight import check_hub, check_local_files

    path = _resolved_path(cfg)
    if _local_builder(path) is not None:
        check_local_files(dataclasses.replace(cfg, path=path))
    elif not os.path.isdir(os.path.expanduser(path)):
        check_hub(f"dataset.path={cfg.path!r}", "dataset")
    try:
        return _load_rows(cfg, path)
    except ConfigError:
        raise
    except StopIteration:  # datasets' json builder on a file without rows
        raise ConfigError(f"dataset.path={cfg.path!r} has no rows") from None
    except (ValueError, OSError, *_dataset_errors()) as error:  # ValueError: also UnicodeDecodeError
        if "corresponds to no data" in str(error):  # the split of a file with a header and no rows
            raise ConfigError(f"dataset.path={cfg.path!r} has no rows (split {cfg.split!r})") from None
        cause = error  # datasets wraps a builder's failure (e.g. a decoding error): name the original
        while isinstance(error, _dataset_errors()) and (cause.__cause__ or cause.__context__) is not None:
            cause = cause.__cause__ or cause.__context__
        raise ConfigError(f"dataset.path={cfg.path!r} cannot be read: {type(cause).__name__}: "
                          f"{' '.join(str(cause).split())}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _dataset_errors() -> tuple[type[BaseException], ...]:
    try:
        from datasets.exceptions import DatasetGenerationError
    except ImportError:  # older datasets
        return ()
    return (DatasetGenerationError,)


def _resolved_path(cfg: DatasetSection) -> str:
    from qk_attn.demo import resolve_dataset

    return resolve_dataset(cfg.path)


def _load_rows(cfg: DatasetSection, path: str):
    import datasets

    builder = _local_builder(path)
    kwargs: dict[str, Any] = {"split": cfg.split, "streaming": cfg.streaming}
    if builder is not None:
        # Name the file's split after `dataset.split`, so `split: test` works on a local file.
        kwargs["data_files"] = {re.split(r"[\[+]", cfg.split)[0]: os.path.expanduser(path)}
        if builder == "text":
            kwargs["sample_by"] = cfg.sample_by
        return datasets.load_dataset(builder, **kwargs)
    if cfg.name is not None:
        kwargs["name"] = cfg.name
    if cfg.data_files is not None:
        kwargs["data_files"] = cfg.data_files
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    return datasets.load_dataset(path, **kwargs)


def _map_style(rows) -> bool:
    try:
        len(rows)
    except TypeError:  # streaming (IterableDataset)
        return False
    return True


def count_documents(rows, cfg: DatasetSection) -> int | None:
    try:
        total = len(rows)
    except TypeError:  # streaming
        return cfg.max_samples
    return total if cfg.max_samples is None else min(total, cfg.max_samples)


def iter_documents(rows, cfg: DatasetSection) -> Iterator[Document]:
    """Documents in dataset order, at most `max_samples`; ids normalised; duplicates refused."""
    columns = getattr(rows, "column_names", None)
    if columns is not None:
        for column in (cfg.text_column, cfg.id_column):
            if column is not None and column not in columns:
                raise ConfigError(f"dataset column {column!r} does not exist; the dataset has {', '.join(columns)}")
    seen: dict[int, Any] = {}
    for index, row in enumerate(rows):
        if cfg.max_samples is not None and index >= cfg.max_samples:
            break
        if cfg.text_column not in row:
            raise ConfigError(f"dataset.text_column={cfg.text_column!r} is not in row {index} (columns: {', '.join(row)})")
        if cfg.id_column is not None and cfg.id_column not in row:
            raise ConfigError(f"dataset.id_column={cfg.id_column!r} is not in row {index} (columns: {', '.join(row)})")
        source_id = index if cfg.id_column is None else row[cfg.id_column]
        example_id = normalize_id(source_id)
        if example_id in seen:
            raise ConfigError(
                f"dataset.id_column={cfg.id_column!r}: row {index}: id {source_id!r} gives example_id {example_id}, "
                f"already used by id {seen[example_id]!r}; example ids must be unique (choose a unique column, or leave "
                "dataset.id_column unset to use row numbers)"
            )
        seen[example_id] = source_id
        text = row[cfg.text_column]
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"dataset.text_column={cfg.text_column!r}: row {index} holds a {type(text).__name__}, "
                              "expected text")
        yield Document(example_id, source_id, text or "", index, cfg.id_column is not None)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- model and tokenizer ------------------------------------------------------------------
def _merge(current: Any, new: Any) -> Any:
    if isinstance(current, dict) and isinstance(new, dict):
        return {**current, **{k: _merge(current.get(k), v) for k, v in new.items()}}
    return new


def load_model_config(config: RunConfig, name: str):
    """AutoConfig with `model.config_overrides` merged in (mappings merge key by key, so
    `rope_parameters: {rope_type: yarn, factor: 4}` keeps the model's rope_theta)."""
    from transformers import AutoConfig

    cfg = config.model
    local = cfg.name.startswith(("/", "./", "../", "~")) or os.path.isabs(cfg.name)
    if local and not Path(os.path.expanduser(cfg.name)).exists():
        raise ConfigError(f"model.name={cfg.name!r} does not exist: no such folder (a Hub id looks like org/name)")
    if not Path(os.path.expanduser(name)).exists():
        from qk_attn.run.preflight import check_hub

        check_hub(f"model.name={cfg.name!r}", "model")
    try:
        model_config = AutoConfig.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:  # not found, no network, not a transformers model
        raise ConfigError(f"model.name={cfg.name!r} cannot be loaded: {_one_line(error)}") from error
    if not cfg.config_overrides:
        return model_config
    values = model_config.to_dict()
    for key, value in cfg.config_overrides.items():
        if key not in values and not hasattr(model_config, key):
            raise ConfigError(
                f"model.config_overrides.{key}: {type(model_config).__name__} has no setting {key!r} "
                "(check the spelling against the model's config.json)"
            )
        values[key] = _merge(values.get(key), value)
    return type(model_config).from_dict(values)


def default_device(cfg) -> str:
    import torch

    if cfg.device:
        return cfg.device
    if not torch.cuda.is_available():
        return "cpu"
    if "LOCAL_RANK" in os.environ:  # one GPU per process of a launched job (torchrun / accelerate)
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return "cuda"


def load_model(config: RunConfig, name: str, model_config=None):
    """The CausalLM with "qk_sniff" attention (flash attention wrapped under its own name), in eval
    mode, placed on its device(s)."""
    import torch
    from transformers import AutoModelForCausalLM

    import qk_attn  # registers "qk_sniff"

    attention = "qk_sniff"
    if config.inference.backend == "flash_attention_2":
        # Flash is recorded under its own name: transformers takes flash-only branches by name.
        qk_attn.wrap_flash_attention()
        attention = "flash_attention_2"
    cfg = config.model
    kwargs: dict[str, Any] = {
        "config": model_config if model_config is not None else load_model_config(config, name),
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "attn_implementation": attention,
        "dtype": "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype),
    }
    if cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if cfg.device_map is None:
        model.to(default_device(cfg))
    return model.eval()


def backbone(model):
    """The decoder without its LM head: hidden states only, never (B, T, vocab) logits."""
    base = model.base_model
    if base is model:
        logger.warning("%s has no separate backbone; running the whole model", type(model).__name__)
    return base


def load_tokenizer(config: RunConfig, name: str):
    from transformers import AutoTokenizer

    from qk_attn.run.preflight import check_hub

    key = "tokenizer.name" if config.tokenizer.name else "model.name"
    if not Path(os.path.expanduser(name)).exists():
        check_hub(f"{key}={config.tokenizer_name!r}", "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=config.tokenizer_revision, trust_remote_code=config.model.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}={config.tokenizer_name!r}: no tokenizer can be loaded: {_one_line(error)}") from error
    tokenizer.padding_side = config.tokenizer.padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def resolve_max_length(config: RunConfig, model_config, tokenizer) -> int:
    """tokenizer.max_length, else the model's max positions (and the tokenizer's, if finite)."""
    if config.tokenizer.max_length is not None:
        return config.tokenizer.max_length
    from qk_attn.run.preflight import model_positions

    limits = [model_positions(model_config), getattr(tokenizer, "model_max_length", None)]
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 10**9]
    if not limits:
        raise ConfigError("tokenizer.max_length is not set and the model declares no maximum length; set it")
    return min(limits)


def encode(tokenizer, documents: list[Document], max_length: int, add_special_tokens: bool, device) -> tuple[dict, list[int]]:
    """The model inputs of one batch, truncated to `max_length`, and each row's valid length.

    A batch without padding (one document, or rows of equal length) passes `input_ids` only:
    the model derives positions 0..T-1 itself, and an all-ones `attention_mask` would only
    make transformers inspect it on the host every forward (a device sync on GPU). A padded
    batch also gets the mask and RoPE positions that count valid tokens only (0, 1, 2, ...
    from each row's first real token), so left and right padding give every example the
    same positions as running it alone. Lengths are read from the host tensor, before any
    copy to the device.
    """
    enc = tokenizer(
        [d.text for d in documents],
        truncation=True,
        max_length=max_length,
        padding=len(documents) > 1,
        add_special_tokens=add_special_tokens,
        return_tensors="pt",
        return_attention_mask=True,
    )
    mask = enc["attention_mask"]
    lengths = mask.sum(-1).tolist()
    batch = {"input_ids": enc["input_ids"].to(device)}
    if any(n != mask.shape[-1] for n in lengths):
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        batch["attention_mask"] = mask.to(device)
        batch["position_ids"] = positions.to(device)
    return batch, lengths


# ---- the run --------------------------------------------------------------------------------
@dataclass
class RunSummary:
    output: str
    model: str
    dataset: str
    max_length: int = 0
    documents: int = 0  # processed in this run
    resumed: int = 0  # skipped: committed by an earlier run
    empty: int = 0  # skipped: no tokens
    tokens: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    pulled: bool = False
    pushed: str | None = None
    rank: str | None = None  # "rank 1 of 4" when several processes capture
    merged: bool = False  # this process merged the ranks' manifests and wrote the card
    ids: dict[int, Any] = field(default_factory=dict)  # example_id -> dataset id (this run)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"model      {self.model}",
            f"dataset    {self.dataset}",
            f"documents  {self.documents} captured, {self.resumed} already committed (resumed), {self.empty} empty",
            f"tokens     {self.tokens:,} (max_length {self.max_length:,}) in {self.seconds:.1f} s "
            f"= {self.tokens_per_second:,.0f} tokens/s",
            f"rows       {self.rows_written:,} written",
            f"output     {self.output}",
        ]
        if self.rank:
            out.append(f"ranks      {self.rank}; " + ("merged the manifest parts and wrote the card" if self.merged else
                                                     "the card is written when the parts are merged"))
        if self.ids and any(source != example for example, source in self.ids.items()):
            shown = ", ".join(f"{source!r} -> {example}" for example, source in list(self.ids.items())[:4])
            out.append(f"ids        {shown}{', ...' if len(self.ids) > 4 else ''}")
        if self.pulled:
            out.append("hub        pulled the existing remote dataset before capture")
        if self.pushed:
            out.append(f"hub        pushed to {self.pushed}")
        return out


def source_info(config: RunConfig, max_length: int) -> dict[str, Any]:
    """What the dataset card and manifest record about where the text came from."""
    from qk_attn.demo import DEMO_DATASET, DEMO_DATASET_DESCRIPTION, DEMO_MODEL, weights_provenance

    d = config.dataset
    return {
        "dataset": d.path,
        "dataset_name": d.name,
        "split": d.split,
        "dataset_revision": d.revision,
        "text_column": d.text_column,
        "id_column": d.id_column,
        "max_samples": d.max_samples,
        "model": config.model.name,
        "model_revision": config.model.revision,
        "dtype": config.model.dtype,
        "config_overrides": config.model.config_overrides or None,
        "tokenizer": config.tokenizer_name,
        "tokenizer_revision": config.tokenizer_revision,
        "add_special_tokens": config.tokenizer.add_special_tokens,
        "sample_by": d.sample_by,
        "max_length": max_length,
        "padding_side": config.tokenizer.padding_side,
        "batch_size": config.inference.batch_size,
        **({"description": DEMO_DATASET_DESCRIPTION} if d.path == DEMO_DATASET else {}),
        **({"weights": weights_provenance()} if config.model.name == DEMO_MODEL else {}),
    }


def _compatible(source: dict[str, Any], config: RunConfig, rank) -> dict[str, Any]:
    """`source` without the keys that a capture already in the output folder was made without
    (added by later versions, e.g. `weights`): such a capture keeps resuming."""
    from qk_attn.storage.saver import Files, read_manifest

    root = Path(os.path.expanduser(config.output.data_root))
    if config.output.overwrite or not root.is_dir():
        return source
    files = Files() if rank.is_single else Files(*rank.sink_rank())
    try:
        old = (read_manifest(root, files.manifest) or {}).get("source")
    except ValueError:  # unreadable: the output checks say so
        return source
    if not old:
        return source
    return {k: v for k, v in source.items() if k in old or k not in LATER_SOURCE_KEYS}


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="doc", desc="qk-sniff", disable=not enabled, dynamic_ncols=True)


def pull_if_remote(config: RunConfig) -> bool:
    """Before capture: fetch the remote dataset (if it exists) so the run resumes into it."""
    from qk_attn.dataset import hub

    out = config.output
    return bool(hub.pull(out.hf_repo_id, out.data_root, revision=out.hf_branch, missing_ok=True))


def push(config: RunConfig) -> str:
    from qk_attn.dataset import hub

    out = config.output
    hub.push(out.data_root, out.hf_repo_id, revision=out.hf_branch, private=out.private)
    return out.hf_repo_id + (f"@{out.hf_branch}" if out.hf_branch else "")


def run(config: RunConfig, *, push_to_hub: bool = False, progress: bool = True, sink=None,
        shard: str | None = None, log=print) -> RunSummary:
    """Run every document of the dataset through the model once, capturing into the output.

    Under a launcher (RANK/WORLD_SIZE) or with `shard="i/n"` this process runs only its own
    documents into its own files; launched ranks meet at a barrier and rank 0 merges.
    """
    from qk_attn.run import distributed

    rank = distributed.detect(shard)
    if push_to_hub and not rank.is_single:
        raise ConfigError("--push runs in one process only: after a multi-rank capture run `qk-sniff merge OUT` "
                          "(torchrun / accelerate launch do it at the end) and then `qk-sniff push OUT --repo ID`")
    with distributed.process_group(rank):
        summary = _run(config, rank, push_to_hub, progress, sink, log)
        if not rank.is_single:
            summary.rank = f"rank {rank.rank} of {rank.world_size}"
            distributed.barrier(rank)  # every rank has closed its sink: its manifest part is final
            if rank.launched and not rank.sharded and rank.rank == 0 and sink is None:
                distributed.merge(config.output.data_root)
                summary.merged = True
    return summary


def check(config: RunConfig, *, shard: str | None = None, log=print) -> "Preflight":
    """Every check `run` makes before the weights load, and the estimate; loads no weights and
    writes nothing (`qk-sniff run --dry-run`)."""
    from qk_attn.run import distributed
    from qk_attn.demo import resolve_model

    rank = distributed.detect(shard)
    return preflight(config, resolve_model(config.model.name), resolve_model(config.tokenizer_name), rank, None, log)


@dataclass
class Preflight:
    """What the checks before loading weights established (see qk_attn.run.preflight)."""

    model_config: Any
    tokenizer: Any
    max_length: int
    plan: Any  # HeadPlan from the model's config
    estimate: Any  # qk_attn.run.estimate.Estimate, None when the lengths are unknown (streaming)
    rows: Any  # the dataset (map-style or iterable)
    total: int | None  # documents to go through
    source: dict


def preflight(config: RunConfig, model_name: str, tokenizer_name: str, rank, sink, log=print) -> Preflight:
    """Everything that can be checked before the weights load (qk_attn.run.preflight), in order of
    cost: the model's config, the output folder, the dataset, the size of the run."""
    from qk_attn.run import preflight as checks
    from qk_attn.demo import DEMO_MODEL, DEMO_MODEL_ID
    from qk_attn.run.estimate import estimate
    from qk_attn.sampler import Sampler

    sniff = config.sniff_config()
    if sniff.backend == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("inference.backend='flash_attention_2' needs the flash-attn package "
                              "(pip install 'qk-attn[flash]', CUDA only); use sdpa or eager")
    model_config = load_model_config(config, model_name)
    model_label = config.model.name if config.model.name != DEMO_MODEL else DEMO_MODEL_ID
    kind = getattr(model_config, "model_type", None) or type(model_config).__name__
    checks.check_decoder(model_config, f"model.name={config.model.name!r}", kind)
    try:
        shape = checks.model_shape(model_config)
    except (AttributeError, TypeError, ValueError) as error:  # a config without the usual attention fields
        shape = plan = None
        log(f"qk-sniff: cannot read the attention shape from {model_label}'s config ({type(error).__name__}: "
            f"{_one_line(error)}); the layer and head checks and the size estimate are skipped")
    else:
        raw = {name: getattr(config.capture, name) for name in ("layers", "heads", "key_heads")}
        plan = checks.check_plan(sniff, shape, config.yaml_key, raw, f"{model_label} ({kind})")
        pairs = sum(len(heads) for heads in plan.query_heads.values())
        if sniff.head_sample_count is not None and "q" in sniff.kinds and sniff.head_sample_count > pairs:
            log(f"qk-sniff: capture.head_sampling.count={sniff.head_sample_count} is more than the {pairs} (layer, query "
                "head) pairs the filters leave: all of them are recorded")

    tokenizer = load_tokenizer(config, tokenizer_name)
    max_length = resolve_max_length(config, model_config, tokenizer)
    source = _compatible(source_info(config, max_length), config, rank)
    disk = None  # the folder whose free space bounds the run (None: not writing to disk)
    if sink is None:
        model = {"id": model_label if config.model.name == DEMO_MODEL else model_name,
                 "revision": getattr(model_config, "_commit_hash", None)}
        disk = checks.check_output(config.output.data_root, sniff, source,
                                    overwrite=config.output.overwrite, model=model, shape=shape,
                                    rank=None if rank.is_single else rank.sink_rank())

    rows = load_rows(config.dataset)
    total = count_documents(rows, config.dataset)
    if total == 0:
        raise ConfigError(f"dataset.path={config.dataset.path!r} (split {config.dataset.split!r}) has no rows")
    lengths = None
    positions = checks.model_positions(model_config)
    if _map_style(rows):  # ids and lengths of every document, before the model loads
        lengths, longest, truncated = _document_lengths(rows, total, config, tokenizer, max_length, rank, sink is None)
        checks.check_positions(max_length, positions, longest, model_label, streaming=False)
        if truncated:
            log(f"qk-sniff: {truncated} of {len(lengths)} document(s) have more than tokenizer.max_length={max_length:,} "
                "tokens and are truncated to it")
    else:
        checks.check_positions(max_length, positions, None, model_label, streaming=True)
    if lengths is None and plan is not None:  # streaming: only an upper bound, documents cut at max_length
        from qk_attn.run.estimate import format_bytes

        upper = estimate(plan, Sampler.from_config(sniff), [max_length], sniff.vector_dtype)
        count = f"{config.dataset.max_samples:,} document(s)" if config.dataset.max_samples else "each document"
        n = config.dataset.max_samples or 1
        log(f"qk-sniff: estimate: streaming dataset, lengths unknown before the run: at most {upper.rows * n:,.0f} rows, "
            f"{format_bytes(upper.bytes * n)} uncompressed for {count} of at most {max_length:,} tokens")
    est = None
    if lengths is not None and plan is not None:
        est = estimate(plan, Sampler.from_config(sniff), lengths, sniff.vector_dtype)
        for line in format_estimate(est):
            log(line)
        if disk is not None and est.documents:
            limit, how = checks.size_limit(config.capture.max_gb, disk)
            if est.bytes > limit:
                raise ConfigError(refusal(est, limit, how))
    return Preflight(model_config, tokenizer, max_length, plan, est, rows, total, source)


def _document_lengths(rows, total, config, tokenizer, max_length, rank,
                      check_output: bool) -> tuple[list[int], tuple[Any, int] | None, int]:
    """Valid lengths (tokens, cut at max_length) of the documents this run will capture, the
    longest as (source id, tokens), and how many are longer than max_length; checks ids and texts
    first. Documents an earlier run committed (resume) and other ranks' documents are left out.
    """
    from qk_attn.run import preflight as checks
    from qk_attn.storage.saver import Files, read_manifest

    cfg = config.dataset
    head = rows.select(range(total)) if total < len(rows) else rows
    for column in (cfg.text_column, cfg.id_column):
        if column is not None and column not in head.column_names:
            which = "text_column" if column == cfg.text_column else "id_column"
            raise ConfigError(f"dataset.{which}={column!r} does not exist; the dataset has {', '.join(head.column_names)}")
    ids = head[cfg.id_column] if cfg.id_column is not None else range(total)
    if cfg.id_column is not None:
        checks.check_ids(ids, normalize_id, cfg.id_column)
    committed: set[int] = set()
    root = Path(os.path.expanduser(config.output.data_root))
    if check_output and root.is_dir() and not config.output.overwrite:
        files = Files() if rank.is_single else Files(*rank.sink_rank())
        committed = {int(k) for k in (read_manifest(root, files.manifest) or {}).get("examples", {})}
    todo = [i for i, value in enumerate(ids) if rank.owns(i) and normalize_id(value) not in committed]
    lengths: list[int] = []
    longest, truncated = None, 0
    step = 16  # documents tokenized at once: 16 x 128k token ids as Python lists is ~70 MB
    for at in range(0, len(todo), step):
        part = todo[at : at + step]
        texts = head.select(part)[cfg.text_column]
        for index, text in zip(part, texts):
            if text is not None and not isinstance(text, str):
                raise ConfigError(f"dataset.text_column={cfg.text_column!r}: row {index} holds a "
                                  f"{type(text).__name__}, expected text")
        enc = tokenizer([t or "" for t in texts], truncation=True, max_length=max_length + 1,  # +1: was it cut?
                        add_special_tokens=config.tokenizer.add_special_tokens)
        for index, tokens in zip(part, enc["input_ids"]):
            truncated += len(tokens) > max_length
            lengths.append(min(len(tokens), max_length))
            if longest is None or lengths[-1] > longest[1]:
                longest = (ids[index], lengths[-1])
    return lengths, longest, truncated


def format_estimate(est) -> list[str]:
    """The estimate as printed before a run."""
    from qk_attn.run.estimate import format_bytes

    if not est.documents:
        return ["qk-sniff: estimate: nothing to capture (every document is already committed)"]
    spread = (f"{est.rows_per_document:,.0f}" if round(est.min_rows) == round(est.max_rows) else
              f"{est.min_rows:,.0f} to {est.max_rows:,.0f} (mean {est.rows_per_document:,.0f})")
    return [f"qk-sniff: estimate: {est.documents:,} document(s) x {spread} rows = {est.rows:,.0f} rows, "
            f"{format_bytes(est.bytes)} uncompressed ({est.row_bytes} bytes per row; "
            f"{format_bytes(est.bytes_per_document)} per document)"]


def refusal(est, limit: float, how: str) -> str:
    from qk_attn.run.estimate import format_bytes

    return (f"capture.max_gb: this run would write about {format_bytes(est.bytes)} ({est.rows:,.0f} rows of "
            f"{est.row_bytes} bytes, uncompressed, {est.documents:,} document(s)), more than the limit of "
            f"{format_bytes(limit)} ({how}); record less with capture.layers, capture.heads or "
            "capture.head_sampling, a sparser capture.sampler (uniform with a larger min_bucket_size, or a smaller "
            "base_rate), capture.vector_dtype: float16, tokenizer.max_length or dataset.max_samples, or raise "
            "capture.max_gb")


def _run(config: RunConfig, rank, push_to_hub: bool, progress: bool, sink, log=print) -> RunSummary:
    import qk_attn

    from qk_attn.demo import DEMO_MODEL, DEMO_MODEL_ID, resolve_model

    if push_to_hub and not config.output.hf_repo_id:
        raise ConfigError("--push needs output.hf_repo_id (e.g. --set output.hf_repo_id=org/name)")
    settings = config.sniff_settings()
    model_name = resolve_model(config.model.name)
    tokenizer_name = resolve_model(config.tokenizer_name)
    summary = RunSummary(
        output=str(Path(config.output.data_root).resolve()), model=config.model.name, dataset=config.dataset.path
    )

    if push_to_hub:
        summary.pulled = pull_if_remote(config)

    checked = preflight(config, model_name, tokenizer_name, rank, sink, log)
    rows, total, tokenizer = checked.rows, checked.total, checked.tokenizer
    if checked.estimate is not None and not checked.estimate.documents and rank.is_single and sink is None:
        # Every document is committed already: no need to load the weights to do nothing, but a
        # killed run's leftovers (orphan shards, a lagging examples table, no card) are made good.
        summary.resumed = total
        summary.max_length = checked.max_length
        from qk_attn.storage.manifest import has_leftovers

        if has_leftovers(Path(os.path.expanduser(config.output.data_root))):
            from qk_attn.config import SniffConfig
            from qk_attn.storage.saver import ParquetSink

            vocabulary = (tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
                          if config.capture.capture_token_strings else None)
            sniff = SniffConfig(**settings)
            ParquetSink(sniff.output, sniff, source=checked.source, vocabulary=vocabulary).close()
        if push_to_hub:
            summary.pushed = push(config)
        return summary
    model = load_model(config, model_name, checked.model_config)
    if config.model.name == DEMO_MODEL:  # the card names the real model, not the cache folder
        model.config.name_or_path = DEMO_MODEL_ID
    max_length = summary.max_length = checked.max_length
    decoder = backbone(model)
    device = model.get_input_embeddings().weight.device

    source = checked.source
    # capture_token_strings: the token strings by id, stored as a dictionary-encoded column.
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if config.capture.capture_token_strings else None
    if sink is None and not rank.is_single:
        from qk_attn.config import SniffConfig
        from qk_attn.storage.saver import ParquetSink

        sniff = SniffConfig(**settings)
        sink = ParquetSink(sniff.output, sniff, overwrite=config.output.overwrite, source=source, rank=rank.sink_rank(),
                           vocabulary=vocabulary)
    if total is not None:
        total = len(range(rank.rank, total, rank.world_size))
    start = time.perf_counter()
    bar = _progress(total, progress and not (rank.launched and rank.rank))  # one bar per launched job
    try:
        with qk_attn.session(overwrite=config.output.overwrite, source=source, sink=sink, vocabulary=vocabulary,
                             **settings) as s:
            committed = set(s.committed_ids())
            pending = []
            index = -1
            for index, doc in enumerate(iter_documents(rows, config.dataset)):
                if not rank.owns(index):
                    continue
                if doc.example_id in committed:
                    summary.resumed += 1
                    bar.update(1)
                    continue
                pending.append(doc)
                if len(pending) == config.inference.batch_size:
                    _forward(s, decoder, tokenizer, pending, max_length, config, device, summary, bar, start)
                    pending = []
            if pending:
                _forward(s, decoder, tokenizer, pending, max_length, config, device, summary, bar, start)
            if index < 0:  # a streaming dataset without rows (map-style ones were checked before loading)
                raise ConfigError(f"dataset.path={config.dataset.path!r} (split {config.dataset.split!r}) has no rows")
            if hasattr(s.sink, "complete"):
                s.sink.complete = True  # a rank's manifest part records that it went through all its documents
        summary.rows_written = s.rows_written
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    if push_to_hub:
        summary.pushed = push(config)
    return summary


def _forward(s, decoder, tokenizer, docs, max_length, config, device, summary, bar, start) -> None:
    import torch

    batch, lengths = encode(tokenizer, docs, max_length, config.tokenizer.add_special_tokens, device)
    keep = [i for i, n in enumerate(lengths) if n > 0]
    if len(keep) < len(docs):  # documents with no tokens at all are not run
        summary.empty += len(docs) - len(keep)
        bar.update(len(docs) - len(keep))
        if not keep:
            return
        docs = [docs[i] for i in keep]
        lengths = [lengths[i] for i in keep]
        batch, lengths = encode(tokenizer, docs, max_length, config.tokenizer.add_special_tokens, device)
    describe = getattr(s.sink, "describe", None)
    if describe is not None:  # the examples table: example_id -> the dataset's own id and row
        for d in docs:
            describe(d.example_id, str(d.source_id) if d.has_id else None, d.index)
    s.begin([d.example_id for d in docs])
    with torch.inference_mode():
        decoder(**batch, use_cache=False)
    s.commit()
    summary.documents += len(docs)
    summary.tokens += int(sum(lengths))
    summary.ids.update((d.example_id, d.source_id) for d in docs)
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix_str(f"{summary.tokens / elapsed:,.0f} tok/s, {s.rows_written:,} rows", refresh=False)
    bar.update(len(docs))


def output_files(output: str) -> list[str]:
    """Summary lines for the card and chart, where the run wrote them."""
    from qk_attn.storage.card import CARD, CHART

    paths = (("card", Path(output) / CARD), ("plot", Path(output) / CHART))
    return [f"{name:<10} {path}" for name, path in paths if path.is_file()]


def format_load_hint(output: str) -> list[str]:
    """How to load the result, naming a (layer, head, kind) that has rows."""
    from qk_attn.storage.saver import parse_key, read_manifest

    manifest = read_manifest(output) or {}
    keys = sorted((parse_key(k) for k, names in manifest.get("shards", {}).items() if names),
                  key=lambda k: (k[0], k[1], k[2] == "k"))
    if not keys:  # nothing to load: do not suggest a config that does not exist
        return [f"No rows are committed in {output}: `qk-sniff inspect {output}` shows the plan and what is missing."]
    layer, head, kind = keys[0]
    name = f"l{layer:02d}h{head:02d}{kind}"
    return [
        "Load it:",
        "    import qk_attn",
        f"    table = qk_attn.load({output!r}, layer={layer}, head={head}, kind={kind!r})   # pyarrow Table",
        "    # or, with datasets:",
        f"    datasets.load_dataset({output!r}, {name!r}, split='train')",
        f"Check it:  qk-sniff verify {output}",
    ]
