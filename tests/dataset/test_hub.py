"""push / pull / load from the Hub. Only HfApi's network methods are faked (an in-memory remote);
the folders, manifest, card, pattern matching and loading are all real."""

from __future__ import annotations

import re
from pathlib import Path

try:  # the HTTP library huggingface_hub raises with: httpx2 from huggingface_hub 2, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

import qk_attn
from qk_attn.dataset import hub
from qk_attn.errors import CommittedExampleError, HubError, StorageError
from qk_attn.storage.manifest import read_manifest
from support.storage import folder_table, open_sink, run_examples, sort_rows


class FakeHub:
    """Dataset repos as {repo_id: {branch: {path: bytes}}}; records every call."""

    def __init__(self, cache: Path):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.cache = cache
        self.calls: list[tuple] = []
        self.fail: dict[str, Exception] = {}

    def _call(self, name, *args):
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def install(self, monkeypatch):
        fake = self

        def repo_exists(self, repo_id, *, repo_type=None, **_):
            fake._call("repo_exists", repo_id)
            return repo_id in fake.repos

        def revision_exists(self, repo_id, revision, *, repo_type=None, **_):
            fake._call("revision_exists", repo_id, revision)
            return revision in fake.repos.get(repo_id, {})

        def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **_):
            fake._call("create_repo", repo_id, repo_type, private)
            fake.repos.setdefault(repo_id, {"main": {}})

        def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False, **_):
            fake._call("create_branch", repo_id, branch)
            branches = fake.repos[repo_id]
            branches.setdefault(branch, dict(branches["main"]))

        def upload_folder(
            self,
            *,
            repo_id,
            folder_path,
            repo_type=None,
            revision=None,
            allow_patterns=None,
            ignore_patterns=None,
            delete_patterns=None,
            commit_message=None,
            **_,
        ):
            fake._call("upload_folder", repo_id, revision, tuple(allow_patterns or ()))
            files = fake.repos[repo_id][revision or "main"]
            root = Path(folder_path)
            local = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
            added = set(filter_repo_objects(local, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
            for path in (
                filter_repo_objects(list(files), allow_patterns=delete_patterns or []) if delete_patterns else []
            ):
                if path not in added:
                    del files[path]
            for path in added:
                files[path] = (root / path).read_bytes()

        def snapshot_download(
            self, repo_id, *, repo_type=None, revision=None, allow_patterns=None, local_dir=None, **_
        ):
            fake._call("snapshot_download", repo_id, revision, local_dir is not None)
            if repo_id not in fake.repos or (revision or "main") not in fake.repos[repo_id]:
                raise HfHubHTTPError("404 Client Error: Repository Not Found", response=_response(404))
            files = fake.repos[repo_id][revision or "main"]
            target = Path(local_dir) if local_dir else fake.cache / repo_id / (revision or "main")
            for path in filter_repo_objects(list(files), allow_patterns=allow_patterns):
                (target / path).parent.mkdir(parents=True, exist_ok=True)
                (target / path).write_bytes(files[path])
            target.mkdir(parents=True, exist_ok=True)
            return str(target)

        for name, fn in list(locals().items()):
            if name not in ("fake", "self", "monkeypatch") and callable(fn):
                monkeypatch.setattr(HfApi, name, fn)
        return self


def _response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path / "hf-cache").install(monkeypatch)


def _capture(out: Path, examples) -> list:
    sink = open_sink(out)
    batches = run_examples(sink, examples)
    sink.close()
    return batches


def test_push_creates_repo_and_branch_and_uploads_exactly_the_committed_dataset(tmp_path, fake_hub):
    out = tmp_path / "out"
    _capture(out, [0, 1, 2])
    (out / "l00h00q" / ".s000123-p0000.parquet.tmp").write_bytes(b"in flight")  # never uploaded
    # Parquet files no commit lists (a killed run's renamed shards, a user's copies) are never published:
    # the Hub's glob configs would read them.
    listed = sorted((out / "l00h00q").glob("*.parquet"))[0]
    for stray in ("l00h00q/s000999-p0000.parquet", "l00h00q/copy.parquet", "l07h00q/s000000-p0000.parquet"):
        (out / stray).parent.mkdir(exist_ok=True)
        (out / stray).write_bytes(listed.read_bytes())
    url = hub.push(out, "org/qk", revision="tiny-llama", private=True)
    assert url == "https://huggingface.co/datasets/org/qk/tree/tiny-llama"
    assert ("create_repo", "org/qk", "dataset", True) in fake_hub.calls
    assert ("create_branch", "org/qk", "tiny-llama") in fake_hub.calls
    uploads = [c for c in fake_hub.calls if c[0] == "upload_folder"]
    assert [u[3] for u in uploads] == [
        ("l*h*/*.parquet",),
        ("qk_sniff.json", "examples.parquet", "README.md", "buckets.png"),
    ]  # shards first
    remote = fake_hub.repos["org/qk"]["tiny-llama"]
    manifest = read_manifest(out)
    shards = {f"{key}/{name}" for key, names in manifest["shards"].items() for name in names}
    assert set(remote) == shards | {"qk_sniff.json", "examples.parquet", "README.md", "buckets.png"}
    card = remote["README.md"].decode()
    assert "load_dataset('org/qk', 'l00h00k', split=\"train\", revision='tiny-llama')" in card
    assert fake_hub.repos["org/qk"]["main"] == {}


def test_hub_failure_is_raised_with_the_hubs_message(tmp_path, fake_hub):
    out = tmp_path / "out"
    _capture(out, [0])
    fake_hub.fail["upload_folder"] = HfHubHTTPError(
        "403 Forbidden: You don't have the rights to create a dataset under the namespace 'org'.",
        response=_response(403),
    )
    with pytest.raises(HubError, match="pushing .* to org/qk failed: 403 Forbidden: You don't have the rights"):
        hub.push(out, "org/qk")
    open_sink(out).close()  # the lock was released: a capture can open the folder again


def test_pull_resume_push_round_trip(tmp_path, fake_hub):
    first = tmp_path / "first"
    batches = _capture(first, [0, 1])
    hub.push(first, "org/qk", revision="b")

    assert hub.pull("org/qk", tmp_path / "nowhere", revision="other", missing_ok=True) is None
    with pytest.raises(HubError, match="does not exist"):
        hub.pull("org/missing", tmp_path / "nowhere")

    second = tmp_path / "second"  # another machine: pull, resume, push
    assert hub.pull("org/qk", second, revision="b") == second
    sink = open_sink(second)
    assert sink.committed_ids() == {0, 1}
    with pytest.raises(CommittedExampleError):  # example 1 again: an error, never written twice
        run_examples(sink, [1])
    batches += run_examples(sink, [2, 3])
    sink.close()
    hub.push(second, "org/qk", revision="b")
    remote = fake_hub.repos["org/qk"]["b"]
    local = {p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file()}
    assert set(remote) == local - {".qk_sniff.lock", ".qk_sniff.json.prev"} - {
        p for p in local if p.startswith(".cache/")
    }
    assert read_manifest(second)["examples"].keys() == {"0", "1", "2", "3"}

    # Loading straight from the repo reads exactly the committed rows.
    table = qk_attn.load("org/qk", layer=1, head=0, kind="k", revision="b")
    assert sort_rows(table).equals(sort_rows(qk_attn.load(second, layer=1, head=0, kind="k")))
    assert qk_attn.load_vectors("org/qk", layer=0, head=1, kind="q", revision="b").shape[1] == 8


def test_push_and_pull_refuse_to_lose_examples(tmp_path, fake_hub):
    a, b = tmp_path / "a", tmp_path / "b"
    _capture(a, [0, 1])
    hub.push(a, "org/qk")
    _capture(b, [5])
    with pytest.raises(HubError, match="holds 2 committed example\\(s\\) that .* lacks; pushing would delete them"):
        hub.push(b, "org/qk")
    with pytest.raises(HubError, match="holds 1 committed example\\(s\\) that org/qk lacks"):
        hub.pull("org/qk", b)
    assert {k for k in fake_hub.repos["org/qk"]["main"] if k.endswith(".parquet") and "/" in k} == {
        f"{key}/{n}" for key, names in read_manifest(a)["shards"].items() for n in names
    }
    assert sort_rows(folder_table(b)).num_rows > 0


def test_pushed_files_hold_no_local_paths_damage_is_never_pushed_and_failures_leave_no_lock(tmp_path, fake_hub):
    out = tmp_path / "out"
    source = {"dataset": str(tmp_path / "docs.jsonl"), "tokenizer": str(tmp_path / "tok"), "split": "train"}
    sink = open_sink(out, source=source)
    run_examples(sink, [0, 1])
    sink.close()
    hub.push(out, "org/qk")
    remote = fake_hub.repos["org/qk"]["main"]
    assert all(str(tmp_path).encode() not in data for data in remote.values())
    pulled = tmp_path / "pulled"
    hub.pull("org/qk", pulled)
    assert read_manifest(pulled)["source"]["dataset"] == "docs.jsonl (local)"
    open_sink(pulled, source=source).close()  # the same capture: it resumes where it was made
    assert not (out / ".qk_sniff.lock").exists() and not (pulled / ".qk_sniff.lock").exists()

    key, names = next(iter(read_manifest(out)["shards"].items()))
    data = bytearray((out / key / names[0]).read_bytes())
    data[len(data) // 2] ^= 1
    (out / key / names[0]).write_bytes(bytes(data))
    before = dict(remote)
    with pytest.raises(StorageError, match="qk-sniff repair"):
        hub.push(out, "org/qk")
    assert fake_hub.repos["org/qk"]["main"] == before and not (out / ".qk_sniff.lock").exists()

    fake_hub.fail["snapshot_download"] = OSError("no network")
    with pytest.raises(HubError, match="no network"):
        hub.pull("org/qk", tmp_path / "new")
    assert not (tmp_path / "new").exists()  # no folder, no lock left behind


def test_a_pulled_copy_resumes_with_the_same_local_files_anywhere_and_refuses_others(tmp_path, fake_hub):
    """The pushed manifest names local sources by their last part only; their fingerprints (no
    paths) tell the same files (here in another folder, as on another machine) from others."""
    made, moved, other = (tmp_path / name for name in ("made", "moved", "other"))
    for folder, text in ((made, "one"), (moved, "one"), (other, "two")):
        (folder / "tok").mkdir(parents=True)
        (folder / "docs.jsonl").write_text(f'{{"text": "{text}"}}\n')
        (folder / "tok" / "tokenizer.json").write_text("{}")
        (folder / "tok" / "model.safetensors").write_text(text)  # weights are not the tokenizer's
    out = tmp_path / "out"
    sink = open_sink(out, source={"dataset": str(made / "docs.jsonl"), "tokenizer": str(made / "tok")})
    run_examples(sink, [0, 1])
    sink.close()
    hub.push(out, "org/qk")
    assert all(str(tmp_path).encode() not in data for data in fake_hub.repos["org/qk"]["main"].values())
    pulled = tmp_path / "pulled"
    hub.pull("org/qk", pulled)
    assert read_manifest(pulled)["source_files"] == read_manifest(out)["source_files"]
    open_sink(pulled, source={"dataset": str(moved / "docs.jsonl"), "tokenizer": str(other / "tok")}).close()
    with pytest.raises(ValueError, match=r"dataset.path: 'docs.jsonl \(local\) \(16 bytes, fingerprint \w+\)' there"):
        open_sink(pulled, source={"dataset": str(other / "docs.jsonl"), "tokenizer": str(moved / "tok")})


def test_push_shows_a_bar_over_its_shards_and_quiet_turns_every_bar_off(tmp_path, fake_hub, monkeypatch, capfd):
    """`qk-sniff push` checks each shard with a bar on stderr and leaves huggingface_hub's own
    bars on; `--quiet` shows neither (restored afterwards); `pull --quiet` turns the Hub's off."""
    import importlib

    from huggingface_hub.utils import are_progress_bars_disabled

    from qk_attn import cli

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not its `tqdm` class
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})  # whatever earlier tests switched off
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    hub_bars_on = []
    for name in ("upload_folder", "snapshot_download"):
        fake = getattr(HfApi, name)

        def recording(self, *args, _fake=fake, **kwargs):
            hub_bars_on.append(not are_progress_bars_disabled())
            return _fake(self, *args, **kwargs)

        monkeypatch.setattr(HfApi, name, recording)
    out = tmp_path / "out"
    _capture(out, [0, 1, 2])
    shards = sum(len(names) for names in read_manifest(out)["shards"].values())

    assert cli.main(["push", str(out), "--repo", "org/qk"]) == 0
    err = capfd.readouterr().err
    assert re.search(rf"qk-sniff push: shards: 100%\|[^|]*\| {shards}/{shards} \[[^\]]*(shard/s|s/shard)\]", err), err
    assert hub_bars_on and all(hub_bars_on)
    hub_bars_on.clear()
    assert cli.main(["push", str(out), "--repo", "org/qk", "--quiet"]) == 0
    assert capfd.readouterr().err == "" and hub_bars_on and not any(hub_bars_on)
    hub_bars_on.clear()
    assert cli.main(["pull", str(tmp_path / "pulled"), "--repo", "org/qk", "-q"]) == 0
    assert capfd.readouterr().err == "" and hub_bars_on and not any(hub_bars_on)
    assert not are_progress_bars_disabled()  # as it was before the commands
    # huggingface_hub's bars switched off (as transformers' disable_progress_bar() and `run --quiet` do):
    # push's own bar follows them, so `run --push --quiet` pushes without one.
    hub_tqdm.progress_bar_states["_global"] = False
    hub.push(out, "org/qk")
    assert capfd.readouterr().err == ""


def test_pull_into_a_file_is_refused_in_one_line(tmp_path, fake_hub):
    """It printed a raw `[Errno 17] File exists`."""
    a = tmp_path / "a"
    _capture(a, [0])
    hub.push(a, "org/qk")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match=r"notes\.txt is a file; pull writes the capture into a folder"):
        hub.pull("org/qk", tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_load_of_a_name_neither_a_folder_nor_on_the_hub_says_so_in_one_line(tmp_path, fake_hub, monkeypatch):
    """A bare name is a Hub id too: its failure was huggingface_hub's message over two lines, without
    saying that no local folder of that name exists either."""
    monkeypatch.chdir(tmp_path)
    fake_hub.fail["snapshot_download"] = OSError("no network\nAn error happened while trying to locate the files")
    with pytest.raises(HubError) as raised:
        qk_attn.load("nowhere")
    assert "\n" not in str(raised.value) and str(raised.value).endswith("(and no local folder nowhere exists)")
