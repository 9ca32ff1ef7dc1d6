"""The commit protocol's files: manifest, names, lock, orphans (DESIGN §5). No Parquet encoding here.

    OUT/qk_sniff.json                        manifest: the only record of what is committed
    OUT/.qk_sniff.json.prev                  the previous manifest (hard link): `repair` restores it
    OUT/.qk_sniff.lock                       flock'd while a sink writes here (one writer per folder)
    OUT/examples.parquet                     one row per committed example (export of the manifest)
    OUT/l{LL}h{HH}{q|k}/sNNNNNN-pNNNN.parquet committed shards (listed in the manifest)
    OUT/l{LL}h{HH}{q|k}/.sNNNNNN-pNNNN.parquet.tmp  shards not committed yet

Manifest fields written by the sink (besides config, sampler, model, plan, versions):
    examples      {example_id: valid length}
    example_info  {example_id: {"source_id", "source_index", "first_position", "segment"}}
    shards        {key: [shard names]}
    shard_info    {"key/name": {"bytes", "sha256", "rows", "segments": [segment numbers]}}
    columns       {"token_id": bool, "token_str": bool}: the optional columns of every shard
    examples_file {"name", "bytes", "sha256"} of OUT/examples.parquet
    row_counts, calls, buckets, next_segment, created, updated

Datasets written before `shard_info` / `example_info` existed still load and verify: their
shards are checked by reading them with their page checksums (if they have any) only.

A *segment* is what one manifest update commits: every example committed in it has all its
rows in shards of that segment (a merged shard lists every segment it holds), so the
examples a shard holds are the examples of its segments, even when the shard is unreadable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qk_attn.errors import DamagedDataset, ManifestError, NotACapture, OutputLocked, StorageError

logger = logging.getLogger(__name__)

MANIFEST = "qk_sniff.json"


def previous_name(manifest_name: str) -> str:
    """Where a manifest's last good version is kept; one per manifest file, so that ranks
    writing their parts into one folder never touch each other's."""
    return f".{manifest_name}.prev"


PREVIOUS = previous_name(MANIFEST)
LOCK = ".qk_sniff.lock"
EXAMPLES = "examples.parquet"
FORMAT = 1
KEY_RE = re.compile(r"l(\d+)h(\d+)([qk])")
SHARD_RE = re.compile(r"s(\d+)-p(\d+)\.parquet")
PART_RE = re.compile(r"qk_sniff\.rank(\d+)\.json")
PART_FILES_RE = re.compile(r"\.?qk_sniff\.rank\d+\.json(\.prev)?")  # a part, or its previous version
# Settings that do not change which rows are recorded or their values: a resumed run may differ in them.
NOT_IDENTITY = ("output", "backend", "pinned_mb")
SOURCE_NOT_IDENTITY = ("batch_size", "padding_side", "max_samples")


def key_name(layer: int, head: int, kind: str) -> str:
    """Folder and config name of one (layer, head, kind): `l03h01k`."""
    return f"l{layer:02d}h{head:02d}{kind}"


def parse_key(name: str) -> tuple[int, int, str] | None:
    match = KEY_RE.fullmatch(name)
    return (int(match[1]), int(match[2]), match[3]) if match else None


@dataclass(frozen=True)
class Files:
    """The names one writer owns in OUT: the single writer's (rank None) or rank r's of n."""

    rank: int | None = None
    world_size: int = 1

    @property
    def prefix(self) -> str:  # of its shard names
        return "" if self.rank is None else f"r{self.rank:03d}-"

    @property
    def manifest(self) -> str:
        return MANIFEST if self.rank is None else f"qk_sniff.rank{self.rank:03d}.json"

    @property
    def lock(self) -> str:
        return LOCK if self.rank is None else f".qk_sniff.rank{self.rank:03d}.lock"

    @property
    def examples(self) -> str:
        return EXAMPLES if self.rank is None else f"examples.rank{self.rank:03d}.parquet"

    def shard(self, segment: int, part: int) -> str:
        return f"{self.prefix}s{segment:06d}-p{part:04d}.parquet"

    def owns(self, name: str) -> bool:
        """A shard (or its temporary file) this writer wrote."""
        name = name[1:-4] if name.startswith(".") and name.endswith(".parquet.tmp") else name
        return name.startswith(self.prefix) and SHARD_RE.fullmatch(name[len(self.prefix):]) is not None


def part_files(output: str | Path) -> dict[int, Path]:
    """rank -> manifest part of every rank that has written into OUT."""
    output = Path(output)
    found = (PART_RE.fullmatch(p.name) for p in output.iterdir()) if output.is_dir() else ()
    return {int(m[1]): output / m[0] for m in found if m}


def read_manifest(output: str | Path, name: str = MANIFEST) -> dict | None:
    """The manifest, None when absent; `ManifestError` (one line) when it cannot be used.

    The advice never suggests overwriting: that would delete every intact row.
    """
    path = Path(output) / name
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("examples"), dict) or not isinstance(manifest.get("shards"), dict):
            raise ValueError("missing 'examples' or 'shards'")
        recorded = manifest.pop("digest", None)  # manifests written before the digest existed have none
        if recorded is not None and recorded != manifest_digest(manifest):
            raise ValueError("its sha256 digest differs: a value changed after it was written")
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ManifestError(
            f"{path} is not a readable qk-sniff manifest ({reason}); run `qk-sniff repair {Path(output)}` "
            f"(restores the previous manifest, {PREVIOUS}) or restore the file from a copy"
        ) from None
    return manifest


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


def new_manifest(config, source: dict | None) -> dict:
    return {
        "format": FORMAT,
        "config": {k: v for k, v in config.to_dict().items() if k != "output"},  # no local paths
        "sampler": config.sampler_dict(),
        "vector_dtype": config.vector_dtype,
        "source": source,
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


def identity(config: dict, source: dict | None) -> dict:
    out = {k: public_value(v) for k, v in config.items() if k not in NOT_IDENTITY}
    if source:  # a pushed (then pulled) manifest names local files by their last part
        out.update({f"source.{k}": public_value(v) for k, v in source.items() if k not in SOURCE_NOT_IDENTITY})
    return out


def public_value(value):
    """A value fit for publishing: an absolute local path becomes its last part, marked local."""
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return f"{Path(value).name} (local)"
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_value(v) for v in value]
    return value


def public_manifest(manifest: dict) -> dict:
    """The manifest as pushed: no absolute local paths (the dataset, model or tokenizer a capture
    was made from locally are named by their last part)."""
    out = dict(manifest)
    for field in ("config", "source", "model", "plan"):
        if out.get(field) is not None:
            out[field] = public_value(out[field])
    return out


def check_same_capture(output: Path, manifest: dict, config, source: dict | None) -> None:
    """Refuse to mix two different captures in one folder; the message names every difference."""
    old = identity(manifest.get("config", {}), manifest.get("source") if source else None)
    new = identity(config.to_dict(), source if manifest.get("source") else None)
    diffs = [f"  {k}: {old.get(k)!r} in {output}, {new.get(k)!r} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(
            f"{output} already holds a qk-sniff capture with different settings:\n" + "\n".join(diffs) + "\n"
            "Re-run with the same settings to resume it, choose another output directory, or pass overwrite=True "
            "(run config: output.overwrite: true) to delete the existing capture and start over."
        )


def open_capture(output: Path, files: Files, config, source: dict | None, overwrite: bool, columns: dict,
                 fsync: bool) -> tuple[dict, list[Path]]:
    """The commit protocol's open step, under the writer's lock: refuse what must not be
    touched or mixed, remove what `overwrite` or a killed run left, and write the manifest
    (which also proves OUT is writable). Returns (manifest, orphans removed)."""
    check_is_capture(output, files)  # never write into (or clean) a folder of someone else's files
    if overwrite:
        remove_dataset(output, files)
    else:  # (under overwrite another rank may not have removed its old files yet)
        check_layout(output, files)
    manifest = read_manifest(output, files.manifest)
    if manifest is not None:
        check_same_capture(output, manifest, config, source)
        check_shard_sizes(output, manifest, digests=True)
        manifest["versions"] = versions()  # of the latest run writing here
        manifest.setdefault("example_info", {})
        manifest.setdefault("shard_info", {})
    else:
        manifest = new_manifest(config, source)
    old = manifest.setdefault("columns", columns if not manifest["examples"] else {"token_id": False, "token_str": False})
    if old != columns:  # one schema per dataset
        raise StorageError(
            f"{output} was captured with optional columns {old}; this run would write {columns} "
            "(token ids / vocabulary): use the same setting, another output directory, or overwrite=True"
        )
    if files.rank is not None:
        manifest["part"] = {"rank": files.rank, "world_size": files.world_size, "complete": False}
    removed = remove_orphans(output, manifest, files)
    write_json_atomic(output / files.manifest, manifest, fsync)
    return manifest, removed


def check_same_model(output: Path, manifest: dict, model: dict, plan: dict) -> None:
    """Refuse rows of another model (or another shape) than OUT already holds."""
    old = manifest.get("model")
    if not old:
        return
    # A commit hash identifies the weights; without one on both sides, the name has to do.
    both = old.get("revision") and model["revision"]
    if (old["revision"] != model["revision"]) if both else (old.get("id") != model["id"]):
        raise ValueError(
            f"{output} holds captures of model {old.get('id')!r} (revision {old.get('revision')}); "
            f"this run uses {model['id']!r} (revision {model['revision']}). Use another output directory "
            "or overwrite=True to start over."
        )
    shape = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
    old_plan = manifest.get("plan") or {}
    if any(old_plan.get(k) != plan[k] for k in shape if k in old_plan):
        raise ValueError(
            f"{output} holds captures of a model shaped {[old_plan.get(k) for k in shape]} "
            f"({', '.join(shape)}); this model is {[plan[k] for k in shape]}"
        )


def check_is_capture(output: Path, files: Files) -> None:
    """A folder with files but no manifest is not a capture: refuse it (even under overwrite),
    so that no file the capture did not write is ever overwritten or deleted."""
    if (output / files.manifest).exists() or (output / MANIFEST).exists() or part_files(output):
        return
    ours = {LOCK, files.lock}
    foreign = sorted(p.name for p in output.iterdir() if p.name not in ours and not p.name.startswith(".qk_sniff."))
    if foreign:
        raise NotACapture(
            f"{output} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and holds no "
            f"{MANIFEST}: refusing to write a capture into it; choose a new or empty output folder"
        )


def check_shard_sizes(output: Path, manifest: dict, digests: bool = False) -> None:
    """Before resuming: every committed shard exists with its recorded size (a cheap stat, made
    before the weights load) and, with `digests`, its recorded sha256 (when a sink opens the folder:
    a resumed run must never build on, or compact, a damaged shard). A damaged folder is refused
    with how to repair it."""
    bad = []
    for key, names in manifest.get("shards", {}).items():
        for name in names:
            path = output / key / name
            info = manifest.get("shard_info", {}).get(f"{key}/{name}", {})
            size = info.get("bytes")
            if not path.is_file() or (size is not None and path.stat().st_size != size):
                bad.append(f"{key}/{name}")
            elif digests and info.get("sha256") and sha256_file(path) != info["sha256"]:
                bad.append(f"{key}/{name}")
    if bad:
        raise DamagedDataset(
            f"{output}: {len(bad)} committed shard(s) are missing, truncated or altered (e.g. {bad[0]}); run "
            f"`qk-sniff repair {output}` to drop the examples they hold, then re-run to capture them again"
        )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict, fsync: bool = True, keep_previous: bool = False,
                      previous_too: bool = False) -> None:
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


def take_lock(output: Path, name: str = LOCK) -> int:
    """flock OUT/name (created if absent). `release_lock` deletes the file, so a lock taken on a
    file that another process deleted meanwhile is taken again on the file now at that name."""
    while True:
        fd = os.open(output / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLocked(f"another qk-sniff capture is writing to {output} (it holds {output / name})") from None
        try:
            same = os.stat(output / name).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def release_lock(output: Path, fd: int, name: str = LOCK) -> None:
    """Delete the lock file, then release it: a finished or failed command leaves no lock behind."""
    try:
        (Path(output) / name).unlink(missing_ok=True)
    except OSError:
        pass  # a read-only folder: the flock is released all the same
    os.close(fd)


def check_layout(output: Path, files: Files) -> None:
    """One folder is written either by one process or by ranks of one world size, never both."""
    parts = part_files(output)
    if files.rank is None:
        if parts:
            raise ValueError(
                f"{output} holds a capture written by ranks ({len(parts)} manifest part(s), e.g. {min(parts.values()).name}); "
                "resume it with the same launcher (torchrun / accelerate launch / --shard i/n), merge it with "
                f"`qk-sniff merge {output}`, or pass overwrite=True to start over"
            )
        return
    merged = read_manifest(output)
    if merged is not None and merged.get("examples") and (merged.get("ranks") or {}).get("world_size") != files.world_size:
        how = f"{merged['ranks']['world_size']} ranks" if merged.get("ranks") else "a single process"
        raise ValueError(f"{output} holds a capture written by {how}; this is rank {files.rank} of {files.world_size}. "
                         "Resume with the same number of ranks, use another output directory, or overwrite.")
    for rank, path in sorted(parts.items()):
        other = (read_manifest(output, path.name) or {}).get("part") or {}
        if other.get("world_size") != files.world_size:
            raise ValueError(
                f"{output}: {path.name} was written by rank {rank} of {other.get('world_size')}, this is rank {files.rank} "
                f"of {files.world_size}; documents are assigned by rank and world size, so resume with the same number "
                "of ranks (or use another output directory, or overwrite)"
            )


def remove_orphans(output: Path, manifest: dict, files: Files = Files()) -> list[Path]:
    """Delete this writer's shards that its manifest does not list (left by a killed run) and
    emptied folders (the single writer only: other ranks may be creating a folder right now)."""
    removed = []
    listed = {key: set(names) for key, names in manifest.get("shards", {}).items()}
    for folder in output.iterdir():
        if not folder.is_dir() or parse_key(folder.name) is None:
            continue
        for path in folder.iterdir():
            if path.is_file() and path.name not in listed.get(folder.name, ()) and files.owns(path.name):
                path.unlink()
                removed.append(path)
        if files.rank is None and not any(folder.iterdir()):
            folder.rmdir()
    if removed:
        logger.info("qk-sniff: removed %d uncommitted shard(s) of an interrupted run in %s", len(removed), output)
    return removed


def has_leftovers(output: Path) -> bool:
    """What a killed run (or compaction) leaves that the next open of the folder makes good: shards
    or temporary files no commit lists, an examples table behind the manifest, no card."""
    from qk_attn.storage.card import CARD
    from qk_attn.dataset.verify import check_examples_file

    manifest = read_manifest(output)
    if manifest is None:
        return False
    if not (output / CARD).exists() or check_examples_file(output, manifest):
        return True
    listed = {key: set(names) for key, names in manifest.get("shards", {}).items()}
    return any(path.name not in listed.get(folder.name, ()) and Files().owns(path.name)
               for folder in output.iterdir() if folder.is_dir() and parse_key(folder.name)
               for path in folder.iterdir())


def remove_dataset(output: Path, files: Files = Files()) -> None:
    """Delete what a capture wrote into OUT (and nothing else). A rank deletes only its own
    shards and manifest part; rank 0 also the merged manifest, the card and single-writer shards."""
    from qk_attn.storage.card import CARD_FILES

    ours = (MANIFEST, PREVIOUS, EXAMPLES)
    if files.rank is None:
        for child in output.iterdir():
            if child.is_dir() and parse_key(child.name) is not None:
                shutil.rmtree(child)
            elif child.name in (*ours, *CARD_FILES) or PART_FILES_RE.fullmatch(child.name):
                child.unlink()
        return
    owners = [files] + ([Files()] if files.rank == 0 else [])
    for folder in output.iterdir():
        if folder.is_dir() and parse_key(folder.name) is not None:
            for path in folder.iterdir():
                if path.is_file() and any(owner.owns(path.name) for owner in owners):
                    path.unlink()
    for name in [files.manifest, previous_name(files.manifest), files.examples] + ([*ours, *CARD_FILES] if files.rank == 0 else []):
        (output / name).unlink(missing_ok=True)


def shard_info(written) -> dict:
    """The manifest's record of one shard (a qk_attn.storage.shards.Written). A merged shard also records
    the segments of each row group (`row_groups`), so damage to one row group costs its examples only."""
    info = {"bytes": written.bytes, "sha256": written.sha256, "rows": written.rows, "segments": written.segments}
    if written.row_groups is not None:
        info["row_groups"], info["footer_sha256"] = written.row_groups, written.footer_sha256
    return info


def row_group_segments(manifest: dict, key: str, name: str, groups: int) -> list[list[int]] | None:
    """The segments of each of a shard's `groups` row groups; None when the record disagrees with the file."""
    info = manifest.get("shard_info", {}).get(f"{key}/{name}") or {}
    recorded = info.get("row_groups")
    if recorded is not None:
        return [list(group["segments"]) for group in recorded] if len(recorded) == groups else None
    return [shard_segments(manifest, key, name)] * groups


def segment_examples(manifest: dict, segments) -> set[int]:
    """The committed examples of these segments."""
    segments = set(segments)
    return {int(e) for e, i in manifest.get("example_info", {}).items() if i.get("segment") in segments}


def add_shard(manifest: dict, written) -> None:
    """List a newly committed shard: its name, record, rows and bucket counts."""
    key = written.key
    manifest["shards"].setdefault(key, []).append(written.name)
    manifest["shard_info"][f"{key}/{written.name}"] = shard_info(written)
    manifest["row_counts"][key] = manifest["row_counts"].get(key, 0) + written.rows
    kind_buckets = manifest["buckets"].setdefault(key[-1], {})
    for bucket, n in written.buckets.items():
        kind_buckets[str(bucket)] = kind_buckets.get(str(bucket), 0) + n


def shard_segments(manifest: dict, key: str, name: str) -> list[int]:
    """The segments whose examples a committed shard holds rows of. Shards written before
    `shard_info` existed: the segment in the shard's name."""
    info = manifest.get("shard_info", {}).get(f"{key}/{name}")
    if info is not None:
        return list(info.get("segments", ()))
    match = SHARD_RE.fullmatch(name.split("-", 1)[1] if name.startswith("r") else name)
    return [int(match[1])] if match else []


def shard_examples(manifest: dict, key: str, name: str) -> list[int]:
    """The examples a committed shard holds rows of, from the manifest alone (so also for a
    shard that is unreadable or gone). Empty for datasets written before `example_info`."""
    segments = set(shard_segments(manifest, key, name))
    return sorted(int(e) for e, i in manifest.get("example_info", {}).items() if i.get("segment") in segments)


def card_is_ours(output: Path) -> bool:
    """README.md is absent or a card qk-sniff wrote (a user's own README is never overwritten)."""
    from qk_attn.storage.card import CARD

    path = Path(output) / CARD
    if not path.exists():
        return True
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return "qk-attn" in text and "qk_sniff" in text  # the card's tag and its attn_implementation
