"""A forward refused after it returned refuses its examples only (qk_attn.capture.refusals).

On a GPU a forward leaves some checks to the sink, which reads them on the host later: its
positions counting up by one, and a static cache's offset that the host derived. Here CPU forwards
build their tokens as on a device (`builds_on_host` patched, as tests/support/device_path.py does),
so these checks run where a GPU's would. Whichever way it is found, the bad forward's examples are
refused with one error, none of their rows is kept, and the examples committed before and after
it are recorded exactly as a session without the bad forward records them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import qk_attn
from qk_attn.capture import forward as forward_module
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import CaptureError, MisnumberedPositions
from support.models import VOCAB, build, cache_kw, padded_batch
from support.oracle import rows_by_key
from support.run import all_rows, assert_same_rows

torch.set_grad_enabled(False)


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB - 2, (1, length), generator=torch.Generator().manual_seed(seed))


def _skipped_positions(model, s) -> None:
    """Examples [1, 2]: a left-padded prompt given position_ids, then a decode step given none, which
    skips positions in the short row (test_positions.py)."""
    batch = padded_batch("left", lengths=(7, 4))
    cache = DynamicCache(config=model.config)
    s.begin([1, 2])
    model(**batch, **cache_kw(cache))
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    model(input_ids=torch.tensor([[40], [50]]), attention_mask=mask, **cache_kw(cache))


def _reset_static_cache(model, s) -> None:
    """Example [1]: decode steps over a static cache emptied behind the session's back (its layers reset;
    Cache.reset() is seen and starts a new example), so the offset the host derived for the next step
    is wrong (test_handoff.py)."""
    ids = _ids(9, seed=1)
    cache = StaticCache(config=model.config, max_cache_len=16)
    s.begin([1])
    model(input_ids=ids[:, :5], **cache_kw(cache))
    for t in range(5, 7):
        model(input_ids=ids[:, t : t + 1], position_ids=torch.tensor([[t]]), **cache_kw(cache))
    for layer in cache.layers:
        layer.reset()
    model(input_ids=ids[:, 7:8], position_ids=torch.tensor([[7]]), **cache_kw(cache))


BAD_FORWARDS = {
    "skipped positions": (_skipped_positions, MisnumberedPositions, r"examples \[2\]: the positions RoPE used"),
    "reset static cache": (_reset_static_cache, CaptureError, r"the cache was at position 0, not 7"),
}


def _good_document(model, s, example_id: int, seed: int) -> None:
    s.begin([example_id])
    model(input_ids=_ids(6, seed), use_cache=False)


def _capture(model, tmp_path, name: str, bad: str | None, on_device: bool, into: str) -> dict:
    """Rows of a session that records document 0, then (when `bad`) the bad forwards, then document 3."""
    settings = dict(sampler="log_uniform", min_bucket_size=4, base_rate=0.5)
    out = tmp_path / name
    with qk_attn.session(**settings, **({"output": out} if into == "parquet" else {})) as s:
        _good_document(model, s, 0, seed=5)
        s.commit()
        if bad is not None:
            make, error, message = BAD_FORWARDS[bad]
            found_late = s.table if into == "memory" else s.flush
            if on_device:  # the forwards run; the sink finds the failed check when it reads them
                make(model, s)
                with pytest.raises(error, match=rf"{message}.*had returned: none of their rows is kept"):
                    found_late()
            else:  # the CPU refuses the forward itself
                with pytest.raises(error, match=message):
                    make(model, s)
            s.commit()  # nothing of theirs is committed
        _good_document(model, s, 3, seed=6)
        s.commit()
        if into == "memory":
            return rows_by_key(s.table())
    assert verify_dataset(out, log=lambda *_: None) == []
    assert sorted(qk_attn.load_examples(out)["example_id"].to_pylist()) == [0, 3]
    return {key[:5]: vector for key, vector in all_rows(out).items()}


@pytest.mark.parametrize("into", ["memory", "parquet"])
@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("bad", sorted(BAD_FORWARDS))
def test_a_refused_forward_takes_only_its_examples(tmp_path, monkeypatch, bad, on_device, into):
    model = build("llama3", "qk_sniff")
    want = _capture(model, tmp_path, "want", None, False, into)
    if on_device:
        monkeypatch.setattr(forward_module, "builds_on_host", lambda device: False)
    got = _capture(model, tmp_path, "got", bad, on_device, into)
    assert {key[0] for key in got} == {0, 3}
    assert_same_rows(got, want)


def test_a_sequence_refused_late_is_refused_at_its_next_forward(tmp_path, monkeypatch):
    """On a device the saver learns of the refusal some forwards later. A decode that goes on over the
    refused sequence is refused at its first forward after that, inside the forward, as the CPU would
    have refused the first bad one; the next document is recorded as usual."""
    monkeypatch.setattr(forward_module, "builds_on_host", lambda device: False)
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(7, 4))
    out = tmp_path / "out"
    with qk_attn.session(output=out, sampler="log_uniform", min_bucket_size=4, base_rate=0.5) as s:
        s.begin([1, 2])
        cache = DynamicCache(config=model.config)
        model(**batch, **cache_kw(cache))
        mask = batch["attention_mask"]
        with pytest.raises(MisnumberedPositions, match=r"examples \[2\].*had returned"):
            for step in range(200):  # the saver takes the held forwards 16 at a time
                mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
                model(input_ids=torch.tensor([[40], [50]]), attention_mask=mask, **cache_kw(cache))
        assert 0 < step < 199  # found some forwards later, and then at once
        refused = r"continues the cache of examples \[1, 2\], which were discarded when a forward of theirs was refused"
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        with pytest.raises(CaptureError, match=refused):  # its sequence is gone with it, and it says so
            model(input_ids=torch.tensor([[40], [50]]), attention_mask=mask, **cache_kw(cache))
        _good_document(model, s, 3, seed=6)
        s.commit()
    assert qk_attn.load_examples(out)["example_id"].to_pylist() == [3]
    assert verify_dataset(out, log=lambda *_: None) == []


@pytest.mark.parametrize("into", ["memory", "parquet"])
def test_vectors_beyond_float16s_range_refuse_their_examples(tmp_path, into):
    """vector_dtype="float16" cannot hold a query of 1e6: the cast would store inf. The examples of that
    forward are refused (found where the rows reach the host, on any device); those before and after
    are recorded, equal to a float32 session's rows cast to float16."""
    model = build("llama3", "qk_sniff")
    q_proj = model.model.layers[1].self_attn.q_proj
    out = tmp_path / "out"

    def capture(vector_dtype, bad: bool):
        settings = dict(sampler="all", vector_dtype=vector_dtype)
        with qk_attn.session(**settings, **({"output": out / vector_dtype} if into == "parquet" else {})) as s:
            _good_document(model, s, 0, seed=5)
            s.commit()
            if bad:
                q_proj.weight.mul_(1e7)
                try:
                    _good_document(model, s, 1, seed=7)
                finally:
                    q_proj.weight.div_(1e7)
                found_late = s.table if into == "memory" else s.flush
                with pytest.raises(CaptureError, match=r"vectors of examples \[1\] are not finite in float16"):
                    found_late()
                s.commit()  # nothing of theirs is committed
            _good_document(model, s, 3, seed=6)
            s.commit()
            if into == "memory":
                return rows_by_key(s.table())
        return {key[:5]: vector for key, vector in all_rows(out / vector_dtype).items()}

    got = capture("float16", bad=True)
    want = capture("float32", bad=False)
    assert {key[0] for key in got} == {0, 3}
    assert got.keys() == want.keys()
    for key, vector in want.items():
        assert (got[key] == vector.astype("float16")).all(), key
