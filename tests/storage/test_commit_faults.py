"""Faults inside a commit, storage side: a rename that fails partway through a commit (or a merge of
small shards) leaves no shard that the manifest does not list, so a glob reader such as
`datasets.load_dataset` reads exactly the committed examples; an output folder removed or replaced
while the capture runs fails the next commit and gets nothing written into it."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import traceback
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import qk_attn.storage.commit as commit
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import SaverError
from qk_attn.storage.manifest import read_manifest
from support.storage import folder_table, open_sink, reference, run_examples, sort_rows

torch.set_num_threads(1)


class FailingReplace:
    """os.replace that raises EIO at its `nth` call on the saver thread (within `inside`, a function
    of the saver's call stack, when given); every other call goes through."""

    def __init__(self, nth: int, inside: str | None = None, before=None) -> None:
        self.nth, self.inside, self.before = nth, inside, before
        self.calls = 0
        self.fired = False
        self.replace = os.replace

    def __call__(self, src, dst, *args, **kwargs):
        if threading.current_thread().name == "qk-sniff-saver" and (
            self.inside is None or any(frame.name == self.inside for frame in traceback.extract_stack())
        ):
            self.calls += 1
            if self.calls == self.nth:
                self.fired = True
                if self.before is not None:
                    self.before()
                else:
                    raise OSError(errno.EIO, "Input/output error (injected)")
        return self.replace(src, dst, *args, **kwargs)


def unlisted_parquet(out: Path) -> list[str]:
    """Parquet files under OUT's key folders that its manifest does not list (what a glob reader
    reads and qk_attn does not)."""
    manifest = read_manifest(out)
    listed = {f"{key}/{name}" for key, names in manifest["shards"].items() for name in names}
    return sorted(
        p.relative_to(out).as_posix() for p in out.glob("l*/*.parquet") if p.relative_to(out).as_posix() not in listed
    )


def glob_read_examples(out: Path, cache: Path) -> tuple[list[int], int]:
    """The example ids and row count `datasets.load_dataset` reads for one config (its card's glob)."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(str(out), "l00h00k", split="train", cache_dir=str(cache))
    return sorted(set(ds["example_id"])), len(ds)


def check_folder_is_what_its_manifest_says(out: Path, cache: Path) -> set[int]:
    """No unlisted Parquet file, `datasets` reads the committed examples' rows (no more), verify passes."""
    assert unlisted_parquet(out) == []
    manifest = read_manifest(out)
    committed = {int(e) for e in manifest["examples"]}
    rows = sum(pq.read_metadata(out / "l00h00k" / name).num_rows for name in manifest["shards"]["l00h00k"])
    assert glob_read_examples(out, cache) == (sorted(committed), rows)
    # The examples export (written before the manifest, at most every minute) may lag the manifest, or
    # be gone, after a failed commit, but never list an example the manifest does not commit (the
    # `examples` config would give it); the card may be behind. The next run (or repair) writes both.
    if (out / "examples.parquet").is_file():
        assert set(pq.read_table(out / "examples.parquet")["example_id"].to_pylist()) <= committed
    behind = ("examples.parquet: ", "README.md ")
    assert [p for p in verify_dataset(out, log=lambda *_: None) if not p.startswith(behind)] == []
    return committed


def fail_while_capturing(out: Path, examples: list[int], fault: FailingReplace, monkeypatch) -> None:
    """Capture `examples` into OUT with `fault` as os.replace: the flush fails in one line, and so does
    the close after it."""
    sink = open_sink(out)
    monkeypatch.setattr(os, "replace", fault)
    with pytest.raises(SaverError, match="injected") as error:
        run_examples(sink, examples)
        sink.flush(timeout=10)
    assert "\n" not in str(error.value)
    with pytest.raises(SaverError):
        sink.close()
    monkeypatch.undo()
    assert fault.fired


class _NullSink:
    """Keeps nothing: `run_examples` into it only makes the batches that an example puts."""

    def put(self, batch) -> None:
        pass

    def commit(self, ids) -> None:
        pass


def resume_and_compare(out: Path, examples: list[int]) -> None:
    """Re-run the same 'command': the folder ends up with the rows of an uninterrupted run of `examples`."""
    sink = open_sink(out)
    run_examples(sink, [e for e in examples if e not in sink.committed_ids()])
    sink.close()
    assert sorted(int(e) for e in read_manifest(out)["examples"]) == examples
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(run_examples(_NullSink(), examples))))
    assert unlisted_parquet(out) == []
    assert verify_dataset(out, log=lambda *_: None) == []


@pytest.mark.parametrize("nth", [1, 2, 3, 5, 6, 7, 8, 9, 12])
def test_a_rename_failing_partway_through_a_commit_leaves_no_unlisted_shard(tmp_path, monkeypatch, nth):
    """EIO at the nth os.replace of the saver thread (a shard's rename, the examples export's, the
    previous manifest's or the manifest's): the shards already renamed go with the rest."""
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0, 1])
    sink.close()  # a committed capture with its card (the configs `datasets` reads)

    fail_while_capturing(out, [2, 3], FailingReplace(nth), monkeypatch)

    committed = check_folder_is_what_its_manifest_says(out, tmp_path / "cache")
    assert {0, 1} <= committed <= {0, 1, 2, 3}
    resume_and_compare(out, [0, 1, 2, 3])


@pytest.mark.parametrize("nth", [1, 2, 6, 7, 8])
def test_a_rename_failing_partway_through_a_merge_leaves_no_unlisted_shard(tmp_path, monkeypatch, nth):
    """The same during a merge of small shards (compaction): a merged shard renamed but not listed
    would be read by a glob reader next to the parts it holds, every row twice."""
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0, 1, 2])  # three small shards per folder, one commit each
    sink.flush(timeout=10)
    sink.close()

    monkeypatch.setattr(commit, "COMPACT_AT", 3)  # the next commit merges them
    fail_while_capturing(out, [3], FailingReplace(nth, inside="_compact"), monkeypatch)

    committed = check_folder_is_what_its_manifest_says(out, tmp_path / "cache")
    assert committed == {0, 1, 2, 3}  # the commit itself was done before the merge
    resume_and_compare(out, [0, 1, 2, 3])


@pytest.mark.parametrize("how", ["rmtree", "rmtree+mkdir"])
def test_an_output_folder_removed_or_replaced_fails_the_next_commit(tmp_path, how):
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0, 1])
    sink.flush(timeout=10)
    shutil.rmtree(out)
    if how.endswith("mkdir"):
        out.mkdir()
    with pytest.raises(
        SaverError, match="^the output folder .* was removed or replaced while the capture ran"
    ) as error:
        run_examples(sink, [2])
        sink.flush(timeout=10)
    assert "\n" not in str(error.value) and "SaverError" not in str(error.value)  # (was nested in another's text)
    with pytest.raises(SaverError, match="was removed or replaced"):
        sink.close()
    if how.endswith("mkdir"):
        assert list(out.iterdir()) == []  # no manifest listing shards that are gone, no card, no shard
    else:
        assert not out.exists()


def test_a_folder_another_capture_opened_in_place_of_out_is_left_alone(tmp_path):
    """OUT replaced, and a second capture opened the new folder (its lock is free): the first
    sink's next commit fails and writes nothing there; the second capture is intact."""
    out = tmp_path / "out"
    first = open_sink(out)
    run_examples(first, [0, 1])
    first.flush(timeout=10)
    shutil.rmtree(out)
    out.mkdir()
    second = open_sink(out)
    kept = run_examples(second, [7])
    second.flush(timeout=10)
    with pytest.raises(SaverError, match="was removed or replaced while the capture ran"):
        run_examples(first, [2])
        first.flush(timeout=10)
    assert set(read_manifest(out)["examples"]) == {"7"}
    kept += run_examples(second, [8])
    second.close()
    with pytest.raises(SaverError, match="was removed or replaced"):
        first.close()
    assert set(read_manifest(out)["examples"]) == {"7", "8"}
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(kept)))
    assert unlisted_parquet(out) == []
    assert verify_dataset(out, log=lambda *_: None) == []


def test_an_output_folder_replaced_during_a_commit_is_not_touched(tmp_path, monkeypatch):
    """OUT replaced after the shards of a commit were written, while it renames them: the renames
    fail, and neither the clean-up nor the manifest touches the new folder."""
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0, 1])
    sink.flush(timeout=10)

    def replace_folder() -> None:
        shutil.rmtree(out)
        out.mkdir()

    monkeypatch.setattr(os, "replace", FailingReplace(1, inside="_complete", before=replace_folder))
    with pytest.raises(SaverError, match="was removed or replaced while the capture ran"):
        run_examples(sink, [2])
        sink.flush(timeout=10)
    with pytest.raises(SaverError):
        sink.close()
    monkeypatch.undo()
    assert list(out.iterdir()) == []


def test_closing_a_capture_whose_folder_was_replaced_leaves_the_new_folders_lock(tmp_path):
    """After OUT was replaced and another capture opened it, the first capture's close deleted the lock
    file at OUT's name, which was the other capture's: a third writer could then open the folder."""
    import shutil

    from qk_attn.storage.lock import release_lock, take_lock

    out = tmp_path / "out"
    out.mkdir()
    first = take_lock(out)
    shutil.rmtree(out)
    out.mkdir()
    second = take_lock(out)
    release_lock(out, first)
    assert (out / ".qk_sniff.lock").exists()
    release_lock(out, second)
    assert not (out / ".qk_sniff.lock").exists()


def test_a_full_disk_while_spilling_leaves_no_temporary_shards(tmp_path, monkeypatch):
    """A writer that fails (ENOSPC) while spilling an open segment stops the sink; the `.tmp` shards it
    had written stayed on the full disk until the next run. They go when the sink stops: the folder is
    what its manifest says, with the examples committed before the failure."""
    import qk_attn.storage.shards as shards

    out = tmp_path / "out"
    calls = {"n": 0}
    write = shards.write_table

    def full_disk(table, path, fsync, options=None):
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return write(table, path, fsync, options)

    monkeypatch.setattr(shards, "write_table", full_disk)
    sink = open_sink(out, buffer_mb=0)
    with pytest.raises(SaverError):
        run_examples(sink, range(8), commit=False)
        sink.commit(list(range(8)))
        sink.flush()
    with pytest.raises(SaverError):
        sink.close()
    assert calls["n"] >= 9
    assert sorted(p.name for p in out.rglob("*.tmp")) == []
