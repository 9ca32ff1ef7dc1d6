"""Writing rows: per-(layer, kind) buffers of numpy chunks -> one checksummed Parquet shard per head.

    saver thread:   call -> `CallBuffer.add` (one copy out of the host pool, nothing else)
    writer threads: `CallBuffer.key_buffer(head)` -> Arrow table (zero-copy over the chunks) -> Parquet bytes
                    (zstd-1 on vectors, positions and token ids; BYTE_STREAM_SPLIT vectors; the other
                    columns dictionary-encoded; page checksums) -> sha256 -> file
    commit:         `Writers.fsync` of all of a finalise's files at once, before they are renamed

pyarrow releases the GIL while it encodes and compresses, and hashlib while it hashes, so
shards of different folders are written in parallel by `Writers`. Which shards are committed
is not decided here (qk_attn.storage.manifest, qk_attn.storage.saver).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qk_attn.capture.schema import columns_table
from qk_attn.errors import CorruptShard
from qk_attn.storage.manifest import fsync_dir

ROW_GROUP_BYTES = 32 << 20
MIN_ROW_GROUP = 1024
# zstd level 1 with BYTE_STREAM_SPLIT on the vectors was the smallest and fastest option measured
# (float32 vectors of a bf16 model: 34% of raw size, vs 49% zstd plain, 45% lz4+BSS, 72% snappy).
# Only the columns it shrinks are compressed: the (nearly) constant ones are dictionary-encoded to a
# few bytes, and a zstd context per column chunk cost more than it saved (0.36 -> 0.24 ms to encode a
# 5-row shard, 1.34 -> 1.20 ms a 1024-row one; sizes within 0.1 kB). Page checksums let a reader
# (page_checksum_verification=True) find a damaged page.
_ZSTD = ("vector.list.element", "position", "token_id")
WRITE_OPTIONS = dict(
    compression={column: "zstd" for column in _ZSTD},
    compression_level={column: 1 for column in _ZSTD},
    use_dictionary=["example_id", "bucket", "layer", "head", "kind", "sliding_window", "token_str"],
    column_encoding={"vector.list.element": "BYTE_STREAM_SPLIT"},
    write_statistics=["example_id", "position", "bucket", "layer", "head"],
    write_page_checksum=True,
)


@dataclass
class Written:
    """One shard on disk (under its temporary name until committed)."""

    key: str
    name: str  # final file name inside the key folder
    rows: int
    bytes: int
    sha256: str
    buckets: Counter
    segments: list[int]
    row_groups: list[dict] | None = None  # merged shards: each row group's segments, byte range and sha256
    footer_sha256: str | None = None  # merged shards: of the bytes after the last row group


@dataclass
class KeyBuffer:
    """Rows of one (layer, head, kind) as one shard gets them: views of a `CallBuffer`'s chunks
    (`vectors` chunks flat (rows * head_dim,))."""

    layer: int
    head: int
    kind: str
    sliding_window: int | None
    head_dim: int
    example_id: list[np.ndarray]
    position: list[np.ndarray]
    bucket: list[np.ndarray]
    vectors: list[np.ndarray]
    token_id: list[np.ndarray | None]
    rows: int

    def table(self, vector_type: pa.DataType, token_ids: bool, vocabulary: pa.Array | None) -> pa.Table:
        return columns_table(
            self.example_id,
            self.position,
            self.bucket,
            self.vectors,
            self.token_id,
            self.layer,
            self.head,
            self.kind,
            self.sliding_window,
            self.head_dim,
            vector_type,
            token_ids,
            vocabulary,
        )

    def buckets(self) -> Counter:
        counts = np.bincount(np.concatenate(self.bucket)) if self.rows else np.zeros(0, np.int64)
        return Counter({int(b): int(n) for b, n in enumerate(counts) if n})


@dataclass
class CallBuffer:
    """Rows of one (layer, kind) for the heads its calls record, as the numpy chunks calls brought.

    One chunk per call: its small columns, and one copy of its (H, rows, D) vectors out of the
    host pool. A decode step adds one chunk per call instead of one per head; the split per head
    happens when a shard is written (`key_buffer`: views, no copy).
    """

    layer: int
    kind: str
    heads: tuple[int, ...]
    sliding_window: int | None
    head_dim: int
    example_id: list[np.ndarray] = field(default_factory=list)
    position: list[np.ndarray] = field(default_factory=list)
    bucket: list[np.ndarray] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)  # (H, rows, D) C-contiguous
    token_id: list[np.ndarray | None] = field(default_factory=list)
    rows: int = 0  # per head
    nbytes: int = 0

    def add(self, example_id, position, bucket, vectors, token_id) -> None:
        self.example_id.append(example_id)
        self.position.append(position)
        self.bucket.append(bucket)
        self.vectors.append(vectors)
        self.token_id.append(token_id)
        self.rows += len(position)
        self.nbytes += vectors.nbytes + 20 * len(position) * len(self.heads)

    def extend(self, other: CallBuffer) -> None:
        for name in ("example_id", "position", "bucket", "vectors", "token_id"):
            getattr(self, name).extend(getattr(other, name))
        self.rows += other.rows
        self.nbytes += other.nbytes

    def drop(self, examples: np.ndarray) -> None:
        """Remove the rows of `examples` (an example that was never committed)."""
        if not any(np.isin(ids, examples).any() for ids in self.example_id):
            return
        kept = CallBuffer(self.layer, self.kind, self.heads, self.sliding_window, self.head_dim)
        for ids, pos, bucket, vec, tok in zip(self.example_id, self.position, self.bucket, self.vectors, self.token_id):
            keep = ~np.isin(ids, examples)
            if keep.any():
                kept.add(ids[keep], pos[keep], bucket[keep], vec[:, keep], None if tok is None else tok[keep])
        self.__dict__.update(kept.__dict__)

    def key_buffer(self, index: int) -> KeyBuffer:
        """The rows of head `self.heads[index]`."""
        return KeyBuffer(
            self.layer,
            self.heads[index],
            self.kind,
            self.sliding_window,
            self.head_dim,
            self.example_id,
            self.position,
            self.bucket,
            [chunk[index].reshape(-1) for chunk in self.vectors],
            self.token_id,
            self.rows,
        )


def write_table(table: pa.Table, path: Path, fsync: bool, options: dict | None = None) -> tuple[int, str]:
    """Write `table` as one Parquet file; returns (size, sha256) of exactly the bytes written.

    The file is encoded in memory first, so the digest costs no second read of the file. `options`:
    pyarrow's writer options (default: the shards' WRITE_OPTIONS).
    """
    rows = MIN_ROW_GROUP  # small tables (most shards of sparse samplers) skip the costly nbytes
    if table.num_rows > MIN_ROW_GROUP:
        rows = max(MIN_ROW_GROUP, ROW_GROUP_BYTES // max(1, table.nbytes // table.num_rows))
    out = pa.BufferOutputStream()
    pq.write_table(table, out, row_group_size=rows, **(options or WRITE_OPTIONS))
    data = out.getvalue()
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return data.size, digest


def write_row_groups(groups, path: Path, fsync: bool) -> tuple[int, str, int, list[dict], str]:
    """Write each table of `groups` as exactly one row group of one Parquet file (merges and
    repairs keep the row groups they read, so a row group still holds known segments). Returns
    (size, sha256, rows, [{"offset", "bytes", "sha256"} of each row group], sha256 of the footer)
    of exactly the bytes written: `repair` keeps a damaged shard's row groups whose bytes match."""
    out = pa.BufferOutputStream()
    writer, rows = None, 0
    for table in groups:
        if writer is None:
            writer = pq.ParquetWriter(out, table.schema, **WRITE_OPTIONS)
        writer.write_table(table, row_group_size=max(1, table.num_rows))
        rows += table.num_rows
    writer.close()
    data = out.getvalue()
    view = memoryview(data)
    ranges = row_group_ranges(pq.read_metadata(pa.BufferReader(data)))
    parts = [
        {"offset": start, "bytes": end - start, "sha256": hashlib.sha256(view[start:end]).hexdigest()}
        for start, end in ranges
    ]
    footer = hashlib.sha256(view[ranges[-1][1] if ranges else 0 :]).hexdigest()
    digest = hashlib.sha256(view).hexdigest()
    with open(path, "wb") as f:
        f.write(view)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return data.size, digest, rows, parts, footer


def row_group_ranges(metadata) -> list[tuple[int, int]]:
    """[start, end) bytes of each row group's column chunks."""
    out = []
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        columns = [group.column(c) for c in range(group.num_columns)]
        starts = [
            c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset else c.data_page_offset
            for c in columns
        ]
        start = min(starts)
        out.append((start, max(s + c.total_compressed_size for s, c in zip(starts, columns))))
    return out


def read_verified(root: Path, manifest: dict, key: str, name: str) -> pq.ParquetFile:
    """A committed shard opened for reading only after its bytes match the manifest's size and
    sha256 (one read: the digest is taken of the bytes then parsed); pages are read with their
    checksums. `CorruptShard` names the file otherwise: no damaged row is ever copied on."""
    path = Path(root) / key / name
    info = manifest.get("shard_info", {}).get(f"{key}/{name}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CorruptShard(f"{path}: cannot be read ({error.strerror or error})") from None
    if info is not None and (len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]):
        raise CorruptShard(f"{path}: size or sha256 differs from the manifest (the bytes changed after it was written)")
    try:
        return pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    except Exception as error:  # noqa: BLE001 - a damaged footer in a shard without a digest
        raise CorruptShard(f"{path}: unreadable ({type(error).__name__})") from None


def write_buffer(
    folder: Path,
    name: str,
    key: str,
    buffer: CallBuffer,
    index: int,
    segments: list[int],
    vector_type,
    token_ids: bool,
    vocabulary,
    fsync: bool,
) -> Written:
    """Write head `buffer.heads[index]` of one buffer to `folder/.name.tmp` (the commit renames it)."""
    folder.mkdir(exist_ok=True)
    rows = buffer.key_buffer(index)  # split here, in the writer thread
    size, digest = write_table(rows.table(vector_type, token_ids, vocabulary), folder / f".{name}.tmp", fsync)
    return Written(key, name, rows.rows, size, digest, rows.buckets(), sorted(segments))


class Writers:
    """A few threads that write shards (`submit` returns a Future of `Written`), and more that
    only wait in fsync: many concurrent fsyncs share the file system's journal commits, so
    syncing a finalise's shards costs about one fsync's latency instead of their sum.

    Plain daemon threads, not concurrent.futures' executors: those refuse new work once the
    interpreter starts to exit, and the env-configured session commits from an atexit hook.
    """

    SYNC_THREADS = 16

    def __init__(self, threads: int) -> None:
        self._work: queue.Queue = queue.Queue()
        self._sync: queue.Queue = queue.Queue()
        self._threads = [_start(self._work, f"qk-sniff-writer-{i}") for i in range(max(1, threads))]
        self._threads += [_start(self._sync, f"qk-sniff-fsync-{i}") for i in range(self.SYNC_THREADS)]

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._work.put((future, fn, args))
        return future

    def fsync(self, paths) -> None:
        """fsync every path (files or folders) concurrently; re-raises the first error."""
        futures = []
        for path in paths:
            futures.append(Future())
            self._sync.put((futures[-1], fsync_dir, (path,)))
        for future in futures:
            future.result()

    def close(self) -> None:
        for _ in range(len(self._threads)):
            self._work.put(None)
            self._sync.put(None)
        for thread in self._threads:
            thread.join()


def _start(work: queue.Queue, name: str) -> threading.Thread:
    def run() -> None:
        while (item := work.get()) is not None:
            future, fn, args = item
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
