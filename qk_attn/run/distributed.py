"""Several processes capturing one dataset: which rank am I, which documents are mine, merge.

    torchrun --nproc-per-node N qk-sniff run ...    RANK / WORLD_SIZE (+ MASTER_ADDR) from the launcher;
    accelerate launch -m qk_attn.cli run ...        rank 0 merges after a gloo barrier
    qk-sniff run --shard i/n ...                    independent jobs (Slurm arrays); then qk-sniff merge OUT

Document d (its index in the dataset, after `max_samples`) belongs to rank `d % n`, so the
ranks' documents are disjoint and their union is the dataset, whatever the launcher. Each
rank writes only its own files (qk_attn.storage.layout.Files); `merge` combines the manifest parts
into `qk_sniff.json` and writes the card, the same as a single process would have.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qk_attn.errors import ConfigError
from qk_attn.storage.provenance import merged_history

# A barrier waits for the slowest rank: 128k-token documents take hours, not the 30 minutes
# torch.distributed defaults to.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # by torchrun / accelerate: the ranks can meet at a barrier
    sharded: bool = False  # --shard i/n: independent jobs, merged by `qk-sniff merge`

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def owns(self, index: int) -> bool:
        """Whether document number `index` (dataset order) is this rank's."""
        return index % self.world_size == self.rank

    def share(self, documents: int) -> int:
        """How many of the first `documents` documents are this rank's."""
        return len(range(self.rank, documents, self.world_size))

    def sink_rank(self) -> tuple[int, int] | None:
        """(rank, world_size) for qk_attn.storage.sink.ParquetSink; None for a single process."""
        return None if self.is_single else (self.rank, self.world_size)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. --shard 3/8 (job 3 of 8, counted from 0)") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: I must be in [0, N) (0-based, e.g. $SLURM_ARRAY_TASK_ID/8)")
    return i, n


def detect(shard: str | None = None, env=os.environ) -> Rank:
    """This process's rank: from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) and/or --shard.

    Both together (a torchrun job per array task): rank = i * WORLD_SIZE + RANK of n * WORLD_SIZE;
    merging is then `qk-sniff merge`'s business, since other jobs may still be running.
    """
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", "0"))
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    launched = world > 1 and "MASTER_ADDR" in env
    if shard is None:
        return Rank(rank, world, local, launched=launched, sharded=world > 1 and not launched)
    i, n = parse_shard(shard)
    return Rank(i * world + rank, n * world, local, launched=launched, sharded=True)


@contextlib.contextmanager
def process_group(rank: Rank) -> Iterator[None]:
    """A gloo process group for the barrier while launched ranks run (kept if one exists already)."""
    if not rank.launched:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    # gloo: the barrier only coordinates processes; capture never sends tensors between ranks.
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(rank: Rank) -> None:
    if rank.launched:
        import torch.distributed as dist

        dist.barrier()


# ---- merge ---------------------------------------------------------------------------------------
def merge(output: str | Path, allow_incomplete: bool = False) -> dict:
    """Merge the ranks' manifest parts of OUT into `qk_sniff.json` and write the card.

    Refuses parts of different captures (settings, source, model) or world sizes, missing ranks,
    overlapping examples, ranks still writing, and (unless `allow_incomplete`) ranks that did not
    finish their documents. Reads the parts and never changes them or a shard: idempotent.
    """
    from qk_attn.errors import OutputLocked
    from qk_attn.storage.card import write_card
    from qk_attn.storage.examples import write_examples
    from qk_attn.storage.layout import MANIFEST, Files, part_files
    from qk_attn.storage.lock import release_lock, take_lock
    from qk_attn.storage.manifest import read_manifest, write_json_atomic

    output = Path(output)
    if not output.is_dir():  # (as verify, inspect and repair say it)
        raise FileNotFoundError(f"{output} {'is a file' if output.exists() else 'does not exist'}: nothing to merge")
    paths = part_files(output)
    if not paths:
        raise FileNotFoundError(f"{output} holds no manifest parts (qk_sniff.rank*.json): nothing to merge")
    locks = []
    try:
        locks.append((take_lock(output, Files().lock), Files().lock))
        for rank in sorted(paths):
            try:
                locks.append((take_lock(output, Files(rank).lock), Files(rank).lock))
            except OutputLocked:
                raise OutputLocked(
                    f"rank {rank} is still writing to {output}; merge when every rank has finished"
                ) from None
        parts = {rank: read_manifest(output, path.name) for rank, path in sorted(paths.items())}
        merged = _merge_parts(output, parts, allow_incomplete)
        current = read_manifest(output)
        if current is not None and current.get("examples") and not current.get("ranks"):
            raise ValueError(f"{output}/{MANIFEST} is a single-process capture; it cannot be replaced by a merge")
        write_examples(output, merged)  # the merged OUT/examples.parquet (ranks wrote examples.rankRRR.parquet)
        write_json_atomic(output / MANIFEST, merged, keep_previous=True)
        write_card(output, merged)
    finally:
        for fd, name in reversed(locks):  # deleted, as every command leaves no lock file behind
            release_lock(output, fd, name)
    return merged


def _merge_parts(output: Path, parts: dict[int, dict], allow_incomplete: bool) -> dict:
    from qk_attn.storage.settings import LOCAL_SOURCES, identity, same_files

    sizes = {rank: (p.get("part") or {}).get("world_size") for rank, p in parts.items()}
    world = sizes[min(sizes)]
    if set(sizes.values()) != {world}:
        raise ValueError(
            f"{output}: manifest parts of different world sizes (rank -> world size: {sizes}); "
            "they come from different runs: remove the stale ones or use another output directory"
        )
    missing = sorted(set(range(world)) - set(parts))
    if missing:
        raise ValueError(
            f"{output}: ranks {missing} of {world} have no manifest part; run them (--shard i/{world}) first"
        )
    incomplete = sorted(r for r, p in parts.items() if not p["part"].get("complete"))
    if incomplete and not allow_incomplete:
        raise ValueError(
            f"{output}: ranks {incomplete} did not finish their documents; re-run them (the same command "
            "resumes), or merge with --allow-incomplete"
        )
    first = parts[0]
    reference = identity(first["config"], first.get("source"))
    models = {}
    # Weights by their whole content where every rank recorded it (parts from before: the sampled sha256).
    weights = [p["model"]["files"] for p in parts.values() if (p.get("model") or {}).get("files")]
    digest = "content_sha256" if all("content_sha256" in files for files in weights) else "sha256"
    for rank, part in parts.items():
        other = identity(part["config"], part.get("source"))
        diffs = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
        # Local files are recorded by name; their fingerprints tell another docs.jsonl of the same name apart.
        files, first_files = part.get("source_files") or {}, first.get("source_files") or {}
        diffs += [
            f"{LOCAL_SOURCES.get(k, k)}: other files of the same name"
            for k in sorted(files)
            if k in first_files and not same_files(first_files[k], files[k])
        ]
        # One schema and one vocabulary per dataset (the optional columns, token_str's strings).
        diffs += [f for f in ("vector_dtype", "columns", "vocabulary_sha256") if part.get(f) != first.get(f)]
        if diffs:
            raise ValueError(
                f"{output}: rank {rank} captured with different settings than rank 0 "
                f"({', '.join(diffs)}); refusing to merge different captures"
            )
        if part.get("model"):
            model = part["model"]  # a local folder is known by its files: each node may keep it elsewhere
            models[rank] = (
                model["files"][digest] if model.get("files") else model.get("id"),
                model.get("revision"),
                json.dumps(part.get("plan"), sort_keys=True),
            )
    if len(set(models.values())) > 1:
        raise ValueError(
            f"{output}: the ranks captured different models or head plans: "
            + "; ".join(f"rank {r}: {m[0]} ({m[1]})" for r, m in sorted(models.items()))
        )

    _check_same_documents(output, parts)

    merged = {k: v for k, v in first.items() if k != "part"}
    merged["release_history"] = merged_history(parts)  # every rank's releases, by merged segment
    latest = max(parts.values(), key=lambda part: part.get("updated") or "")  # the latest run's versions
    merged["versions"] = latest.get("versions", merged.get("versions"))
    with_model = [p for p in parts.values() if p.get("model")]
    merged["model"] = with_model[0]["model"] if with_model else None
    merged["plan"] = with_model[0]["plan"] if with_model else None
    merged["examples"], merged["row_counts"], merged["calls"], merged["buckets"], merged["shards"] = {}, {}, {}, {}, {}
    merged["example_info"], merged["shard_info"] = {}, {}
    merged.pop("examples_file", None)
    for rank, part in sorted(parts.items()):
        overlap = set(part["examples"]) & set(merged["examples"])
        if overlap:
            raise ValueError(f"{output}: example {sorted(overlap)[0]} is committed by rank {rank} and an earlier rank")
        merged["examples"].update(part["examples"])
        # Segment numbers are per rank: made unique in the merged manifest (s * world + rank), so
        # that a shard's examples (qk_attn.storage.manifest.shard_examples) are only its own rank's.
        unique = lambda segment: segment * world + rank  # noqa: E731
        for example, info in part.get("example_info", {}).items():
            merged["example_info"][example] = {**info, "segment": unique(info["segment"])}
        for name, info in part.get("shard_info", {}).items():
            merged["shard_info"][name] = {**info, "segments": [unique(s) for s in info["segments"]]}
        for field in ("row_counts", "calls"):
            for key, n in part[field].items():
                merged[field][key] = merged[field].get(key, 0) + n
        for kind, counts in part["buckets"].items():
            into = merged["buckets"].setdefault(kind, {})
            for bucket, n in counts.items():
                into[bucket] = into.get(bucket, 0) + n
        for key, names in part["shards"].items():
            merged["shards"].setdefault(key, []).extend(names)
    merged["examples"] = dict(sorted(merged["examples"].items(), key=lambda kv: int(kv[0])))
    cross = sorted({layer for part in parts.values() for layer in part.get("cross_attention_layers", [])})
    merged.pop("cross_attention_layers", None)
    if cross:
        merged["cross_attention_layers"] = cross
    merged["shards"] = {key: sorted(names) for key, names in sorted(merged["shards"].items())}
    # above every renumbered segment: a run resuming the merged folder must not reuse one
    merged["next_segment"] = max(p["next_segment"] for p in parts.values()) * world
    merged["created"] = min(p["created"] for p in parts.values())
    stamps = [p["updated"] for p in parts.values() if p.get("updated")]
    merged["updated"] = max(stamps) if stamps else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    merged["ranks"] = {"world_size": world, "parts": [parts_name(r) for r in sorted(parts)], "incomplete": incomplete}
    return merged


def _check_same_documents(output: Path, parts: dict[int, dict]) -> None:
    """The finished ranks went through one document list (in one order): with another
    `dataset.max_samples`, or a dataset that changed between their runs, some documents would be
    no rank's, and the merge would lack them while every rank says it is complete."""
    lists = {rank: p["part"]["documents"] for rank, p in parts.items() if p["part"].get("documents")}
    if len({(d["count"], d["sha256"]) for d in lists.values()}) > 1:
        seen = "; ".join(f"rank {r}: {d['count']} documents ({d['sha256'][:12]})" for r, d in sorted(lists.items()))
        raise ValueError(
            f"{output}: the ranks went through different document lists ({seen}): dataset.max_samples or the "
            "dataset's rows or their order changed between their runs, so some documents are no rank's; re-run "
            "the ranks with the same settings and dataset (the same command resumes), then merge"
        )
    # A rank re-run over a shorter list (a smaller max_samples) still holds the documents an earlier run
    # committed past it: the other ranks went through the shorter list, so those between are no rank's.
    for rank, documents in sorted(lists.items()):
        beyond = sorted(
            info["source_index"]
            for info in parts[rank].get("example_info", {}).values()
            if info.get("source_index") is not None and info["source_index"] >= documents["count"]
        )
        if beyond:
            raise ValueError(
                f"{output}: rank {rank} holds documents {beyond[:5]} beyond its latest document list of "
                f"{documents['count']} (an earlier run with a larger dataset.max_samples), so the documents "
                "between are no rank's; re-run every rank with that larger dataset.max_samples, then merge"
            )


def parts_name(rank: int) -> str:
    from qk_attn.storage.layout import Files

    return Files(rank).manifest
