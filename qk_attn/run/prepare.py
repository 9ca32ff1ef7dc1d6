"""Everything `qk-sniff run` establishes before the weights load, in order of cost.

The model's config against the head filters, the tokenizer and max_length, the source record,
the output folder, the dataset (rows, ids, texts, lengths against the model's positions) and
the estimated size of the run against capture.max_gb. Each check is one function of
qk_attn.run.preflight, qk_attn.run.input_checks or qk_attn.run.output_checks; this module runs
them in order and keeps what they found (`Preflight`).
`check` is `qk-sniff run --dry-run`: these steps alone, no weights loaded, nothing written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qk_attn.errors import ConfigError, one_line
from qk_attn.run.config import RunConfig
from qk_attn.run.documents import count_documents, load_rows, map_style, normalize_id, text_folder
from qk_attn.run.estimate import format_estimate, refusal
from qk_attn.run.model import load_model_config, load_tokenizer, resolve_max_length

LATER_SOURCE_KEYS = ("weights", "data_files")  # source keys that captures made by earlier versions lack


def source_info(config: RunConfig, max_length: int) -> dict[str, Any]:
    """What the dataset card and manifest record about where the text came from."""
    from qk_attn.demo import DEMO_DATASET, DEMO_DATASET_DESCRIPTION, DEMO_MODEL, weights_provenance

    d = config.dataset
    return {
        "dataset": d.path,
        "dataset_name": d.name,
        "split": d.split,
        "dataset_revision": d.revision,
        "data_files": d.data_files,
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
        # A folder of .txt files: read with sample_by since this key exists (before, one document per line).
        **({"text_folder": True} if text_folder(d) else {}),
        "max_length": max_length,
        "padding_side": config.tokenizer.padding_side,
        "batch_size": config.inference.batch_size,
        **({"description": DEMO_DATASET_DESCRIPTION} if d.path == DEMO_DATASET else {}),
        **({"weights": weights_provenance()} if config.model.name == DEMO_MODEL else {}),
    }


def _compatible(source: dict[str, Any], config: RunConfig, rank) -> dict[str, Any]:
    """`source` without the keys that a capture already in the output folder was made without
    (added by later versions, e.g. `weights`): such a capture keeps resuming."""
    from qk_attn.storage.layout import Files
    from qk_attn.storage.manifest import read_manifest

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


def check(config: RunConfig, *, shard: str | None = None, log=print) -> Preflight:
    """Every check `run` makes before the weights load, and the estimate; loads no weights and
    writes nothing (`qk-sniff run --dry-run`)."""
    from qk_attn.demo import resolve_model
    from qk_attn.run import distributed

    rank = distributed.detect(shard)
    return prepare(config, resolve_model(config.model.name), resolve_model(config.tokenizer_name), rank, None, log)


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
    empty: int = 0  # documents left to capture that have no tokens (never run, never committed)


def prepare(config: RunConfig, model_name: str, tokenizer_name: str, rank, sink, log=print) -> Preflight:
    """Everything that can be checked before the weights load (qk_attn.run.preflight,
    qk_attn.run.output_checks), in order of cost: the model's config, the output folder, the
    dataset, the size of the run."""
    from qk_attn.demo import DEMO_MODEL, DEMO_MODEL_ID
    from qk_attn.run import preflight as checks
    from qk_attn.run.estimate import estimate
    from qk_attn.run.output_checks import check_output
    from qk_attn.sampler import Sampler

    sniff = config.sniff_config()
    if sniff.backend == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "inference.backend='flash_attention_2' needs the flash-attn package "
                "(pip install 'qk-attn[flash]', CUDA only); use sdpa or eager"
            )
    model_config = load_model_config(config, model_name)
    model_label = config.model.name if config.model.name != DEMO_MODEL else DEMO_MODEL_ID
    kind = getattr(model_config, "model_type", None) or type(model_config).__name__
    checks.check_decoder(model_config, f"model.name={config.model.name!r}", kind)
    checks.check_backend(model_config, config.inference.backend, kind)
    try:
        shape = checks.model_shape(model_config)
    except (AttributeError, TypeError, ValueError) as error:  # a config without the usual attention fields
        shape = plan = None
        log(
            f"qk-sniff: cannot read the attention shape from {model_label}'s config ({type(error).__name__}: "
            f"{one_line(error)}); the layer and head checks and the size estimate are skipped"
        )
    else:
        raw = {name: getattr(config.capture, name) for name in ("layers", "heads", "key_heads")}
        plan = checks.check_plan(sniff, shape, config.yaml_key, raw, f"{model_label} ({kind})")
        pairs = sum(len(heads) for heads in plan.query_heads.values())
        if sniff.head_sample_count is not None and "q" in sniff.kinds and sniff.head_sample_count > pairs:
            log(
                f"qk-sniff: capture.head_sampling.count={sniff.head_sample_count} is more than the {pairs} (layer, query "
                "head) pairs the filters leave: all of them are recorded"
            )

    tokenizer = load_tokenizer(config, tokenizer_name)
    max_length = resolve_max_length(config, model_config, tokenizer)
    source = _compatible(source_info(config, max_length), config, rank)
    disk = None  # the folder whose free space bounds the run (None: not writing to disk)
    if sink is None:
        model = {
            "id": model_label if config.model.name == DEMO_MODEL else model_name,
            "revision": getattr(model_config, "_commit_hash", None),
        }
        from qk_attn.storage.settings import local_fingerprint

        files = local_fingerprint(model_name, "model")  # a local folder: known by its files, not its path
        if files is not None:
            model["files"] = files
        disk = check_output(
            config.output.data_root,
            sniff,
            source,
            overwrite=config.output.overwrite,
            model=model,
            shape=shape,
            rank=None if rank.is_single else rank.sink_rank(),
            token_strings=config.capture.capture_token_strings,
        )

    rows = load_rows(config.dataset)
    total = count_documents(rows, config.dataset)
    if total == 0:
        raise ConfigError(f"dataset.path={config.dataset.path!r} (split {config.dataset.split!r}) has no rows")
    lengths = None
    empty = 0
    positions = checks.model_positions(model_config)
    if map_style(rows):  # ids and lengths of every document, before the model loads
        lengths, longest, truncated = _document_lengths(rows, total, config, tokenizer, max_length, rank, sink is None)
        checks.check_positions(max_length, positions, longest, model_label, streaming=False)
        # Of the documents this run captures: committed ones (resume) and other ranks' are not counted.
        of = f"{len(lengths)} document(s)" + (" left to capture" if len(lengths) < total else "")
        if truncated:
            log(
                f"qk-sniff: {truncated} of {of} have more than tokenizer.max_length={max_length:,} "
                "tokens and are truncated to it"
            )
        # Documents without a single token are never run nor committed: not part of the estimate, and
        # a run of nothing but such documents (none committed before) is refused, not an empty capture.
        empty = lengths.count(0)
        if empty:
            if empty == len(lengths) == total and rank.is_single:
                raise ConfigError(
                    f"dataset.path={config.dataset.path!r}: all {total:,} document(s) of "
                    f"dataset.text_column={config.dataset.text_column!r} have no tokens (empty or whitespace-only "
                    f"text, tokenizer.add_special_tokens={config.tokenizer.add_special_tokens}); there is nothing "
                    "to capture"
                )
            log(f"qk-sniff: {empty} of {of} have no tokens (empty or whitespace-only text) and are skipped")
            lengths = [n for n in lengths if n]
    else:
        checks.check_positions(max_length, positions, None, model_label, streaming=True)
    if lengths is None and plan is not None:  # streaming: only an upper bound, documents cut at max_length
        from qk_attn.run.estimate import format_bytes

        upper = estimate(plan, Sampler.from_config(sniff), [max_length], sniff.vector_dtype)
        limit = config.dataset.max_samples
        n = rank.share(limit) if limit else 1
        count = f"{n:,} document(s)" if limit else "each document"
        if limit and not rank.is_single:
            count += f" (this rank's share of dataset.max_samples={limit:,})"
        log(
            f"qk-sniff: estimate: streaming dataset, lengths unknown before the run: at most {upper.rows * n:,.0f} rows, "
            f"{format_bytes(upper.bytes * n)} uncompressed for {count} of at most {max_length:,} tokens"
        )
        if config.capture.max_gb is not None:  # (set, and not applied: said, not ignored silently)
            log(
                f"qk-sniff: capture.max_gb={config.capture.max_gb:g} is not applied to a streaming dataset, whose size "
                "is not known before the run; "
                + (
                    "the bound above is what dataset.max_samples and tokenizer.max_length allow"
                    if limit
                    else "bound it with dataset.max_samples (the estimate above is per document)"
                )
            )
        if sink is None:  # the session's ParquetSink stages forwards within half of inference.pinned_mb
            log(_staging_line(config, sniff, plan, max_length, config.dataset.max_samples))
    est = None
    if lengths is not None and plan is not None:
        est = estimate(plan, Sampler.from_config(sniff), lengths, sniff.vector_dtype)
        for line in format_estimate(est):
            log(line)
        if sink is None and est.documents:
            log(_staging_line(config, sniff, plan, max(lengths), len(lengths)))
        if disk is not None and est.documents:
            limit, how = checks.size_limit(config.capture.max_gb, disk)
            if est.bytes > limit:
                raise ConfigError(refusal(est, limit, how))
    return Preflight(model_config, tokenizer, max_length, plan, est, rows, total, source, empty)


def _staging_line(config: RunConfig, sniff, plan, longest: int, documents: int | None) -> str:
    """Whether every forward's rows are staged whole (qk_attn.run.estimate.staging_fit)."""
    from qk_attn.run.estimate import format_staging, staging_fit
    from qk_attn.sampler import Sampler

    batch = min(config.inference.batch_size, documents or config.inference.batch_size)
    dtype = "float32" if sniff.rope == "pre" else sniff.vector_dtype  # pre-RoPE rows are staged in float32
    fit = staging_fit(plan, Sampler.from_config(sniff), longest, batch, plan.shape.head_dim, dtype, sniff.pinned_mb)
    return format_staging(fit)


def _document_lengths(
    rows, total, config, tokenizer, max_length, rank, check_output: bool
) -> tuple[list[int], tuple[Any, int] | None, int]:
    """Valid lengths (tokens, cut at max_length) of the documents this run will capture, the
    longest as (source id, tokens), and how many are longer than max_length; checks ids and texts
    first. Documents an earlier run committed (resume) and other ranks' documents are left out.
    """
    from qk_attn.run.input_checks import check_ids, not_text
    from qk_attn.storage.layout import Files
    from qk_attn.storage.manifest import read_manifest

    cfg = config.dataset
    head = rows.select(range(total)) if total < len(rows) else rows
    for column in (cfg.text_column, cfg.id_column):
        if column is not None and column not in head.column_names:
            which = "text_column" if column == cfg.text_column else "id_column"
            raise ConfigError(
                f"dataset.{which}={column!r} does not exist; the dataset has {', '.join(head.column_names)}"
            )
    ids = head[cfg.id_column] if cfg.id_column is not None else range(total)
    if cfg.id_column is not None:
        check_ids(ids, normalize_id, cfg.id_column)
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
            if not isinstance(text, str):
                raise ConfigError(not_text(cfg, index, text, ids[index]))
        enc = tokenizer(
            list(texts),
            truncation=True,
            max_length=max_length + 1,  # +1: was it cut?
            add_special_tokens=config.tokenizer.add_special_tokens,
        )
        for index, tokens in zip(part, enc["input_ids"]):
            truncated += len(tokens) > max_length
            lengths.append(min(len(tokens), max_length))
            if longest is None or lengths[-1] > longest[1]:
                longest = (ids[index], lengths[-1])
    return lengths, longest, truncated
