"""Which settings make a capture what it is: the resume check (same capture, same model) and
the public form of recorded values (no local paths published).

`setting_differences` gives the differences as data; `check_same_capture` words them for the
folder's writers, and a caller that checks before opening the folder (qk_attn.run.output_checks)
words the same differences in its own terms, without reading this module's message.

Local sources. A published manifest names a local dataset, tokenizer or model by its last part only
(`public_value`: no absolute local paths on the Hub), and a pulled copy must still resume, so
the recorded path cannot be what tells two local sources apart: /x/docs.jsonl and /y/docs.jsonl
are both `docs.jsonl (local)`. A new capture therefore also records a fingerprint of each local
source's files (`source_fingerprints`, the manifest's `source_files`: names, sizes and the sha256
of each file's first and last MiB; no paths), and the resume check compares that: the same files
resume wherever they lie (another folder, another machine), different files are refused. A
capture recorded before the fingerprint existed is compared by its full recorded path (refusing a
moved run rather than risking a mix), or by name only where a pull left nothing else.

A model's weights are fingerprinted by their whole content as well (`content_sha256`): a
fine-tune or LoRA merge saved over model.safetensors keeps its size and often its first and
last MiB. The file is hashed in CONTENT_CHUNK pieces on every core (hashlib releases the GIL),
the chunk digests combined in order. Records made before `content_sha256` existed are compared
by the sampled sha256 they hold (`same_files`), so those captures keep resuming.
"""

from __future__ import annotations

import glob
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Settings that do not change which rows are recorded or their values: a resumed run may differ in them.
NOT_IDENTITY = ("output", "backend", "pinned_mb")


SOURCE_NOT_IDENTITY = ("batch_size", "padding_side", "max_samples")

# Source keys that may name local files, and the run-configuration key that sets each.
LOCAL_SOURCES = {"dataset": "dataset.path", "tokenizer": "tokenizer.name", "model": "model.name"}
# Files of a tokenizer folder that make the tokenizer (a model folder's weights are not read).
TOKENIZER_FILE_PARTS = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece", "sentencepiece")
TOKENIZER_SUFFIXES = (".model", ".tiktoken", ".spm")
# Files of a model folder that make the model: its config and weights (not its tokenizer or card).
MODEL_FILES = ("config.json",)
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
SAMPLE_BYTES = 1 << 20  # read from each end of a file: a multi-GB dataset is fingerprinted in milliseconds
SAMPLE_BUDGET = 64 << 20  # read in all, so a folder of thousands of files costs no more
CONTENT_KEYS = ("model",)  # sources hashed whole: weights changed in the middle keep their size and ends
CONTENT_CHUNK = 64 << 20  # hashed on one core each, in parallel
READ_BYTES = 4 << 20  # read into one buffer per chunk: memory stays at cores x 4 MiB
_fingerprints: dict[tuple, dict] = {}  # by (key, files with their sizes and mtimes): output checks, then the sink


def identity(config: dict, source: dict | None) -> dict:
    out = {k: public_value(v) for k, v in config.items() if k not in NOT_IDENTITY}
    if out.get("head_sample_count") is None:  # the seed of no head sample selects nothing: every head is recorded
        out.pop("head_sample_seed", None)
    if source:  # a pushed (then pulled) manifest names local files by their last part
        out.update({f"source.{k}": public_value(v) for k, v in source.items() if k not in SOURCE_NOT_IDENTITY})
    return out


def record_latest_run(manifest: dict, config, source: dict | None) -> None:
    """A resumed run may differ in the settings that are not identity: the manifest (and so the card)
    records the latest run's, as it does its versions."""
    latest = config.to_dict()
    manifest["config"].update({k: latest[k] for k in NOT_IDENTITY if k in manifest["config"] and k in latest})
    if source and manifest.get("source"):
        manifest["source"].update({k: source[k] for k in SOURCE_NOT_IDENTITY if k in source})


def public_value(value):
    """A value fit for publishing: an absolute local path becomes its last part, marked local."""
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return f"{Path(value).name} (local)"
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_value(v) for v in value]
    return value


def is_repo_id(value: str) -> bool:
    """Whether `value` can be a Hub repo id (NAME or ORG/NAME); a value that cannot is a local path
    (absolute, `~`, `./`, several `/`, ...), whether or not it exists."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def public_manifest(manifest: dict) -> dict:
    """The manifest as pushed: no absolute local paths (the dataset, model or tokenizer a capture
    was made from locally are named by their last part)."""
    out = dict(manifest)
    for field in ("config", "source", "model", "plan"):
        if out.get(field) is not None:
            out[field] = public_value(out[field])
    return out


@dataclass(frozen=True)
class SettingDifference:
    """One identity setting whose value differs: recorded in the folder (`there`) vs this run (`now`)."""

    setting: str  # a SniffConfig field, or `source.<key>` for the dataset a run reads
    there: Any
    now: Any


def setting_differences(manifest: dict, config, source: dict | None) -> list[SettingDifference]:
    """Every identity setting (see `identity`) that differs between `manifest` and a run of
    `config` (a SniffConfig) over `source`, sorted by name; empty when the run may resume.
    The source is compared only when both sides name one; its local files by their fingerprint
    (see the module docstring), named by their run-configuration key (`dataset.path`)."""
    recorded = manifest.get("source")
    old = identity(manifest.get("config", {}), recorded if source else None)
    new = identity(config.to_dict(), source if recorded else None)
    out = {k: SettingDifference(k, old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
    if source and recorded:
        for key, setting in LOCAL_SOURCES.items():
            decided, difference = _local_difference(manifest, key, setting, recorded.get(key), source.get(key))
            if decided:  # replaces the comparison of names
                out.pop(f"source.{key}", None)
                if difference is not None:
                    out[setting] = difference
    return [out[k] for k in sorted(out)]


def source_fingerprints(source: dict | None) -> dict[str, dict]:
    """{source key: fingerprint} of the sources in `source` that are local files (see
    `local_fingerprint`); what a new manifest records as `source_files`."""
    out = {}
    for key in LOCAL_SOURCES:
        fingerprint = local_fingerprint((source or {}).get(key), key)
        if fingerprint is not None:
            out[key] = fingerprint
    return out


def local_fingerprint(value, key: str = "dataset") -> dict | None:
    """{"files", "bytes", "sha256"} of the local file, folder or glob `value` names, None when it
    names none (a Hub id). The sha256 covers each file's name (relative to the folder or glob),
    size, and first and last SAMPLE_BYTES (fewer when there are many files), in name order: it
    holds no path, so the same files elsewhere give the same fingerprint. Hidden files are left
    out; of a tokenizer folder (`key` "tokenizer"), only the tokenizer's own files. A model
    (`key` in CONTENT_KEYS) also gets "content_sha256", over the whole of every file."""
    if not isinstance(value, str) or not value:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    elif os.path.isdir(path):
        files = _folder_files(path, key)
    elif any(ch in path for ch in "*?["):
        base = os.path.dirname(path[: min(path.index(ch) for ch in "*?[" if ch in path)])
        files = [(os.path.relpath(f, base), f) for f in sorted(glob.glob(path, recursive=True)) if os.path.isfile(f)]
    else:
        return None
    if not files:
        return None
    try:
        stats = tuple((name, os.path.abspath(f), *_size_and_time(f)) for name, f in files)
        if (key, stats) not in _fingerprints:
            sizes = [s[2] for s in stats]
            fingerprint = _fingerprint(files, sizes)
            if key in CONTENT_KEYS:
                fingerprint["content_sha256"] = _content_sha256(files, sizes)
            _fingerprints[(key, stats)] = fingerprint
    except OSError:  # unreadable here: the checks that read it say why
        return None
    return _fingerprints[(key, stats)]


def _folder_files(folder: str, key: str) -> list[tuple[str, str]]:
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [(os.path.relpath(os.path.join(parent, n), folder), os.path.join(parent, n)) for n in names]
    files = sorted(f for f in files if not os.path.basename(f[0]).startswith("."))
    if key == "tokenizer":
        own = [
            f
            for f in files
            if any(part in f[0].lower() for part in TOKENIZER_FILE_PARTS) or f[0].lower().endswith(TOKENIZER_SUFFIXES)
        ]
        files = own or files
    elif key == "model":
        files = [f for f in files if os.path.basename(f[0]) in MODEL_FILES or f[0].endswith(MODEL_SUFFIXES)] or files
    return files


def _size_and_time(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _fingerprint(files: list[tuple[str, str]], sizes: list[int]) -> dict:
    sample = max(4096, min(SAMPLE_BYTES, SAMPLE_BUDGET // (2 * len(files))))
    digest = hashlib.sha256()
    for (name, path), size in zip(files, sizes):
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(sample))
            if size > sample:
                f.seek(max(sample, size - sample))
                digest.update(f.read(sample))
    return {"files": len(files), "bytes": sum(sizes), "sha256": digest.hexdigest()}


def _content_sha256(files: list[tuple[str, str]], sizes: list[int]) -> str:
    """sha256 over each file's name and size and the sha256 of each of its CONTENT_CHUNK chunks,
    in order (a tree hash: the chunks are hashed on every core at once)."""
    chunks = [
        (path, start, min(CONTENT_CHUNK, size - start))
        for (_, path), size in zip(files, sizes)
        for start in range(0, size, CONTENT_CHUNK)
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(len(chunks), os.cpu_count() or 1))) as pool:
        digests = iter(pool.map(_chunk_sha256, chunks))
        digest = hashlib.sha256()
        for (name, _), size in zip(files, sizes):
            digest.update(f"{name}\0{size}\0".encode())
            for _ in range(0, size, CONTENT_CHUNK):
                digest.update(next(digests))
    return digest.hexdigest()


def _chunk_sha256(chunk: tuple[str, int, int]) -> bytes:
    path, start, length = chunk
    digest = hashlib.sha256()
    view = memoryview(bytearray(READ_BYTES))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while length > 0:
            read = f.readinto(view[: min(READ_BYTES, length)])
            if not read:  # cut short while read: unreadable as recorded
                raise OSError(f"{path} is shorter than its size")
            digest.update(view[:read])
            length -= read
    return digest.digest()


def same_files(recorded: dict, now: dict) -> bool:
    """Whether two fingerprints are of the same files: by their whole content where both hold it,
    else by the sampled sha256 (a record made before content hashes: that capture keeps resuming)."""
    digest = "content_sha256" if "content_sha256" in recorded and "content_sha256" in now else "sha256"
    return all(recorded.get(k) == now.get(k) for k in ("files", "bytes", digest))


def fingerprint_digest(fingerprint: dict) -> str:
    """The digest that names a fingerprint's files in messages: the content hash where there is one."""
    return fingerprint.get("content_sha256") or fingerprint["sha256"]


def _local_difference(manifest: dict, key: str, setting: str, there, now) -> tuple[bool, SettingDifference | None]:
    """(decided, the difference or None) for the local source `key`; not decided when `now` names
    no local file, or when only the name recorded by a pull is known (compared as `public_value`)."""
    now_fingerprint = local_fingerprint(now, key)
    if now_fingerprint is None:
        return False, None
    recorded = (manifest.get("source_files") or {}).get(key)
    if recorded is not None:
        if same_files(recorded, now_fingerprint):
            return True, None  # the same files, wherever they are now
        return True, SettingDifference(setting, _described(there, recorded), _described(now, now_fingerprint))
    if isinstance(there, str) and not there.endswith(" (local)"):  # recorded before fingerprints: its full path
        same = _normal_path(there) == _normal_path(now)
        return True, None if same else SettingDifference(setting, there, now)
    return False, None


def _normal_path(value: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(value)))


def _described(value, fingerprint: dict) -> str:
    files = f" in {fingerprint['files']} files" if fingerprint["files"] > 1 else ""
    return f"{value} ({fingerprint['bytes']:,} bytes{files}, fingerprint {fingerprint_digest(fingerprint)[:12]})"


def check_same_capture(output: Path, manifest: dict, config, source: dict | None) -> None:
    """Refuse to mix two different captures in one folder; the message names every difference."""
    differences = setting_differences(manifest, config, source)
    if differences:  # one line, as the run's own check words it (qk_attn.run.output_checks)
        named = getattr(config, "setting_name", lambda setting: setting)  # (QK_SNIFF_SAMPLER where it came from there)
        diffs = "; ".join(f"{named(d.setting)}: {d.there!r} there, {d.now!r} now" for d in differences)
        raise ValueError(
            f"{output} already holds a qk-sniff capture with different settings ({diffs}); re-run with the same "
            "settings to resume it, choose another output directory, or pass overwrite=True (run config: "
            "output.overwrite: true) to delete the existing capture and start over"
        )


MODEL_SHAPE = ("num_layers", "num_heads", "num_kv_heads", "head_dim")


def other_model(manifest: dict, model: dict) -> dict | None:
    """The model `manifest` records when it is not `model` ({id, revision, dtype, model_type}); None
    when it is the same or none is recorded. A commit hash identifies the weights; without one on
    both sides, the name has to do. Another architecture or dtype is another model in any case (a
    model built in code has no name)."""
    old = manifest.get("model")
    if not old:
        return None
    if old.get("revision") and model.get("revision"):
        differs = old["revision"] != model["revision"]
    elif old.get("files") and model.get("files"):  # local folders: the same files anywhere are the same model
        differs = not same_files(old["files"], model["files"])
    else:
        differs = old.get("id") != model.get("id")
    for key in ("model_type", "dtype"):
        differs = differs or (old.get(key) and model.get(key) and old[key] != model[key])
    return old if differs else None


def shape_differences(manifest: dict, plan: dict) -> list[SettingDifference]:
    """Each of MODEL_SHAPE that `manifest`'s plan records with another value than `plan` has."""
    old_plan = manifest.get("plan") or {}
    return [SettingDifference(k, old_plan[k], plan[k]) for k in MODEL_SHAPE if k in old_plan and old_plan[k] != plan[k]]


def _model_words(model: dict) -> str:
    files = f", weight files sha256 {fingerprint_digest(model['files'])[:12]}..." if model.get("files") else ""
    return f"{model.get('id')!r} ({model.get('model_type')}, {model.get('dtype')}, revision {model.get('revision')}{files})"


def check_same_model(output: Path, manifest: dict, model: dict, plan: dict) -> None:
    """Refuse rows of another model (or another shape) than OUT already holds."""
    old = other_model(manifest, model)
    if old is not None:
        raise ValueError(
            f"{output} holds captures of model {_model_words(old)}; this run uses {_model_words(model)}. Use another "
            "output directory or overwrite=True to start over."
        )
    shape = MODEL_SHAPE
    old_plan = manifest.get("plan") or {}
    if shape_differences(manifest, plan):
        raise ValueError(
            f"{output} holds captures of a model shaped {[old_plan.get(k) for k in shape]} "
            f"({', '.join(shape)}); this model is {[plan[k] for k in shape]}"
        )
