"""`qk-sniff run`: the loop. Checks -> model backbone -> one session -> batches -> dataset.

    checks      before any weight loads (qk_attn.run.prepare, with the checks of
                qk_attn.run.preflight and qk_attn.run.output_checks and the estimate of
                qk_attn.run.estimate)
    documents   qk_attn.run.documents: the dataset's rows, ids normalised to int64
    model       qk_attn.run.model: AutoModelForCausalLM with attn_implementation="qk_sniff";
                only the backbone runs; texts truncated to tokenizer.max_length
    capture     one qk_attn.session() for the whole run; each batch: describe(ids) ->
                begin(ids) -> forward -> commit(); examples committed by an earlier run are
                skipped (resume); an unpadded batch passes input_ids only
    ranks       under torchrun / accelerate launch / --shard i/n each rank runs its documents
                (qk_attn.run.distributed) into its own files; rank 0 merges after a barrier
    hub         with --push: pull the remote dataset first (if it exists), push at the end

Progress: one bar over documents with tokens/s and rows written; a summary at the end
(qk_attn.run.summary).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from qk_attn.errors import ConfigError
from qk_attn.run.config import RunConfig
from qk_attn.run.documents import iter_documents
from qk_attn.run.model import backbone, encode, load_model
from qk_attn.run.prepare import prepare
from qk_attn.run.summary import RunSummary


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


def run(
    config: RunConfig,
    *,
    push_to_hub: bool = False,
    progress: bool = True,
    sink=None,
    shard: str | None = None,
    log=print,
) -> RunSummary:
    """Run every document of the dataset through the model once, capturing into the output.

    Under a launcher (RANK/WORLD_SIZE) or with `shard="i/n"` this process runs only its own
    documents into its own files; launched ranks meet at a barrier and rank 0 merges.
    """
    from qk_attn.run import distributed

    rank = distributed.detect(shard)
    if push_to_hub and not rank.is_single:
        raise ConfigError(
            "--push runs in one process only: after a multi-rank capture run `qk-sniff merge OUT` "
            "(torchrun / accelerate launch do it at the end) and then `qk-sniff push OUT --repo ID`"
        )
    with distributed.process_group(rank):
        summary = _run(config, rank, push_to_hub, progress, sink, log)
        if not rank.is_single:
            summary.rank = f"rank {rank.rank} of {rank.world_size}"
            distributed.barrier(rank)  # every rank has closed its sink: its manifest part is final
            if rank.launched and not rank.sharded and rank.rank == 0 and sink is None:
                distributed.merge(config.output.data_root)
                summary.merged = True
    return summary


def check_push(config: RunConfig) -> None:
    """--push: output.hf_repo_id names a Hub dataset repo (checked before anything runs, by --dry-run too)."""
    from qk_attn.dataset.hub import check_repo_id

    if not config.output.hf_repo_id:
        raise ConfigError("--push needs output.hf_repo_id (e.g. --set output.hf_repo_id=org/name)")
    check_repo_id(config.output.hf_repo_id)


def _run(config: RunConfig, rank, push_to_hub: bool, progress: bool, sink, log=print) -> RunSummary:
    import qk_attn
    from qk_attn.demo import DEMO_MODEL, DEMO_MODEL_ID, resolve_model

    if push_to_hub:
        check_push(config)
    settings = config.sniff_settings()
    model_name = resolve_model(config.model.name)
    tokenizer_name = resolve_model(config.tokenizer_name)
    summary = RunSummary(
        output=str(Path(config.output.data_root).resolve()), model=config.model.name, dataset=config.dataset.path
    )

    if push_to_hub:
        summary.pulled = pull_if_remote(config)

    checked = prepare(config, model_name, tokenizer_name, rank, sink, log)
    rows, total, tokenizer = checked.rows, checked.total, checked.tokenizer
    if checked.estimate is not None and not checked.estimate.documents and rank.is_single and sink is None:
        # Every document is committed already: no need to load the weights to do nothing, but a
        # killed run's leftovers (orphan shards, a lagging examples table, no card) are made good.
        summary.resumed = total - checked.empty  # the rest have no tokens: never committed
        summary.empty = checked.empty
        summary.max_length = checked.max_length
        from qk_attn.storage.folder import has_leftovers

        if has_leftovers(Path(os.path.expanduser(config.output.data_root))):
            from qk_attn.config import SniffConfig
            from qk_attn.storage.sink import ParquetSink

            vocabulary = (
                tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
                if config.capture.capture_token_strings
                else None
            )
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
    vocabulary = (
        tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if config.capture.capture_token_strings else None
    )
    if sink is None and not rank.is_single:
        from qk_attn.config import SniffConfig
        from qk_attn.storage.sink import ParquetSink

        sniff = SniffConfig(**settings)
        sink = ParquetSink(
            sniff.output,
            sniff,
            overwrite=config.output.overwrite,
            source=source,
            rank=rank.sink_rank(),
            vocabulary=vocabulary,
        )
    if total is not None:
        total = rank.share(total)
    start = time.perf_counter()
    bar = _progress(total, progress and not (rank.launched and rank.rank))  # one bar per launched job
    try:
        with qk_attn.session(**_session_arguments(settings, sink, config.output.overwrite, source, vocabulary)) as s:
            committed = set(s.committed_ids())
            pending = []
            index = -1
            listed = hashlib.sha256()  # the document list in order: ranks that went through other lists do not merge
            for index, doc in enumerate(iter_documents(rows, config.dataset)):
                listed.update(doc.example_id.to_bytes(8, "little", signed=True))
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
            s.sink.documents = {"count": index + 1, "sha256": listed.hexdigest()}
            if not summary.documents:  # this rank's documents are all committed, or it owns none
                s.expect_nothing()
            s.sink.complete = True  # a rank's manifest part records that it went through all its documents
        summary.rows_written = s.rows_written
        _show_rate(bar, summary, start, s.rows_written)  # closing wrote the rows still in flight: the final count
        pool = s.sink.pool
        summary.pool_waits = (pool.waits, pool.waited_s) if pool is not None else (0, 0.0)
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
    for d in docs:  # the examples table: example_id -> the dataset's own id and row
        s.sink.describe(d.example_id, str(d.source_id) if d.has_id else None, d.index)
    s.begin([d.example_id for d in docs])
    with torch.inference_mode():
        decoder(**batch, use_cache=False)
    s.commit()
    summary.documents += len(docs)
    summary.tokens += int(sum(lengths))
    summary.ids.update((d.example_id, d.source_id) for d in docs)
    _show_rate(bar, summary, start, s.rows_written, refresh=False)
    bar.update(len(docs))


def _show_rate(bar, summary: RunSummary, start: float, rows: int, refresh: bool = True) -> None:
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix_str(f"{summary.tokens / elapsed:,.0f} tok/s, {rows:,} rows", refresh=refresh)


def _session_arguments(settings: dict, sink, overwrite: bool, source, vocabulary) -> dict:
    """session()'s arguments: the folder's own when the session opens it; with a sink made here (one rank's
    ParquetSink, given them already) or by the caller (a MemorySink), the sink and, if it writes the folder,
    the output."""
    if sink is None:
        return dict(settings, overwrite=overwrite, source=source, vocabulary=vocabulary)
    if getattr(sink, "output", None) is None:
        settings = {key: value for key, value in settings.items() if key != "output"}
    return dict(settings, sink=sink)
