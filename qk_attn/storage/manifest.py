"""The manifest record (`qk_sniff.json`): build it, read it, write it atomically with its digest.

Manifest fields written by the sink (besides config, sampler, model, plan):
    versions      {package: version} of the latest run that wrote the folder
    release_history  [{"versions", "first_segment", "runs", "started"}]: every set of versions that wrote
                  the folder, with the segments (so the examples) its runs committed (qk_attn.storage.provenance)
    source_files  {"dataset" | "tokenizer" | "model": {"files", "bytes", "sha256"}}: fingerprints of the local
                  files a capture was made from, no paths (qk_attn.storage.settings: the resume check); the
                  model's also "content_sha256", a hash of every byte of its weight files
    examples      {example_id: valid length}
    example_info  {example_id: {"source_id", "source_index", "first_position", "segment"}}, and
                  "unseen_queries" {layer: [[start, stop], ...]} where a layer was given only the last
                  queries of a forward (Gemma 4's KV-shared layers): the positions it did not get
    shards        {key: [shard names]}
    shard_info    {"key/name": {"bytes", "sha256", "rows", "segments": [segment numbers]}}
    columns       {"token_id": bool, "token_str": bool}: the optional columns of every shard
    vocabulary_sha256  `vocabulary_digest` of the list `token_str` comes from (None without one)
    examples_file {"name", "bytes", "sha256"} of OUT/examples.parquet
    row_counts, calls, buckets, next_segment, created, updated

Datasets written before `shard_info` / `example_info` existed still load and verify: their
shards are checked by reading them with their page checksums (if they have any) only. The
names of the files are in qk_attn.storage.layout; the commit protocol that writes them is
described in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from qk_attn.errors import ManifestError
from qk_attn.storage.layout import CARD, CARD_SIGNATURE, MANIFEST, previous_name
from qk_attn.storage.provenance import record_release
from qk_attn.storage.settings import source_fingerprints

FORMAT = 1


def read_manifest(output: str | Path, name: str = MANIFEST) -> dict | None:
    """The manifest, None when absent; `ManifestError` (one line) when it cannot be used.

    The advice never suggests overwriting: that would delete every intact row.
    """
    path = Path(output) / name
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if (
            not isinstance(manifest, dict)
            or not isinstance(manifest.get("examples"), dict)
            or not isinstance(manifest.get("shards"), dict)
        ):
            raise ValueError("missing 'examples' or 'shards'")
        recorded = manifest.pop("digest", None)  # manifests written before the digest existed have none
        if recorded is None and _written_with_digests(path, manifest):
            raise ValueError("its sha256 digest is missing: a value may have changed after it was written")
        if recorded is not None and recorded != manifest_digest(manifest):
            raise ValueError("its sha256 digest differs: a value changed after it was written")
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        previous = path.parent / previous_name(path.name)
        advice = (
            f"run `qk-sniff repair {Path(output)}` (restores the previous manifest, {previous.name}) or restore the "
            "file from a copy"
            if previous.is_file()
            else f"restore the file from a copy (there is no previous manifest, {previous.name}, to restore)"
        )
        raise ManifestError(f"{path} is not a readable qk-sniff manifest ({reason}); {advice}") from None
    return manifest


def _written_with_digests(path: Path, manifest: dict) -> bool:
    """Whether a manifest without a digest comes from a qk-attn that writes one (so it was removed): its
    release_history, a card signed with a manifest's sha256, or a previous manifest with a digest say so."""
    if "release_history" in manifest:  # (came after the digest)
        return True
    card, previous = path.parent / CARD, path.parent / previous_name(path.name)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if card.is_file() and CARD_SIGNATURE.split("{}")[0] in card.read_text(encoding="utf-8"):
            return True
    with contextlib.suppress(OSError, ValueError):
        return previous.is_file() and "digest" in json.loads(previous.read_text())
    return False


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON (sorted keys, no spaces), its own `digest` field left out."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import pyarrow as pa
    import torch

    from qk_attn.version import __version__

    out = {"qk_attn": __version__, "torch": torch.__version__, "pyarrow": pa.__version__}
    for name in ("transformers", "datasets", "huggingface_hub"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def record_run(manifest: dict, rank: int | None = None) -> None:
    """A run opens the folder to write: `versions` becomes this run's (the latest run's) and the run joins
    `release_history`, which keeps every set of versions that wrote here (qk_attn.storage.provenance)."""
    record_release(manifest, rank, versions(), now())


def new_manifest(config, source: dict | None) -> dict:
    return {
        "format": FORMAT,
        "config": {k: v for k, v in config.to_dict().items() if k != "output"},  # no local paths
        "sampler": config.sampler_dict(),
        "vector_dtype": config.vector_dtype,
        "source": source,
        "source_files": source_fingerprints(source),  # what tells local sources apart (the paths are not published)
        "versions": versions(),
        "model": None,
        "plan": None,
        "examples": {},  # example_id -> valid tokens (summed over the calls of one layer)
        "example_info": {},  # example_id -> source_id, source_index, first_position, segment
        "row_counts": {},  # l{LL}h{HH}{k} -> committed rows
        "calls": {},  # l{LL}h{HH}{k} -> attention calls seen for committed examples
        "buckets": {},  # kind -> bucket -> committed rows (all heads)
        "shards": {},  # l{LL}h{HH}{k} -> committed shard file names
        "shard_info": {},  # l{LL}h{HH}{k}/name -> bytes, sha256, rows, segments
        "next_segment": 0,
        "created": now(),
    }


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(
    path: Path, data: dict, fsync: bool = True, keep_previous: bool = False, previous_too: bool = False
) -> None:
    """tmp + fsync + rename, with the data's own sha256 (`digest`, checked by read_manifest).
    `keep_previous` first hard-links the current file to PREVIOUS, so a manifest damaged later (by
    a disk or a person) can be restored to the last good state. `previous_too` writes `data` as
    PREVIOUS as well: for an update that deletes files the old manifest lists (compaction, repair),
    after which the old manifest is no state to go back to."""
    if previous_too:
        write_json_atomic(path.with_name(previous_name(path.name)), data, fsync)
    tmp = path.with_name(f".{path.name}.tmp")
    # Indented while small enough to read; compact (4x faster to write) for large captures.
    small = len(data.get("examples", ())) + len(data.get("shard_info", ())) < 5000
    data = {**data, "digest": manifest_digest(data)}
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1 if small else None, separators=None if small else (",", ":"), sort_keys=True)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    if keep_previous and not previous_too and path.exists():
        previous = path.with_name(previous_name(path.name))
        link = previous.with_name(previous.name + ".tmp")
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def vocabulary_digest(vocabulary) -> str | None:
    """sha256 of a token_str vocabulary (its strings by id, as a JSON list); None for no vocabulary."""
    if vocabulary is None:
        return None
    return hashlib.sha256(json.dumps(list(vocabulary)).encode()).hexdigest()
