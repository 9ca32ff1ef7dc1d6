"""A local model folder is known by the whole content of its weight files: a fine-tune or LoRA merge
saved over model.safetensors keeps its size and its first and last MiB (all the sampled fingerprint
read), and resuming into the old capture would mix two models. Captures recorded with the sampled
fingerprint only still resume with the same files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qk_attn import cli
from qk_attn.run import runner
from qk_attn.storage import settings
from qk_attn.storage.manifest import read_manifest, write_json_atomic
from support.run import SPARSE, write_config

MIB = 1 << 20


@pytest.fixture
def big_model(tiny_model, tmp_path):
    """The tiny Llama with wide MLPs: model.safetensors is ~6 MB, beyond the sampled first and last MiB."""
    folder = tmp_path / "models" / "big"
    shutil.copytree(tiny_model, folder)
    config = LlamaConfig.from_pretrained(folder)
    config.intermediate_size = 8192
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _touch(path) -> None:
    """A later mtime, as a save seconds later has (fingerprints are kept per path, size and mtime)."""
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def _change_the_middle(weights) -> None:
    """A fine-tune of one matrix saved over the file: same size, same first and last MiB."""
    before = weights.read_bytes()
    header = json.loads(before[8 : 8 + int.from_bytes(before[:8], "little")])
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.q_proj.weight"] *= 2
    save_file(tensors, weights, metadata=header.get("__metadata__"))
    _touch(weights)
    after = weights.read_bytes()
    assert len(after) == len(before) > 4 * MIB and after != before
    assert after[:MIB] == before[:MIB] and after[-MIB:] == before[-MIB:]


def test_weights_changed_in_the_middle_refuse_the_resume(big_model, docs, tmp_path, capsys, monkeypatch):
    path, rows = docs
    out = tmp_path / "out"
    config = write_config(tmp_path, big_model, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.max_samples=2"]) == 0
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.max_samples=3", "--dry-run"]) == 0
    capsys.readouterr()

    _change_the_middle(big_model / "model.safetensors")
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for argv in (["--dry-run"], []):
        assert cli.main(["run", "--config", config, "--quiet", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "holds a capture with different settings (model.name: " in err, err
        assert "fingerprint" in err
    assert len(read_manifest(out)["examples"]) == 2


def test_a_capture_with_sampled_model_fingerprints_still_resumes(big_model, docs, tmp_path, capsys):
    """Folders written before content hashes record {"files", "bytes", "sha256"} only: the same
    model resumes them (compared by what they record), and the resumed run records the content hash."""
    path, rows = docs
    out = tmp_path / "out"
    config = write_config(tmp_path, big_model, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.max_samples=2"]) == 0
    manifest = read_manifest(out)
    for record in (manifest["source_files"]["model"], manifest["model"]["files"]):
        assert set(record) == {"files", "bytes", "sha256", "content_sha256"}
        del record["content_sha256"]
    write_json_atomic(out / "qk_sniff.json", manifest)

    assert cli.main(["run", "--config", config, "--quiet"]) == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    assert len(manifest["examples"]) == len(rows)
    assert "content_sha256" in manifest["model"]["files"]  # the resumed run's model, whole
    assert cli.verify_dataset(out, log=lambda *_: None) == []
    _change_the_middle(big_model / "model.safetensors")  # the runs after it compare the content
    assert cli.main(["run", "--config", config, "--quiet", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "holds captures of model" in err and err.count("weight files sha256") == 2


def test_the_content_hash_covers_every_byte_in_chunks_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "CONTENT_CHUNK", 1000)
    monkeypatch.setattr(settings, "READ_BYTES", 300)
    folder = tmp_path / "m"
    folder.mkdir()
    data = {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 40 + b"tail"}
    for name, content in data.items():
        (folder / name).write_bytes(content)
    want = hashlib.sha256()
    for name, content in sorted(data.items()):
        want.update(f"{name}\0{len(content)}\0".encode())
        for start in range(0, len(content), 1000):
            want.update(hashlib.sha256(content[start : start + 1000]).digest())
    fingerprint = settings.local_fingerprint(str(folder), "model")
    assert fingerprint["content_sha256"] == want.hexdigest()
    assert settings.local_fingerprint(str(folder), "dataset").keys() == {"files", "bytes", "sha256"}

    weights = folder / "model.safetensors"
    changed = bytearray(data["model.safetensors"])
    changed[5000] ^= 1  # in the middle: the sampled sha256 misses it, the content hash does not
    monkeypatch.setattr(settings, "SAMPLE_BYTES", 4096)
    before = settings.local_fingerprint(str(weights), "model")
    weights.write_bytes(bytes(changed))
    _touch(weights)
    after = settings.local_fingerprint(str(weights), "model")
    assert after["sha256"] == before["sha256"] and after["content_sha256"] != before["content_sha256"]
    assert not settings.same_files(before, after)
    old = {k: before[k] for k in ("files", "bytes", "sha256")}  # a record from before content hashes
    assert settings.same_files(old, after) and settings.same_files(after, old)


def test_a_run_hashes_the_weights_once(big_model, docs, tmp_path, capsys, monkeypatch):
    calls = []
    original = settings._content_sha256
    monkeypatch.setattr(settings, "_content_sha256", lambda *a: calls.append(a) or original(*a))
    config = write_config(tmp_path, big_model, docs[0], tmp_path / "out", capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet", "--set", "dataset.max_samples=2"]) == 0
    assert len(calls) == 1
