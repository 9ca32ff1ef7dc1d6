"""generate()'s decoding strategies beyond greedy and sampling, against one uncached forward over
the final sequence. Assisted decoding (an assistant model, prompt lookup, early exit) verifies draft
tokens in one forward and crops the rejected ones from the cache after it: when generation stops
right after such a forward (an EOS), nothing rolls back later, so the rejected drafts' rows were
committed. It is refused at its first forward, before any row, and the session goes on. Early exit
drafts with the model itself, its layer count cut by transformers until the draft returns: the draft
is not recorded and the verifying forward is refused, so the model keeps all its layers afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qk_attn
from qk_attn.errors import CaptureError
from support.models import build
from support.oracle import rows_by_key

torch.set_grad_enabled(False)

BEFORE = torch.arange(2, 8)[None]  # a complete example before the refused generate()
REPETITIVE = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])  # n-grams prompt lookup drafts from


def _one_shot(model, ids, example_id):
    with qk_attn.session(sampler="all", example_ids=[example_id]) as s:
        model(input_ids=ids, use_cache=False)
    return rows_by_key(s.table())


def _assisted(strategy):
    """generate() arguments under which the main model's first forward verifies drafts, and (on the
    tiny seeded models) rejects some while its own next token is the EOS, so generation ends there."""
    if strategy == "prompt_lookup":
        return dict(input_ids=REPETITIVE, prompt_lookup_num_tokens=3, eos_token_id=29)
    if strategy == "sdpa_assistant":
        return dict(
            input_ids=torch.arange(5, 13)[None], assistant_model=build("llama3", "sdpa", seed=7), eos_token_id=45
        )
    return dict(input_ids=torch.arange(5, 13)[None], assistant_early_exit=1)  # the model drafts with its first layer


@pytest.mark.parametrize("strategy", ["prompt_lookup", "sdpa_assistant", "early_exit"])
def test_assisted_decoding_is_refused_before_any_row_and_the_session_goes_on(strategy):
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        model(input_ids=BEFORE)
        with pytest.raises(CaptureError, match=r"^qk_sniff: assisted decoding .* verifies draft tokens"):
            model.generate(**_assisted(strategy), max_new_tokens=8, do_sample=False, pad_token_id=0)
        s.begin([2])
        after = model.generate(input_ids=torch.arange(5, 13)[None], max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = rows_by_key(s.table())
    last = after.shape[1] - 1  # the last generated token is never fed back
    want = {**_one_shot(model, BEFORE, 1), **{k: v for k, v in _one_shot(model, after, 2).items() if k[4] != last}}
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=1e-4, atol=1e-5, err_msg=str(key))
