"""Durability and back-pressure (issues 11 and 13, storage side): a committed document is durable
within `commit_every_s` plus one write, even when the process is SIGKILLed while the next one is
in flight; pool waits happen in `end_forward`, never in `put`; token ids travel to Parquet."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qk_attn.config import SniffConfig
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import StorageError
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.sink import ParquetSink
from support.storage import folder_table, make_batch, open_sink, reference, run_examples, sort_rows

TESTS = Path(__file__).resolve().parents[1]  # where tests/support lives

# N documents committed one by one with the sink's default durability settings (fsync on), then
# the rows of one more document arrive and the process "works" on it until it is killed.
CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from support.storage import open_sink, run_examples
    out, n = sys.argv[1], int(sys.argv[2])
    sink = open_sink(out, fsync=True, commit_every_s=None)
    run_examples(sink, range(n))
    run_examples(sink, [n], commit=False)  # in flight when the kill comes
    print("committed", n, "documents", flush=True)
    time.sleep(600)
    """
).format(tests=str(TESTS))


def test_committed_documents_survive_a_sigkill_seconds_later(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out, n = tmp_path / "out", 6
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == f"committed {n} documents"
        time.sleep(ParquetSink.DEFAULT_COMMIT_EVERY_S + 3)  # "a few seconds" after the last commit()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert set(map(int, read_manifest(out)["examples"])) == set(range(n))  # durable; the in-flight one is not

    sink = open_sink(out)  # a re-run: the in-flight document's files (if any) are orphans
    assert sink.committed_ids() == set(range(n))
    sink.close()
    clean = tmp_path / "clean"
    sink = open_sink(clean)
    want = run_examples(sink, range(n))
    sink.close()
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(want)))
    assert verify_dataset(out, log=lambda *_: None) == []


def test_put_never_waits_for_pool_space_end_forward_does(tmp_path):
    out = tmp_path / "out"
    config = SniffConfig(output=str(out), sampler="all", min_bucket_size=4, pinned_mb=1)
    sink = open_sink(out, config)
    gate = threading.Event()
    accept = sink._accept
    sink._accept = lambda rows, first: (gate.wait(30), accept(rows, first))  # a saver that cannot keep up

    batches = [make_batch(layer, "q", [0], [4000], (0, 1, 2, 3)) for layer in range(2)]  # ~1 MiB each
    for batch in batches:
        sink.put(batch)  # returns at once: what does not fit waits on the device
    pool = sink._transfer.pool
    assert pool.waits == 0 and sink._sender.deferred  # nothing waited inside put

    threading.Timer(0.5, gate.set).start()
    sink.end_forward()  # the one place that may wait (the saver frees space once the gate opens)
    assert not sink._sender.deferred and pool.waits >= 1
    sink.commit([0])
    sink.close()
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(batches)))


def test_token_ids_first_position_and_vocabulary_columns(tmp_path):
    out = tmp_path / "out"
    vocabulary = [f"tok{i}" for i in range(50)]
    sink = open_sink(out, vocabulary=vocabulary)
    text = make_batch(0, "q", [0, 1], [6, 9], (0, 1))
    text.token_id = (torch.arange(text.capacity, dtype=torch.int32) * 7) % 60  # ids >= 50 are not in the list
    text.first_position = torch.tensor([0, 0])
    vision = make_batch(1, "k", [0, 1], [6, 9], (0,))  # e.g. cross-attention keys: no token ids
    vision.cross_attention = True  # (verify compares tokens across rows of one position, vision keys aside)
    for batch in (text, vision):
        sink.put(batch)
    sink.commit([0, 1])
    sink.close()

    table = folder_table(out)
    assert table.schema.field("token_id").type == pa.int32()
    assert table.schema.field("token_str").type == pa.dictionary(pa.int32(), pa.string())
    q = pq.read_table(out / "l00h00q").sort_by([("example_id", "ascending"), ("position", "ascending")])
    count, rows = int(text.count), text.row[: int(text.count)].numpy()
    order = np.lexsort((text.position[:count].numpy(), np.array(text.example_ids)[rows]))
    want_ids = text.token_id[:count].numpy()[order]
    assert q["token_id"].to_numpy().tolist() == want_ids.tolist()
    assert q["token_str"].to_pylist() == [vocabulary[i] if i < 50 else None for i in want_ids]
    k = pq.read_table(out / "l01h00k")
    assert k["token_id"].null_count == k.num_rows and k["token_str"].null_count == k.num_rows
    assert verify_dataset(out, log=lambda *_: None) == []
    with pytest.raises(StorageError, match="optional columns"):  # one schema per dataset
        open_sink(out)  # no vocabulary this time
    # One vocabulary per dataset: other strings (or fewer) would give a token id two token_str values.
    for other in ([f"other{i}" for i in range(50)], vocabulary[:20]):
        with pytest.raises(StorageError, match="captured with another vocabulary"):
            open_sink(out, vocabulary=other)
    again = open_sink(out, vocabulary=list(vocabulary))  # the same list resumes
    again.close()
    assert verify_dataset(out, log=lambda *_: None) == []


def test_a_full_disk_fails_loudly_and_loses_nothing_committed(tmp_path, monkeypatch):
    import errno

    import qk_attn.storage.shards as shards
    from qk_attn.errors import SaverError

    out = tmp_path / "out"
    sink = open_sink(out)
    kept = run_examples(sink, [0, 1])
    sink.flush(timeout=10)
    before = (out / "qk_sniff.json").read_text()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_table", full)  # every shard write from now on
    with pytest.raises(SaverError, match="No space left on device") as error:
        run_examples(sink, [2, 3])  # surfaces at the next put/commit after the failed write ...
        sink.flush(timeout=10)  # ... or here at the latest
    assert "those whose commit the saver had finished) are safe" in str(error.value)
    with pytest.raises(SaverError):
        sink.close()
    monkeypatch.undo()
    assert (out / "qk_sniff.json").read_text() == before  # the last commit is intact
    # (the examples table is exported at most every minute: verify says when it lags; the re-run rewrites it)
    assert all("lags the manifest" in p or p.startswith("README.md ") for p in verify_dataset(out, log=lambda *_: None))
    sink = open_sink(out)  # the re-run: 2 and 3 were never committed, so they are captured again
    assert sink.committed_ids() == {0, 1}
    kept += run_examples(sink, [2, 3])
    sink.close()
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(kept)))
    assert verify_dataset(out, log=lambda *_: None) == []


def test_a_failed_manifest_write_leaves_no_shard_that_the_manifest_does_not_list(tmp_path, monkeypatch):
    """The shards of a commit are named before its manifest is written: when that write fails, they go,
    so the folder is what its manifest says (no uncommitted rows for the card's file patterns)."""
    import errno

    import qk_attn.storage.saver as saver
    from qk_attn.errors import SaverError

    out = tmp_path / "out"
    sink = open_sink(out)
    kept = run_examples(sink, [0, 1])
    sink.flush(timeout=10)
    write = saver.write_json_atomic

    def full(path, *args, **kwargs):
        if Path(path).name == "qk_sniff.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, *args, **kwargs)

    monkeypatch.setattr(saver, "write_json_atomic", full)
    with pytest.raises(SaverError, match="No space left on device"):
        run_examples(sink, [2, 3])
        sink.flush(timeout=10)
    with pytest.raises(SaverError):
        sink.close()
    monkeypatch.undo()
    assert all("lags the manifest" in p or p.startswith("README.md ") for p in verify_dataset(out, log=lambda *_: None))
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(kept)))
