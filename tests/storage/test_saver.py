"""ParquetSink and transfer: layout, schema, manifest, pieces, back-pressure, errors, spill, compaction.

Batches are real `CaptureBatch`es made by the torch gather reference from deterministic
states, so the expected rows are exactly what `MemorySink` (rows.py) makes of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import qk_attn
from qk_attn.capture.plan import HeadPlan, ModelShape
from qk_attn.capture.schema import arrow_schema
from qk_attn.capture.staging import Staging
from qk_attn.config import SniffConfig
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import CaptureOverflow, OutputLocked, SaverError
from qk_attn.sampler import Sampler
from qk_attn.storage.layout import MANIFEST, key_name
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.pool import HostPool
from qk_attn.storage.sink import ParquetSink
from qk_attn.storage.transfer import Transfer
from support.storage import (
    DIM,
    TinyConfig,
    folder_table,
    make_batch,
    open_sink,
    plan_for,
    reference,
    run_examples,
    sort_rows,
)

# ---- helpers shared by the other test modules (imported as `from support.storage import ...`) ----


# ---- tests --------------------------------------------------------------------------------
def test_dataset_layout_schema_manifest_and_verify(tmp_path):
    out = tmp_path / "out"
    sink = open_sink(out, source={"dataset": "toy", "split": "train"})
    batches = run_examples(sink, range(6))
    sink.close()
    sink.close()  # idempotent

    table = folder_table(out)
    assert table.schema == arrow_schema(DIM, token_id=True)
    assert sort_rows(table).equals(sort_rows(reference(batches)))
    manifest = read_manifest(out)
    assert manifest["examples"] == {str(e): 5 + e % 7 for e in range(6)}
    assert manifest["model"] == {"id": "tiny/llama", "revision": "abc123", "dtype": "bfloat16", "model_type": "llama"}
    assert manifest["sampler"] == {"sampler": "all", "min_bucket_size": 4, "base_rate": 1.0, "seed": 0}
    assert manifest["source"] == {"dataset": "toy", "split": "train"}
    assert set(manifest["versions"]) >= {"qk_attn", "transformers", "torch"}
    assert manifest["plan"]["num_layers"] == 3
    for key, names in manifest["shards"].items():
        files = sorted(p.name for p in (out / key).iterdir())
        assert files == sorted(names)  # nothing else: no temporary or orphan files
        rows = sum(pq.read_metadata(out / key / n).num_rows for n in names)
        assert manifest["row_counts"][key] == rows
    assert sink.rows_written == table.num_rows
    # The lead's `qk-sniff verify` agrees: schema, uniqueness, counts, exact sampler selection.
    from qk_attn.cli import verify_dataset

    assert verify_dataset(out, log=lambda *_: None) == []


def test_float16_vectors(tmp_path):
    out = tmp_path / "out"
    config = SniffConfig(output=str(out), sampler="all", min_bucket_size=4, vector_dtype="float16")
    sink = open_sink(out, config)
    batch = make_batch(0, "q", [3, 4], [6, 4], dtype=torch.float16)
    sink.put(batch)
    sink.commit([3, 4])
    sink.close()
    table = folder_table(out)
    assert table.schema == arrow_schema(DIM, pa.float16(), token_id=True)
    assert sort_rows(table).equals(sort_rows(reference([batch], pa.float16())))


def test_pieces_bounded_pool_and_sparse_sampler(tmp_path):
    """A batch far larger than the 1 MiB pool is copied in pieces; rows past `count` are never written."""
    out = tmp_path / "out"
    config = SniffConfig(output=str(out), sampler="uniform", min_bucket_size=8, base_rate=2, pinned_mb=1)
    sink = open_sink(out, config)
    sampler = Sampler("uniform", 8, 2.0)
    batches = [
        make_batch(
            layer, "k", [7, 8], [3000, 2000], heads=(0, 1, 2, 3), sampler=sampler, dim=64, capacity=6000, num_heads=4
        )
        for layer in (0, 1)
    ]
    for batch in batches:
        sink.put(batch)
    sink.commit([7, 8])
    sink.close()
    pool = sink._transfer.pool
    assert pool.high_water <= pool.nbytes == 1 << 20
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(batches)))
    assert read_manifest(out)["examples"] == {"7": 3000, "8": 2000}


def test_host_pool_ring_never_overlaps_and_blocks_when_full():
    pool = HostPool(1000, pin=False)
    rng = np.random.default_rng(0)
    live = []

    def never_wait():
        raise AssertionError("acquire blocked although a contiguous region was free")

    for _ in range(2000):
        # in_use <= 384 leaves >= 640 free bytes, so a contiguous 320 always exists
        if live and (rng.random() < 0.5 or pool.in_use > 384):
            pool.release(live.pop(0))  # FIFO, like the saver
        else:
            region = pool.acquire(int(rng.integers(1, 300)), never_wait)
            assert all(region[1] <= r[0] or r[1] <= region[0] for r in live)
            assert 0 <= region[0] < region[1] <= pool.nbytes
            live.append(region)
    assert pool.high_water <= pool.nbytes

    pool = HostPool(256, pin=False)
    first = pool.acquire(200)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(200)))
    waiter.start()
    time.sleep(0.2)
    assert not got and pool.waits == 1  # back-pressure: blocked while the pool is full
    pool.release(first)
    waiter.join(2)
    assert got
    assert 0.2 <= pool.waited_s < 2  # the wait is measured: the run's summary reports it


def test_transfer_pieces_cover_the_batch():
    batch = make_batch(0, "q", [1, 2], [50, 30], heads=(0, 1, 2, 3), dim=64, num_heads=4)
    transfer = Transfer(1 << 20)
    transfer.pool = HostPool(64 << 10, pin=False)  # 64 KiB: 16 KiB pieces of 15 rows
    pieces = []
    for piece in transfer.pieces(batch):
        piece.wait()
        rows = piece.rows()
        pieces.append((piece.start, len(rows), rows.vectors.copy(), rows.position))
        piece.release()
    assert len(pieces) > 3
    assert [p[0] for p in pieces] == sorted(p[0] for p in pieces)
    n = int(batch.count)
    assert sum(p[1] for p in pieces) == n
    assert torch.equal(torch.from_numpy(np.concatenate([p[2] for p in pieces], 1)), batch.vectors[:, :n])


def test_an_overflow_refuses_its_example_only_and_the_sink_goes_on(tmp_path):
    """A call with more rows than its staging holds is found when the saver reads its count (as a
    device's deferred check is): example 1 is refused, reported once, and none of its rows is kept,
    neither those before the bad call nor those after; examples 0 and 2, around it, are kept."""
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0])
    run_examples(sink, [1], commit=False)  # rows of example 1 before the bad call
    sink.put(make_batch(0, "q", [1], [20], capacity=8))  # 20 selected, room for 8
    with pytest.raises(
        CaptureOverflow, match=r"20 tokens selected.*examples \[1\] had returned: none of their rows is kept"
    ):
        sink.flush(timeout=10)
    run_examples(sink, [1], layers=(1,), commit=False)  # later rows of the refused example
    sink.commit([1])  # already reported: not committed, not reported again
    run_examples(sink, [2])
    sink.close()
    assert sorted(read_manifest(out)["examples"]) == ["0", "2"]
    assert set(qk_attn.load(str(out))["example_id"].to_pylist()) == {0, 2}
    assert verify_dataset(out, log=lambda *_: None) == []


def test_an_example_refused_late_does_not_hold_back_one_committed_beside_it(tmp_path):
    """Examples 0 and 1 share the open segment; 0 is committed while 1 is still running, then 1 is
    refused: the segment no longer waits for 1, so 0 becomes durable without another commit."""
    out = tmp_path / "out"
    sink = open_sink(out)  # commit_every_s=0
    run_examples(sink, [0, 1], commit=False)
    sink.commit([0])
    sink.put(make_batch(0, "q", [1], [20], capacity=8))  # example 1 refused when the saver reads it
    deadline = time.monotonic() + 10
    while "0" not in read_manifest(out)["examples"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(read_manifest(out)["examples"]) == ["0"]
    with pytest.raises(CaptureOverflow, match=r"examples \[1\] had returned"):
        sink.close()


def test_saver_failure_surfaces_in_the_caller_without_hanging(tmp_path):
    """The output folder disappears (replaced by a file): the next call/flush raises, nothing hangs."""
    out = tmp_path / "out"
    config = SniffConfig(output=str(out), sampler="all", min_bucket_size=4, pinned_mb=1)
    sink = open_sink(out, config)
    run_examples(sink, [0])
    sink.flush(timeout=10)
    shutil.rmtree(out)
    out.write_text("not a folder")
    start = time.monotonic()
    run_examples(sink, [1], commit=False)
    with pytest.raises(SaverError, match="saver .* failed|was removed or replaced while the capture ran"):
        sink.flush(timeout=10)
    with pytest.raises(SaverError):  # every later call keeps raising, including put
        sink.put(make_batch(0, "q", [2], [4]))
    with pytest.raises(SaverError):
        sink.close()
    assert time.monotonic() - start < 10
    assert not sink._thread.is_alive()


def test_forward_pieces_held_back_are_sent_when_a_wait_needs_their_pool_space(tmp_path):
    """The sink holds small forward pieces back (HOLD_FORWARDS). A later forward that needs pool space
    only they can free (the pool is a ring: a held region in its middle leaves no run long enough)
    sends them to the saver instead of waiting forever; every row arrives."""
    out = tmp_path / "out"
    config = SniffConfig(output=str(out), sampler="all", min_bucket_size=4, pinned_mb=1)
    sink = open_sink(out, config)
    pool_bytes = 1 << 20

    def forward(example, rows):  # about 1 KiB per row
        batch = make_batch(0, "q", [example], [rows], heads=(0, 1, 2, 3), dim=64, num_heads=4)
        staging = Staging((example,), torch.device("cpu"), 0, None, streams=False)
        staging.add(batch)
        sink.put_forward(staging)
        return batch

    done, batches, saver_may_go = [], [], threading.Event()
    accept = sink._accept_forward
    sink._accept_forward = lambda *piece: (saver_may_go.wait(10), accept(*piece))

    def run():
        batches.append(forward(0, 480))  # ~47% of the pool: more than 1/16, so queued at once
        batches.append(forward(1, 60))  # ~6%, held back, right after it in the ring
        assert len(sink._held) == 1
        saver_may_go.set()
        pool = sink._transfer.pool
        while pool.in_use > pool_bytes // 8:  # the saver frees the first one
            time.sleep(0.01)
        batches.append(forward(2, 500))  # ~49%: fits neither before nor after the held region
        sink.commit([0, 1, 2])
        sink.close()
        done.append(True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert done, "the sink waited for pool space that only its held pieces could free"
    assert sink._transfer.pool.waits >= 1  # the case this test is about did happen
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(batches)))


def test_put_blocked_on_a_full_pool_raises_when_the_saver_dies(tmp_path):
    out = tmp_path / "out"
    config = SniffConfig(output=str(out), sampler="all", min_bucket_size=4, pinned_mb=1)
    sink = open_sink(out, config)
    release = threading.Event()

    def stuck(rows, first):
        release.wait(5)
        raise OSError("disk on fire")

    sink._accept = stuck
    big = make_batch(0, "q", [1], [600], heads=(0, 1, 2, 3), dim=64, num_heads=4)  # 600 KiB per copy
    errors = []

    def produce():
        try:
            for _ in range(10):
                sink.put(big)
        except SaverError as error:
            errors.append(error)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.3)
    assert producer.is_alive()  # blocked: the pool is full and the saver is stuck
    release.set()
    producer.join(5)
    assert not producer.is_alive() and "disk on fire" in str(errors[0])
    with pytest.raises(SaverError):
        sink.close()


def test_different_settings_are_refused_then_overwritten(tmp_path):
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0, 1])
    sink.close()
    other = SniffConfig(output=str(out), sampler="uniform", min_bucket_size=4, heads="1")
    with pytest.raises(ValueError) as info:
        ParquetSink(out, other, fsync=False)
    message = str(info.value)
    assert "sampler: 'all'" in message and "'uniform' now" in message and "heads: None" in message
    assert "overwrite=True" in message
    # Settings that do not change the rows may differ on resume.
    same = SniffConfig(output=str(out), sampler="all", min_bucket_size=4, pinned_mb=8, backend="eager")
    ParquetSink(out, same, fsync=False).close()
    sink = ParquetSink(out, other, overwrite=True, fsync=False)
    assert sink.committed_ids() == set()
    assert not any(p.name.startswith("l0") for p in out.iterdir())
    sink.close()


def test_an_overwrite_interrupted_anywhere_leaves_a_folder_the_next_overwrite_takes(tmp_path, monkeypatch):
    """Interrupted after it had deleted both manifests but not every shard (an interrupt at any deletion from about
    the middle on), an overwrite left qk-sniff's files without a manifest: refused as "not empty and holds no
    qk_sniff.json" by every command. The manifests go last: at every deletion, the next overwrite takes it."""
    import pathlib

    from qk_attn.storage import folder
    from qk_attn.storage.folder import remove_dataset

    template = tmp_path / "template"
    sink = open_sink(template)
    run_examples(sink, [0, 1, 2, 3])
    sink.close()
    unlink, stops = pathlib.Path.unlink, iter(range(1000))
    stop = next(stops)
    while True:  # the interrupt at the 1st, 2nd, ... file the overwrite deletes, until it runs to its end
        out = tmp_path / f"out{stop}"
        shutil.copytree(template, out)
        calls = iter(range(1000))

        def interrupted(self, *args, **kwargs):
            if next(calls) == stop:
                raise KeyboardInterrupt
            return unlink(self, *args, **kwargs)

        def remove_interrupted(*args, **kwargs):
            with monkeypatch.context() as patch:
                patch.setattr(pathlib.Path, "unlink", interrupted)
                return remove_dataset(*args, **kwargs)

        other = SniffConfig(output=str(out), sampler="uniform")
        try:
            with monkeypatch.context() as patch:
                patch.setattr(folder, "remove_dataset", remove_interrupted)
                ParquetSink(out, other, overwrite=True, fsync=False).close()
            break  # no interrupt came: every deletion was tried
        except KeyboardInterrupt:
            pass
        sink = ParquetSink(out, other, overwrite=True, fsync=False)
        assert sink.committed_ids() == set(), stop
        sink.close()
        assert not any(p.name.startswith("l0") for p in out.iterdir()), stop
        stop = next(stops)
    assert stop > 10  # (the shards, the card, the examples table and the manifests were each interrupted)


def test_one_writer_per_folder(tmp_path):
    """A second writer of this same process is told that the holder is this process (it was told of
    "another qk-sniff capture", as if another process held the lock), and of which capture."""
    out = tmp_path / "out"
    sink = open_sink(out)
    with pytest.raises(OutputLocked) as error:
        open_sink(out)
    assert str(error.value).startswith(
        f"this process (pid {os.getpid()}) is already writing to {out}: its capture of output={str(out)!r} "
        f"(a session() or ParquetSink still open) holds {out / '.qk_sniff.lock'}"
    ), error.value
    assert "pass another output= (output=None records in memory)" in str(error.value)
    sink.close()
    open_sink(out).close()


def test_a_lock_another_process_holds_is_named_as_another_capture(tmp_path):
    import fcntl

    from qk_attn.storage.lock import release_lock, take_lock

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".qk_sniff.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process would: not a lock take_lock took here
    try:
        with pytest.raises(OutputLocked, match=r"^another qk-sniff capture is writing to "):
            take_lock(out)
    finally:
        os.close(fd)
    held = take_lock(out)  # taken here without a holder (a command such as repair): named generically
    try:
        with pytest.raises(OutputLocked, match=r"^this process \(pid \d+\) is already writing to .*: one of its own"):
            take_lock(out)
    finally:
        release_lock(out, held)


def test_an_output_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes.txt is a file, not a folder"):
        open_sink(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_spill_keeps_memory_bounded_and_commits_whole_examples(tmp_path):
    out = tmp_path / "out"
    sink = open_sink(out, commit_every_s=3600)
    sink.buffer_bytes = 4096  # spill almost every batch
    batches = run_examples(sink, [0, 1, 2], lengths=[40, 40, 40])
    sink.flush(timeout=10)
    assert all(not p.name.endswith(".tmp") for p in out.rglob("*"))
    batches += run_examples(sink, [3], lengths=[40], commit=False)
    time.sleep(0.2)
    sink.flush(timeout=10)  # example 3 is incomplete: written to temporary shards, not committed
    assert any(p.name.endswith(".parquet.tmp") for p in out.rglob("*"))
    assert read_manifest(out)["examples"].keys() == {"0", "1", "2"}
    sink.commit([3])
    sink.close()
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(batches)))


def test_uncommitted_examples_are_not_kept_at_close(tmp_path):
    out = tmp_path / "out"
    sink = open_sink(out, commit_every_s=3600)
    sink.buffer_bytes = 4096
    kept = run_examples(sink, [0, 1], lengths=[30, 30])
    run_examples(sink, [2], lengths=[30], commit=False)  # the forward of example 2 never finished
    sink.close()
    assert read_manifest(out)["examples"].keys() == {"0", "1"}
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(kept)))
    assert all(not p.name.endswith(".tmp") for p in out.rglob("*"))


def test_compaction_merges_small_shards(tmp_path):
    from qk_attn.storage.saver import COMPACT_AT_CLOSE

    def one_segment_each(sink, examples):
        batches = []
        for example in examples:
            batches += run_examples(sink, [example])
            sink.flush(timeout=10)
        return batches

    short = tmp_path / "short"  # a short session's few shards are left as they are (no close-time cost)
    sink = open_sink(short)
    one_segment_each(sink, range(COMPACT_AT_CLOSE - 1))
    sink.close()
    assert all(len(names) == COMPACT_AT_CLOSE - 1 for names in read_manifest(short)["shards"].values())

    out = tmp_path / "out"
    sink = open_sink(out)
    batches = one_segment_each(sink, range(COMPACT_AT_CLOSE))
    before = sink.manifest["shards"]
    assert all(len(names) == COMPACT_AT_CLOSE for names in before.values())
    sink.close()
    after = read_manifest(out)["shards"]
    assert all(len(names) == 1 for names in after.values())
    assert sorted(p.name for p in (out / key_name(0, 0, "q")).iterdir()) == after[key_name(0, 0, "q")]
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(batches)))


def test_rows_of_committed_examples_are_an_error_never_a_silent_drop(tmp_path):
    from qk_attn.errors import CommittedExampleError

    out = tmp_path / "out"
    sink = open_sink(out)
    batches = run_examples(sink, [0, 1])
    sink.close()
    sink = open_sink(out)
    assert sink.committed_ids() == {0, 1} and sink.max_committed_id() == 1
    with pytest.raises(CommittedExampleError, match=r"example\(s\) \[1\] arrived, but they are already committed"):
        run_examples(sink, [1])  # a caller that did not skip it
    batches += run_examples(sink, [2])
    with pytest.raises(CommittedExampleError):  # also one committed in this run
        run_examples(sink, [2])
    sink.close()
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(batches)))
    assert json.loads((out / MANIFEST).read_text())["examples"].keys() == {"0", "1", "2"}


def test_bounded_memory_sampler_all_long_sequence_small_pool(tmp_path):
    """Sampler `all` over an 8192-token sequence: the rows are 8x the 1 MiB pool plus the 64 KiB
    row buffer, and neither bound is ever exceeded (peak RSS is noted in the saver report)."""
    import qk_attn
    from support.models import build

    out = tmp_path / "out"
    model = build("llama3", "qk_sniff")
    settings = dict(sampler="all", min_bucket_size=256, pinned_mb=1)
    sink = ParquetSink(out, SniffConfig(output=str(out), **settings), commit_every_s=0, fsync=False)
    sink.buffer_bytes = 64 << 10
    length = 8192
    with torch.inference_mode(), qk_attn.session(sink=sink, **settings) as s:
        s.begin([0])
        model(input_ids=torch.randint(2, 90, (1, length), generator=torch.Generator().manual_seed(0)))
    written = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    rows = 3 * (4 + 2) * length  # 3 layers x (4 query + 2 key heads) x every token
    assert sink.rows_written == rows == sum(read_manifest(out)["row_counts"].values())
    data_bytes = rows * (16 * 4 + 20)  # vector + index columns, in memory
    pool = sink._transfer.pool
    assert pool.high_water <= pool.nbytes == 1 << 20
    largest_call = length * 4 * (16 * 4 + 20)  # one call's rows of 4 heads
    assert sink.max_buffered_bytes <= sink.buffer_bytes + largest_call
    assert data_bytes > 8 * (pool.nbytes + sink.buffer_bytes) and written > 0


def test_saver_failure_surfaces_in_a_model_forward(tmp_path):
    """The output folder becomes unusable mid-run: a later forward (its first attention call) raises."""
    import qk_attn
    from support.models import build, padded_batch

    out = tmp_path / "out"
    model = build("llama3", "qk_sniff")
    sink = ParquetSink(
        out, SniffConfig(output=str(out), sampler="all", min_bucket_size=4), commit_every_s=0, fsync=False
    )
    start = time.monotonic()
    forwards = 0
    with pytest.raises(SaverError, match="saver .* failed|was removed or replaced while the capture ran"):
        with torch.inference_mode(), qk_attn.session(sink=sink, sampler="all", min_bucket_size=4) as s:
            for ids in ([0, 1], [2, 3], [4, 5], [6, 7]):
                s.begin(ids)
                model(**padded_batch("right"))
                s.commit()
                forwards += 1
                if ids == [0, 1]:
                    sink.flush(timeout=10)
                    shutil.rmtree(out)
                    out.write_text("the disk went away")
                else:
                    time.sleep(0.2)  # the saver fails on this commit while the caller moves on
    assert forwards == 2  # raised inside the third forward: the first call after the failure
    assert time.monotonic() - start < 20 and not sink._thread.is_alive()


def test_a_different_model_is_refused(tmp_path):
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0])
    sink.close()
    sink = ParquetSink(out, SniffConfig(output=str(out), sampler="all", min_bucket_size=4), fsync=False)
    other = type("Other", (TinyConfig,), {"_commit_hash": "fff999"})()
    with pytest.raises(
        ValueError, match=r"holds captures of model 'tiny/llama' \(llama, bfloat16, revision abc123\); this"
    ):
        sink.bind_model(other, plan_for(sink.config))
    # Models built in code have no name or revision: another architecture or dtype is another model.
    for changed in ({"model_type": "qwen2"}, {"dtype": torch.float32}):
        unnamed = {"_commit_hash": None}  # compared by name, which is the same
        with pytest.raises(ValueError, match="holds captures of model"):
            sink.bind_model(type("Other", (TinyConfig,), {**unnamed, **changed})(), plan_for(sink.config))
    renamed = type("Renamed", (TinyConfig,), {"_name_or_path": "/elsewhere/llama"})()  # same revision: same weights
    sink.bind_model(renamed, plan_for(sink.config))
    with pytest.raises(ValueError, match="shaped"):
        sink.bind_model(TinyConfig(), HeadPlan.build(sink.config, ModelShape(3, 8, 2, 8)))
    sink.close()


def test_host_views_of_a_staged_forward_share_what_its_calls_share():
    """On CUDA a forward's calls become views of its pinned copy. Columns the calls share in the staging
    buffer (the per-row counts) become one view, so the saver reads them once and counts the calls
    together (HostReader keys on identity)."""
    from qk_attn.capture.batch import HostReader
    from qk_attn.storage.transfer import host_views

    buffer = torch.zeros(1 << 16, dtype=torch.uint8)
    used = [0]

    def staged(tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        view = buffer[used[0] : used[0] + nbytes].view(tensor.dtype).view(tensor.shape)
        used[0] += -(-nbytes // 64) * 64
        return view.copy_(tensor)

    q, k = (make_batch(0, kind, [1, 2], [5, 3]) for kind in "qk")
    valid = staged(q.valid)
    calls = [batch.map_tensors(staged) for batch in (q, k)]
    calls = [dataclasses.replace(call, valid=valid) for call in calls]
    host = buffer.clone()
    views, _ = host_views(calls, [], buffer.data_ptr(), host)
    assert views[0].valid is views[1].valid and views[0].vectors is not views[1].vectors
    assert views[0].valid.data_ptr() == host.data_ptr() + (valid.data_ptr() - buffer.data_ptr())
    reader = HostReader()
    rows = [call.host_rows(reader=reader) for call in views]
    assert rows[0].valid is rows[1].valid == {1: 5, 2: 3}
    for got, want in zip(rows, (q, k)):
        np.testing.assert_array_equal(got.vectors, want.host_rows().vectors)


def test_a_file_where_a_key_folder_goes_is_named_as_such(tmp_path):
    """It was a bare FileExistsError inside the saver's message; the committed examples before it stay listed."""
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0])
    sink.flush()
    blocker = next(p for p in out.iterdir() if p.is_dir())
    shutil.rmtree(blocker)
    blocker.write_text("a user's file")
    run_examples(sink, [1])
    with pytest.raises(SaverError, match=r"File exists: .* \(a file sits where the capture needs a folder: move it"):
        sink.flush()
    with pytest.raises(SaverError, match=r"re-run the same command \(or open a session on the same output again\)"):
        sink.close()
    assert list(read_manifest(out)["examples"]) == ["0"]
