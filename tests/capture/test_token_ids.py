"""Issue 12: every q and k row carries the vocabulary id of its token; vision keys carry null."""

from __future__ import annotations

import pytest
import torch

import qk_attn
from support.models import build, cache_kw, padded_batch

torch.set_grad_enabled(False)


def _token_of(input_ids, attention_mask, position_ids, example_ids) -> dict[tuple[int, int], int]:
    """(example, position) -> token id, from the tensors the model was given."""
    out = {}
    for b, example in enumerate(example_ids):
        for t in torch.nonzero(attention_mask[b]).flatten().tolist():
            out[(example, int(position_ids[b, t]))] = int(input_ids[b, t])
    return out


def _assert_token_ids(table, expected):
    data = table.to_pydict()
    assert "token_id" in data
    assert table.num_rows > 0
    for e, p, tok in zip(data["example_id"], data["position"], data["token_id"]):
        assert tok == expected[(e, p)], (e, p)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_token_id_of_every_row_is_the_input_token(side, backend):
    model = build("qwen3", "qk_sniff")
    batch = padded_batch(side, lengths=(11, 7))
    with qk_attn.session(sampler="all", backend=backend, example_ids=[20, 21]) as s:
        model(**batch)
    table = s.table()
    assert set(table["kind"].to_pylist()) == {"q", "k"}
    _assert_token_ids(table, _token_of(batch["input_ids"], batch["attention_mask"], batch["position_ids"], [20, 21]))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_rows_carry_the_generated_tokens(cache):
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(7, 5))
    with qk_attn.session(sampler="all", example_ids=[0, 1]) as s:
        sequences = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=4,
            do_sample=False,
            cache_implementation=cache,
            pad_token_id=0,
        )
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _assert_token_ids(s.table(), _token_of(sequences, mask, positions, [0, 1]))


def test_chunked_prefill_rows_carry_their_chunks_tokens():
    from transformers import StaticCache

    model = build("gemma3", "qk_sniff")
    ids = torch.randint(2, 90, (1, 12), generator=torch.Generator().manual_seed(4))
    with qk_attn.session(sampler="all", example_ids=[3]) as s:
        cache = StaticCache(config=model.config, max_cache_len=16)
        for chunk in (ids[:, :5], ids[:, 5:9], ids[:, 9:]):
            model(input_ids=chunk, **cache_kw(cache))
    ones = torch.ones_like(ids)
    _assert_token_ids(s.table(), _token_of(ids, ones, torch.arange(12)[None], [3]))


def test_inputs_embeds_give_null_token_ids_and_vision_keys_are_null():
    model = build("llama3", "qk_sniff")
    batch = padded_batch("right")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with qk_attn.session(sampler="all") as s:
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    assert set(s.table()["token_id"].to_pylist()) == {None}

    from support.models import _mllama_image_batch

    model = build("mllama", "sdpa")
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    batch, _ = _mllama_image_batch()
    with qk_attn.session(sampler="all", example_ids=[0, 1]) as s:
        model(**batch)
    data = s.table().to_pydict()
    cross = model.config.text_config.cross_attention_layers[0]
    positions = torch.arange(9).expand(2, 9)  # no position_ids given: token indices
    expected = _token_of(batch["input_ids"], batch["attention_mask"], positions, [0, 1])
    for e, l, k, p, tok in zip(data["example_id"], data["layer"], data["kind"], data["position"], data["token_id"]):
        if l == cross and k == "k":
            assert tok is None
        else:
            assert tok == expected[(e, p)]


def test_verify_finds_rows_that_disagree_on_a_token(tmp_path):
    import numpy as np

    from qk_attn.dataset.token_checks import token_id_problems
    from qk_attn.dataset.verify import verify_dataset

    model = build("llama3", "qk_sniff")
    with qk_attn.session(output=tmp_path / "out", sampler="all", example_ids=[0, 1]):
        model(**padded_batch("right"))
    assert verify_dataset(tmp_path / "out", log=lambda *_: None) == []
    ids, pos = np.array([0, 0, 1]), np.array([4, 4, 4])
    assert token_id_problems([(ids, pos, np.array([7, 7, 9]))]) == []
    problems = token_id_problems([(ids, pos, np.array([7, 7, 9])), (ids[:1], pos[:1], np.array([8]))])
    assert problems and "example 0 position 4: 7 and 8" in problems[0]
