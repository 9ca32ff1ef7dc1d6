"""`ParquetSink`: capture batches -> transfer -> saver thread -> Parquet shards + manifest (DESIGN §5).

    OUT/qk_sniff.json                        manifest: the only record of what is committed
    OUT/.qk_sniff.lock                       flock'd while a sink writes here (one writer per folder)
    OUT/l{LL}h{HH}{q|k}/sNNNNNN-pNNNN.parquet committed shards (listed in the manifest)
    OUT/l{LL}h{HH}{q|k}/.sNNNNNN-pNNNN.parquet.tmp  shards of the open segment (not committed yet)

Commit protocol. Rows accumulate in an open *segment*: per-(layer, head, kind) buffers in
host memory, spilled to `.tmp` shards when they exceed `buffer_mb`. `commit(ids)` marks
examples complete. A segment is finalised once every example with rows in it is complete
(and `commit_every_s` has passed, or at `flush()`/`close()`): remaining buffers are written,
every `.tmp` shard is fsync'd and renamed, then the manifest — listing those shards and the
examples — replaces the old one atomically. A shard the manifest does not list is an orphan
of a killed run and is deleted when the folder is opened again, so re-running a killed
capture redoes exactly the examples that were not committed and never duplicates a row.
`close()` also merges small committed shards (one segment per commit interval makes many)
into shards of about `shard_mb`, with the same rename-then-manifest order.

Ranks (qk_attn.distributed). With `rank=(r, n)` the sink is one of n writers into the same
OUT and touches only its own files: shards `r{RRR}-sNNNNNN-pNNNN.parquet`, the manifest part
`qk_sniff.rank{RRR}.json`, the lock `.qk_sniff.rank{RRR}.lock`; it writes no card. The
parts are merged into `qk_sniff.json` and the card once every rank has finished.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import SniffConfig
from .rows import CaptureBatch, CaptureOverflow, HostRows
from .transfer import Piece, Transfer

logger = logging.getLogger(__name__)

MANIFEST = "qk_sniff.json"
LOCK = ".qk_sniff.lock"
FORMAT = 1
KEY_RE = re.compile(r"l(\d+)h(\d+)([qk])")
SHARD_RE = re.compile(r"s(\d+)-p(\d+)\.parquet")
PART_RE = re.compile(r"qk_sniff\.rank(\d+)\.json")
# Settings that do not change which rows are recorded or their values: a resumed run may differ in them.
NOT_IDENTITY = ("output", "backend", "pinned_mb")
SOURCE_NOT_IDENTITY = ("batch_size", "padding_side", "max_samples")
ROW_GROUP_BYTES = 32 << 20
# zstd level 1 with BYTE_STREAM_SPLIT on the vectors was the smallest and fastest option measured
# (float32 vectors of a bf16 model: 34% of raw size, vs 49% zstd plain, 45% lz4+BSS, 72% snappy).
WRITE_OPTIONS = dict(
    compression="zstd",
    compression_level=1,
    use_dictionary=["kind"],
    column_encoding={"vector.list.element": "BYTE_STREAM_SPLIT"},
    write_statistics=["example_id", "position", "bucket", "layer", "head"],
)


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


class OutputLocked(RuntimeError):
    """Another capture holds the output folder's lock."""


class SaverError(RuntimeError):
    """The saver thread failed; raised in the capturing thread at its next call."""


def read_manifest(output: str | Path, name: str = MANIFEST) -> dict | None:
    path = Path(output) / name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable qk-sniff manifest ({error}); move it away or pass overwrite=True") from error


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from . import __version__

    out = {"qk_attn": __version__, "torch": torch.__version__, "pyarrow": pa.__version__}
    for name in ("transformers", "datasets", "huggingface_hub"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _identity(config: dict, source: dict | None) -> dict:
    out = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    if source:
        out.update({f"source.{k}": v for k, v in source.items() if k not in SOURCE_NOT_IDENTITY})
    return out


def _check_same_capture(output: Path, manifest: dict, config: SniffConfig, source: dict | None) -> None:
    """Refuse to mix two different captures in one folder; the message names every difference."""
    old = _identity(manifest.get("config", {}), manifest.get("source") if source else None)
    new = _identity(config.to_dict(), source if manifest.get("source") else None)
    diffs = [f"  {k}: {old.get(k)!r} in {output}, {new.get(k)!r} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(
            f"{output} already holds a qk-sniff capture with different settings:\n" + "\n".join(diffs) + "\n"
            "Re-run with the same settings to resume it, choose another output directory, or pass overwrite=True "
            "(run config: output.overwrite: true) to delete the existing capture and start over."
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict, fsync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


def _write_parquet(table: pa.Table, path: Path, fsync: bool) -> None:
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    pq.write_table(table, path, row_group_size=max(1024, ROW_GROUP_BYTES // row_bytes), **WRITE_OPTIONS)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _bucket_counts(table: pa.Table) -> Counter:
    buckets = table.column("bucket").to_numpy()
    counts = np.bincount(buckets) if len(buckets) else np.zeros(0, np.int64)
    return Counter({int(b): int(n) for b, n in enumerate(counts) if n})


@dataclass
class _Part:
    """One written shard of the open segment (temporary name until the segment is finalised)."""

    name: str  # final file name inside its key folder
    rows: int
    buckets: Counter


@dataclass
class _Segment:
    number: int
    started: float = field(default_factory=time.monotonic)
    buffers: dict[str, list[pa.Table]] = field(default_factory=lambda: defaultdict(list))
    buffered_bytes: int = 0
    written_bytes: int = 0  # in-memory size of what was spilled to temporary shards
    parts: dict[str, list[_Part]] = field(default_factory=lambda: defaultdict(list))
    examples: set[int] = field(default_factory=set)  # every example seen in this segment
    valid: dict[int, dict[tuple[int, str], int]] = field(default_factory=lambda: defaultdict(Counter))
    calls: Counter = field(default_factory=Counter)  # key -> attention calls seen
    cross_attention_layers: set[int] = field(default_factory=set)  # layers whose keys are vision tokens
    next_part: int = 0


class _Flush:
    def __init__(self, final: bool) -> None:
        self.final = final
        self.done = threading.Event()


_STOP = object()


class ParquetSink:
    """Writes capture batches of one model into OUT as a Parquet dataset with a manifest and card.

    Thread model: `put`/`commit`/`flush`/`close` are called by the capturing thread; `put`
    only issues copies into the bounded host pool (blocking when it is full) and enqueues
    them. One saver thread turns them into shards. Its first error is re-raised by every
    later `put`/`commit`/`check`/`flush`/`close`.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        config: SniffConfig,
        overwrite: bool = False,
        source: dict | None = None,
        *,
        buffer_mb: int = 256,
        commit_every_s: float = 60.0,
        shard_mb: int = 128,
        fsync: bool = True,
        rank: tuple[int, int] | None = None,
    ) -> None:
        self.output = Path(output)
        self.config = config
        self.files = Files() if rank is None else Files(*rank)
        self.complete = False  # set by a runner that went through every document it owns (rank parts record it)
        self.vector_type = pa.float16() if config.vector_dtype == "float16" else pa.float32()
        self.buffer_bytes = buffer_mb << 20
        self.commit_every_s = commit_every_s
        self.shard_bytes = shard_mb << 20
        self.fsync = fsync
        self.rows_written = 0  # rows accepted by the saver (all heads), for progress bars
        self.max_buffered_bytes = 0  # high-water mark of rows held in host memory (bounded by buffer_mb)
        self.output.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _take_lock(self.output, self.files.lock)
        try:
            if overwrite:
                remove_dataset(self.output, self.files)
            else:  # (under overwrite another rank may not have removed its old files yet)
                _check_layout(self.output, self.files)
            manifest = read_manifest(self.output, self.files.manifest)
            if manifest is not None:
                _check_same_capture(self.output, manifest, config, source)
                manifest["versions"] = versions()  # of the latest run writing here
            else:
                manifest = self._new_manifest(source)
            if self.files.rank is not None:
                manifest["part"] = {"rank": self.files.rank, "world_size": self.files.world_size, "complete": False}
            self.removed_orphans = remove_orphans(self.output, manifest, self.files)
            write_json_atomic(self.output / self.files.manifest, manifest, fsync)  # also proves OUT is writable
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._manifest = manifest
        self._manifest_lock = threading.Lock()
        self._durable = {int(i) for i in manifest["examples"]}
        self._durable_array = np.array(sorted(self._durable), dtype=np.int64)
        self._ready: set[int] = set()
        self._segment = _Segment(manifest["next_segment"])
        self._transfer = Transfer(config.pinned_mb << 20)
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self._warned_duplicates = False
        self._thread = threading.Thread(target=self._run, name="qk-sniff-saver", daemon=True)
        self._thread.start()

    # ---- the capturing thread ----------------------------------------------------------
    def committed_ids(self) -> set[int]:
        """Examples already committed (by this run or an earlier one): a resuming run skips them."""
        with self._manifest_lock:  # the saver thread updates both sets
            return set(self._durable) | set(self._ready)

    def bind_model(self, model_config, plan) -> None:
        """Record the model and head plan (first captured call); refuse a different model than OUT holds."""
        model = {
            "id": getattr(model_config, "_name_or_path", None) or None,
            "revision": getattr(model_config, "_commit_hash", None),
            "dtype": str(getattr(model_config, "dtype", None) or "").replace("torch.", "") or None,
            "model_type": getattr(model_config, "model_type", None),
        }
        plan_dict = plan.to_dict()
        with self._manifest_lock:
            old = self._manifest.get("model")
            if old and self._manifest["examples"]:
                # A commit hash identifies the weights; without one on both sides, the name has to do.
                both = old.get("revision") and model["revision"]
                if (old["revision"] != model["revision"]) if both else (old.get("id") != model["id"]):
                    raise ValueError(
                        f"{self.output} holds captures of model {old.get('id')!r} (revision {old.get('revision')}); "
                        f"this run uses {model['id']!r} (revision {model['revision']}). Use another output directory "
                        "or overwrite=True to start over."
                    )
                shape = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
                old_plan = self._manifest.get("plan") or {}
                if any(old_plan.get(k) != plan_dict[k] for k in shape if k in old_plan):
                    raise ValueError(
                        f"{self.output} holds captures of a model shaped {[old_plan.get(k) for k in shape]} "
                        f"({', '.join(shape)}); this model is {[plan_dict[k] for k in shape]}"
                    )
            self._manifest["model"] = model
            self._manifest["plan"] = plan_dict

    def put(self, batch: CaptureBatch) -> None:
        """Hand one batch on (called inside the attention call; never reads device values)."""
        self.check()
        if self._closed:
            raise RuntimeError(f"the qk-sniff sink for {self.output} is closed")
        for piece in self._transfer.pieces(batch, self.check):
            self._queue.put(piece)

    def commit(self, example_ids) -> None:
        """These examples are complete; they become durable with the next finalised segment."""
        self.check()
        self._queue.put(("commit", [int(i) for i in example_ids]))

    def flush(self, timeout: float | None = None) -> None:
        """Make every committed example durable now, and wait for it (re-raises saver errors)."""
        self.check()
        self._wait(_Flush(final=False), timeout)

    def check(self) -> None:
        """Re-raise the saver thread's error, if it had one."""
        error = self._error
        if error is None:
            return
        if isinstance(error, CaptureOverflow):
            raise CaptureOverflow(str(error)) from error
        raise SaverError(
            f"qk-sniff saver for {self.output} failed: {type(error).__name__}: {error}. Examples committed before "
            "the failure are safe in the manifest; re-run the same command to resume the rest."
        ) from error

    def close(self) -> None:
        """Commit everything committed so far, write the card, stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._error is None:
                self._wait(_Flush(final=True), None)
        finally:
            self._queue.put(_STOP)
            self._thread.join()
            os.close(self._lock_fd)
        self.check()

    @property
    def manifest(self) -> dict:
        with self._manifest_lock:
            return json.loads(json.dumps(self._manifest))

    def _wait(self, flush: _Flush, timeout: float | None) -> None:
        self._queue.put(flush)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not flush.done.wait(0.05):
            self.check()
            if not self._thread.is_alive():
                raise SaverError(f"qk-sniff saver thread for {self.output} is not running")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"qk-sniff saver did not finish flushing {self.output} within {timeout} s")
        self.check()

    # ---- the saver thread --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if self._error is None:
                    self._handle(item)
            except BaseException as error:  # noqa: BLE001 - surfaced in the caller by check()
                logger.error("qk-sniff saver failed: %r", error)
                self._error = error
            finally:
                # Free pool space and wake waiters even after an error: a producer must never hang.
                if isinstance(item, Piece):
                    item.release()
                elif isinstance(item, _Flush):
                    item.done.set()

    def _handle(self, item) -> None:
        if isinstance(item, Piece):
            item.wait()
            self._accept(item.rows(), item.first)
        elif isinstance(item, _Flush):
            self._finalize(discard_incomplete=item.final, force=True)
            if item.final:
                self._compact()
                with self._manifest_lock:
                    manifest = json.loads(json.dumps(self._manifest))
                if self.files.rank is None:
                    from .card import write_card

                    write_card(self.output, manifest)
                else:  # the card is written when the parts are merged
                    manifest["part"]["complete"] = self.complete
                    write_json_atomic(self.output / self.files.manifest, manifest, self.fsync)
                    with self._manifest_lock:
                        self._manifest = manifest
        else:
            _, ids = item
            with self._manifest_lock:
                self._ready.update(i for i in ids if i not in self._durable)
            seg = self._segment
            due = time.monotonic() - seg.started >= self.commit_every_s
            big = seg.buffered_bytes + seg.written_bytes > self.shard_bytes
            if due or big:
                self._finalize(discard_incomplete=False, force=False)

    def _accept(self, rows: HostRows, first: bool) -> None:
        seg = self._segment
        if first:
            seg.examples.update(int(i) for i in rows.valid)
            if rows.cross_attention:
                seg.cross_attention_layers.add(rows.layer)
            else:  # cross-attention keys are image tokens, not text length
                for example, valid in rows.valid.items():
                    seg.valid[int(example)][(rows.layer, rows.kind)] += int(valid)
        keep = None
        if len(rows) and len(self._durable_array):
            duplicate = np.isin(rows.example_id, self._durable_array)
            if duplicate.any():
                if not self._warned_duplicates:
                    logger.warning("qk-sniff: dropping rows of already committed examples (e.g. %d)", rows.example_id[duplicate][0])
                    self._warned_duplicates = True
                keep = ~duplicate
                rows = dataclasses.replace(rows, example_id=rows.example_id[keep], position=rows.position[keep], bucket=rows.bucket[keep])
        storage = self.vector_type.to_pandas_dtype()
        for index, head in enumerate(rows.heads):
            key = key_name(rows.layer, head, rows.kind)
            if first:
                seg.calls[key] += 1
            if not len(rows):
                continue
            vectors = rows.vectors[index] if keep is None else rows.vectors[index][keep]
            # Copy out of the host pool now: the piece's region is reused after this returns.
            one = dataclasses.replace(rows, heads=(head,), vectors=np.array(vectors, dtype=storage)[None])
            table = one.table(0, self.vector_type)
            seg.buffers[key].append(table)
            seg.buffered_bytes += table.nbytes
        self.rows_written += len(rows) * len(rows.heads)
        self.max_buffered_bytes = max(self.max_buffered_bytes, seg.buffered_bytes)
        if seg.buffered_bytes > self.buffer_bytes:
            self._spill(until=self.buffer_bytes // 2)

    def _spill(self, until: int) -> None:
        """Write the largest buffers to temporary shards until at most `until` bytes stay buffered."""
        seg = self._segment
        sizes = sorted(((sum(t.nbytes for t in tables), key) for key, tables in seg.buffers.items() if tables), reverse=True)
        for size, key in sizes:
            if seg.buffered_bytes <= until and until > 0:
                break
            self._write_part(key, pa.concat_tables(seg.buffers.pop(key)))
            seg.buffered_bytes -= size

    def _write_part(self, key: str, table: pa.Table) -> None:
        seg = self._segment
        name = self.files.shard(seg.number, seg.next_part)
        seg.next_part += 1
        folder = self.output / key
        folder.mkdir(exist_ok=True)
        _write_parquet(table, folder / f".{name}.tmp", self.fsync)
        seg.parts[key].append(_Part(name, table.num_rows, _bucket_counts(table)))
        seg.written_bytes += table.nbytes

    def _finalize(self, discard_incomplete: bool, force: bool) -> None:
        """Commit the open segment if every example in it is complete (see the module docstring)."""
        seg = self._segment
        incomplete = seg.examples - self._ready - self._durable
        if incomplete and not discard_incomplete:
            if force:  # flush(): write what is buffered (surfaces I/O errors now), commit later
                self._spill(until=0)
            return
        if not self._ready and not seg.examples:
            return
        if incomplete:
            logger.warning("qk-sniff: %d example(s) were never committed; their rows are not kept", len(incomplete))
            self._drop_examples(incomplete)
        self._spill(until=0)
        with self._manifest_lock:
            manifest = json.loads(json.dumps(self._manifest))
        for key, parts in seg.parts.items():
            folder = self.output / key
            for part in parts:
                os.replace(folder / f".{part.name}.tmp", folder / part.name)
            if self.fsync:
                _fsync_dir(folder)
            manifest["shards"].setdefault(key, []).extend(p.name for p in parts)
            manifest["row_counts"][key] = manifest["row_counts"].get(key, 0) + sum(p.rows for p in parts)
            kind_buckets = manifest["buckets"].setdefault(key[-1], {})
            for part in parts:
                for bucket, n in part.buckets.items():
                    kind_buckets[str(bucket)] = kind_buckets.get(str(bucket), 0) + n
        for key, n in seg.calls.items():
            manifest["calls"][key] = manifest["calls"].get(key, 0) + n
        for example in sorted(self._ready):
            counts = seg.valid.get(example)
            manifest["examples"][str(example)] = counts[min(counts)] if counts else 0
        if seg.cross_attention_layers:
            manifest["cross_attention_layers"] = sorted(set(manifest.get("cross_attention_layers", [])) | seg.cross_attention_layers)
        manifest["next_segment"] = seg.number + 1
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json_atomic(self.output / self.files.manifest, manifest, self.fsync)
        with self._manifest_lock:
            # bind_model may have changed model/plan meanwhile: keep the newest of those.
            manifest["model"], manifest["plan"] = self._manifest.get("model"), self._manifest.get("plan")
            self._manifest = manifest
            self._durable |= self._ready
            self._ready = set()
        self._durable_array = np.array(sorted(self._durable), dtype=np.int64)
        self._segment = _Segment(seg.number + 1)

    def _drop_examples(self, examples: set[int]) -> None:
        """Remove the rows of `examples` from the open segment (buffers and temporary shards)."""
        seg = self._segment
        drop = pa.array(sorted(examples), pa.int64())
        keep = lambda t: t.filter(pc.invert(pc.is_in(t.column("example_id"), drop)))  # noqa: E731
        for key, tables in list(seg.buffers.items()):
            seg.buffers[key] = [t for t in map(keep, tables) if t.num_rows]
        seg.buffered_bytes = sum(t.nbytes for tables in seg.buffers.values() for t in tables)
        for key, parts in seg.parts.items():
            for part in list(parts):
                path = self.output / key / f".{part.name}.tmp"
                table = keep(pq.read_table(path))
                if table.num_rows:
                    _write_parquet(table, path, self.fsync)
                    part.rows, part.buckets = table.num_rows, _bucket_counts(table)
                else:
                    path.unlink()
                    parts.remove(part)
        for example in examples:
            seg.valid.pop(example, None)
        seg.examples -= examples

    def _compact(self) -> None:
        """Merge small committed shards of each folder into shards of about `shard_mb`."""
        with self._manifest_lock:
            manifest = json.loads(json.dumps(self._manifest))
        number = manifest["next_segment"]
        replaced: list[Path] = []
        for key, names in manifest["shards"].items():
            folder = self.output / key
            sizes = {n: (folder / n).stat().st_size for n in names}
            small = [n for n in names if sizes[n] < self.shard_bytes // 2]
            if len(small) < 2:
                continue
            groups, group, total = [], [], 0
            for name in small:
                if group and total + sizes[name] > self.shard_bytes:
                    groups.append(group)
                    group, total = [], 0
                group.append(name)
                total += sizes[name]
            groups.append(group)
            kept = [n for n in names if n not in small]
            for index, group in enumerate(groups):
                if len(group) == 1:
                    kept.append(group[0])
                    continue
                name = self.files.shard(number, index)
                table = pa.concat_tables(pq.read_table(folder / n) for n in group)
                _write_parquet(table, folder / f".{name}.tmp", self.fsync)
                os.replace(folder / f".{name}.tmp", folder / name)
                kept.append(name)
                replaced.extend(folder / n for n in group)
            if self.fsync:
                _fsync_dir(folder)
            manifest["shards"][key] = sorted(kept)
        if not replaced:
            return
        manifest["next_segment"] = number + 1
        write_json_atomic(self.output / self.files.manifest, manifest, self.fsync)
        with self._manifest_lock:
            self._manifest = manifest
        for path in replaced:  # orphans from here on: a crash now only leaves files the next open removes
            path.unlink()

    def _new_manifest(self, source: dict | None) -> dict:
        return {
            "format": FORMAT,
            "config": {k: v for k, v in self.config.to_dict().items() if k != "output"},  # no local paths
            "sampler": self.config.sampler_dict(),
            "vector_dtype": self.config.vector_dtype,
            "source": source,
            "versions": versions(),
            "model": None,
            "plan": None,
            "examples": {},  # example_id -> valid tokens (summed over the calls of one layer)
            "row_counts": {},  # l{LL}h{HH}{k} -> committed rows
            "calls": {},  # l{LL}h{HH}{k} -> attention calls seen for committed examples
            "buckets": {},  # kind -> bucket -> committed rows (all heads)
            "shards": {},  # l{LL}h{HH}{k} -> committed shard file names
            "next_segment": 0,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _take_lock(output: Path, name: str = LOCK) -> int:
    fd = os.open(output / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputLocked(f"another qk-sniff capture is writing to {output} (it holds {output / name})") from None
    return fd


def _check_layout(output: Path, files: Files) -> None:
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


def remove_dataset(output: Path, files: Files = Files()) -> None:
    """Delete what a capture wrote into OUT (and nothing else). A rank deletes only its own
    shards and manifest part; rank 0 also the merged manifest, the card and single-writer shards."""
    from .card import CARD_FILES

    if files.rank is None:
        for child in output.iterdir():
            if child.is_dir() and parse_key(child.name) is not None:
                shutil.rmtree(child)
            elif child.name in (MANIFEST, *CARD_FILES) or PART_RE.fullmatch(child.name):
                child.unlink()
        return
    owners = [files] + ([Files()] if files.rank == 0 else [])
    for folder in output.iterdir():
        if folder.is_dir() and parse_key(folder.name) is not None:
            for path in folder.iterdir():
                if path.is_file() and any(owner.owns(path.name) for owner in owners):
                    path.unlink()
    for name in [files.manifest] + ([MANIFEST, *CARD_FILES] if files.rank == 0 else []):
        (output / name).unlink(missing_ok=True)
