"""A long capture holds no more per example, finalise or session than it must: the manifest's records
of merged shards, the files and threads of closed sessions."""

from __future__ import annotations

import os

from qk_attn.storage import commit
from qk_attn.storage.manifest import read_manifest
from support.storage import folder_table, open_sink, reference, run_examples, sort_rows


def test_a_merged_shard_gains_no_row_group_per_finalise(tmp_path, monkeypatch):
    monkeypatch.setattr(commit, "COMPACT_AT", 4)  # merge every few finalises, as a long run does every 64
    out = tmp_path / "out"
    sink = open_sink(out)
    batches = []
    for example in range(40):  # one finalise each
        batches += run_examples(sink, [example])
        sink.flush(timeout=10)
    sink.close()
    manifest = read_manifest(out)
    for key, names in manifest["shards"].items():
        groups = [len(manifest["shard_info"][f"{key}/{n}"].get("row_groups", [None])) for n in names]
        assert sum(groups) <= 8, (key, groups)  # 40 without joining: one per finalise
        segments = [s for n in names for g in manifest["shard_info"][f"{key}/{n}"]["row_groups"] for s in g["segments"]]
        assert sorted(segments) == sorted(set(segments)) and len(segments) == 40  # every segment in one group
    assert sort_rows(folder_table(out)).equals(sort_rows(reference(batches)))


def _open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def test_closed_sessions_leave_no_thread_file_or_lock_behind(tmp_path):
    import threading

    import torch

    import qk_attn
    from qk_attn.storage.layout import LOCK
    from support.models import VOCAB, build

    model = build("llama3", "qk_sniff")
    generator = torch.Generator().manual_seed(0)
    threads = set(threading.enumerate())
    files = {f for f in _open_files() if not f.endswith((".ttf", ".otf"))}
    for k in range(4):
        out = tmp_path / f"out{k}"
        with torch.inference_mode(), qk_attn.session(output=str(out), sampler="all", min_bucket_size=4) as s:
            s.begin([0])
            model.model(input_ids=torch.randint(2, VOCAB - 2, (1, 6), generator=generator))
            s.commit()
        assert (out / "buckets.png").is_file()  # the card's chart was drawn (by the saver thread)
        assert not [p for p in out.rglob("*.tmp")]
        import fcntl

        with open(out / LOCK, "a") as lock:  # released: another writer may take it at once
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert set(threading.enumerate()) == threads
    assert set(_open_files()) <= files, set(_open_files()) - files
    # matplotlib keeps the fonts a thread opened per thread id: none stays open for a saver thread that is gone
    assert not [f for f in _open_files() if f.endswith((".ttf", ".otf"))]
