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
import transformers as tf

import qk_attn
from qk_attn.errors import CaptureError
from support.models import build, cache_kw
from support.oracle import rows_by_key
from support.run import all_rows, assert_same_rows

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


# ---- custom decoding loops that move the cache's rows (beam search by hand, Hub custom_generate) ----

PROMPTS = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
NEXT = torch.tensor([[11], [12]])


class OwnRowMethodsCache(tf.DynamicCache):
    """A modeling file's cache (as MiniMax's) that moves its rows and crops in methods of its own,
    without calling Cache's."""

    def batch_select_indices(self, indices):
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[indices], layer.values[indices]

    def reorder_cache(self, beam_idx):
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats):
        for layer in self.layers:
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)

    def crop(self, max_length):
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[..., :max_length, :], layer.values[..., :max_length, :]


SWAP = torch.tensor([1, 0])
MOVES = {  # (cache class, how its rows are moved)
    "reorder_cache": (tf.DynamicCache, lambda cache: cache.reorder_cache(SWAP)),
    "batch_select_indices": (tf.DynamicCache, lambda cache: cache.batch_select_indices(SWAP)),
    "batch_repeat_interleave": (tf.DynamicCache, lambda cache: cache.batch_repeat_interleave(1)),  # a no-op, a move
    # A modeling file's cache whose own methods do not call Cache's (MiniMax's): its moves went unseen.
    "own reorder_cache": (OwnRowMethodsCache, lambda cache: cache.reorder_cache(SWAP)),
    "own batch_select_indices": (OwnRowMethodsCache, lambda cache: cache.batch_select_indices(SWAP)),
    "own batch_repeat_interleave": (OwnRowMethodsCache, lambda cache: cache.batch_repeat_interleave(1)),
    # A layer's public row methods move its rows without the Cache's: counted per layer.
    "layers' reorder_cache": (tf.DynamicCache, lambda cache: [layer.reorder_cache(SWAP) for layer in cache.layers]),
    "layers' batch_select_indices": (
        tf.DynamicCache,
        lambda cache: [layer.batch_select_indices(SWAP) for layer in cache.layers],
    ),
}


@pytest.mark.parametrize("how", sorted(MOVES))
def test_a_forward_after_the_cache_rows_moved_is_refused_and_the_session_goes_on(how):
    cache_class, move = MOVES[how]
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        cache = cache_class(config=model.config)
        s.begin([1, 2])
        model(input_ids=PROMPTS, **cache_kw(cache))
        move(cache)
        with pytest.raises(
            CaptureError, match=r"^qk_sniff: the rows of the cache that holds examples \[1, 2\] were moved"
        ):
            model(input_ids=NEXT, **cache_kw(cache))
        s.begin([3])
        model(input_ids=BEFORE)
    got = rows_by_key(s.table())
    assert {key[0] for key in got} == {3}  # the moved examples are discarded, the next one is whole
    assert got.keys() == _one_shot(model, BEFORE, 3).keys()


def test_rows_are_recorded_when_no_row_moved():
    """The same loop without the move: every row, equal to one uncached forward over each sequence."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        cache = tf.DynamicCache(config=model.config)
        s.begin([1, 2])
        model(input_ids=PROMPTS, **cache_kw(cache))
        model(input_ids=NEXT, **cache_kw(cache))
    got = rows_by_key(s.table())
    whole = torch.cat((PROMPTS, NEXT), 1)
    want = {**_one_shot(model, whole[:1], 1), **_one_shot(model, whole[1:], 2)}
    assert_same_rows(got, want, exact=False)  # cached and uncached attention round differently


def test_new_sequences_begun_on_a_moved_cache_are_recorded():
    """begin() names the rows afresh: a cache whose rows moved before it is fine."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        cache = tf.DynamicCache(config=model.config)
        s.begin([1, 2])
        model(input_ids=PROMPTS, **cache_kw(cache))
        s.commit()
        cache.reorder_cache(torch.tensor([1, 0]))
        s.begin([5, 6])
        model(input_ids=NEXT, **cache_kw(cache))
    got = rows_by_key(s.table())
    assert {key[0] for key in got} == {1, 2, 5, 6}
    assert {key[4] for key in got if key[0] in (5, 6)} == {PROMPTS.shape[1]}  # only the new tokens


@pytest.mark.skipif(not hasattr(tf.cache_utils, "Fp8QuantizedLayer"), reason="no fp8 quantized cache before 5.2x")
def test_a_cache_that_rounds_the_new_keys_is_refused_and_the_session_goes_on():
    """The fp8 quantized cache hands attention this forward's keys after an fp8 round trip: not the
    model's keys. Refused at the first forward, before any row; the next document is recorded."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        with pytest.raises(
            CaptureError, match=r"^qk_sniff: this forward's cache \(QuantizedCache of Fp8QuantizedLayer\)"
        ):
            model.generate(
                input_ids=BEFORE,
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="quantized",
                cache_config={"backend": "fp8"},
            )
        s.begin([2])
        model(input_ids=BEFORE)
    got = rows_by_key(s.table())
    assert_same_rows(got, _one_shot(model, BEFORE, 2))


@pytest.mark.parametrize("module", ["transformers.cache_utils", "transformers.integrations.fp8_cache"])
def test_a_new_cache_layer_type_of_transformers_that_rounds_keys_is_refused(monkeypatch, module):
    """A release that adds a layer type to cache_utils (here an fp8 round trip on a DynamicLayer, not a
    quantized class by name), or in a module of its own (a new backend, cache_utils split into a package: it
    was trusted unread there), is not trusted until qk-attn has read its update."""
    from transformers import cache_utils

    def update(self, key_states, value_states, *args, **kwargs):
        rounded = key_states.to(torch.float8_e4m3fn).to(key_states.dtype)
        return cache_utils.DynamicLayer.update(self, rounded, value_states, *args, **kwargs)

    layer_type = type("Fp8KVLayer", (cache_utils.DynamicLayer,), {"update": update, "__module__": module})
    monkeypatch.setattr(cache_utils, "Fp8KVLayer", layer_type, raising=False)
    model = build("llama3", "qk_sniff")
    cache = tf.DynamicCache(config=model.config)
    cache.layers = [layer_type() for _ in cache.layers]
    with qk_attn.session(sampler="all") as s:
        with pytest.raises(CaptureError, match=r"^qk_sniff: this forward's cache \(DynamicCache of Fp8KVLayer\)"):
            model(input_ids=BEFORE, **cache_kw(cache))
    assert s.table() is None


# ---- a generate() that raises between two of its forwards -------------------------------------------


class RaiseAtStep(tf.LogitsProcessor):
    """Raises when the sequences reach `length` tokens: after some decode steps ran, before the next."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] >= self.length:
            raise RuntimeError("a logits processor failed")
        return scores


def test_a_generate_that_raises_between_steps_forgets_its_examples(tmp_path, caplog):
    """Its examples stopped part-way: none of their rows is committed (they would look complete),
    with one warning; examples before and after it are recorded."""
    model = build("llama3", "qk_sniff")
    out = tmp_path / "out"
    with qk_attn.session(output=out, sampler="all") as s:
        s.begin([1])
        model(input_ids=BEFORE)
        s.begin([2, 3])
        with pytest.raises(RuntimeError, match="a logits processor failed"):
            model.generate(
                input_ids=torch.arange(5, 13).repeat(2, 1),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
                logits_processor=tf.LogitsProcessorList([RaiseAtStep(11)]),
            )
        s.commit()
        s.begin([4])
        after = model.generate(input_ids=torch.arange(5, 13)[None], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert "example(s) [2, 3]" in caplog.text and "generate() raised" in caplog.text
    assert qk_attn.load_examples(out)["example_id"].to_pylist() == [1, 4]
    got = {key[:5]: vector for key, vector in all_rows(out).items()}
    want = {**_one_shot(model, BEFORE, 1), **_one_shot(model, after[:, :-1], 4)}
    assert_same_rows(got, want, exact=False)


PROMPT = torch.arange(3, 11)[None]  # 8 tokens: positions 0-7
DRAFTS = torch.tensor([[50, 51, 52, 53]])  # a verifying forward: positions 8-11


CROPS = {  # how 3 of the cache's 12 tokens are cut
    "Cache.crop": (tf.DynamicCache, lambda cache: cache.crop(-3)),
    "a subclass's own crop": (OwnRowMethodsCache, lambda cache: cache.crop(9)),  # not Cache.crop (MiniMax-like)
}


@pytest.mark.parametrize(
    "then, how",
    [("commit", "Cache.crop"), ("begin", "Cache.crop"), ("gone", "Cache.crop")] + [("commit", "a subclass's own crop")],
)
def test_a_cache_cropped_below_its_recorded_tokens_discards_their_example(then, how, caplog):
    """A hand-written speculative step: drafts verified in one forward, the rejected ones cropped from
    the cache after it, when their rows were taken. With no forward after the crop, the example was
    committed with the rejected drafts' rows; now it is discarded, whether the session commits next, a
    forward with new ids continues the cache (those are recorded), or the cache is gone by the commit
    (env mode's exit)."""
    cache_class, crop = CROPS[how]
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        cache = cache_class(config=model.config)
        model(input_ids=PROMPT, **cache_kw(cache))
        model(input_ids=DRAFTS, **cache_kw(cache))
        crop(cache)  # the first draft kept: 9 tokens left
        assert cache.get_seq_length() == 9
        if then == "begin":
            s.begin([2])
            model(input_ids=torch.tensor([[60]]), **cache_kw(cache))
        if then == "gone":
            del cache
        s.commit()
    assert "cropped (Cache.crop) below the 12 tokens recorded for them" in caplog.text
    got = rows_by_key(s.table()) if s.table() is not None else {}
    if then == "begin":
        assert {key[0] for key in got} == {2} and {key[4] for key in got} == {9}
    else:
        assert got == {}


def test_a_cache_emptied_and_reused_before_the_commit_keeps_both_examples():
    """reset() empties the cache after a whole example, and the next begins on it: no rollback of the
    first example's rows (a check of the cache's length at the commit took it for one)."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        cache = tf.DynamicCache(config=model.config)
        model(input_ids=PROMPT, **cache_kw(cache))
        cache.reset()
        s.begin([2])
        model(input_ids=PROMPT[:, :4], **cache_kw(cache))
        s.commit()
    got = rows_by_key(s.table())
    assert {key for key in got if key[0] == 1} == _one_shot(model, PROMPT, 1).keys()
    # Example 2's 4 tokens, at the positions the model used (5.17's reset() zeroes the cache but keeps its length)
    assert len({key[4] for key in got if key[0] == 2}) == 4


def _cache(kind: str, model):
    if kind == "static":
        return tf.StaticCache(config=model.config, max_cache_len=32)
    return tf.DynamicCache(config=model.config)


def _reusable_cache(kind: str, model):
    """A cache that reset() empties (5.17's DynamicCache.reset() zeroes it but keeps its length)."""
    cache = _cache(kind, model)
    model(input_ids=PROMPT, **cache_kw(cache))
    cache.reset()
    if cache.get_seq_length():
        pytest.skip("this transformers' DynamicCache.reset() keeps the cache's length (5.17): not reusable")
    return cache


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_cache_reset_between_two_generates_starts_a_new_example(kind):
    """reset() empties a user's cache for a new conversation: the next generate() on it starts a new
    example, on a static cache too (its length is on the device: a reset is counted, not read), and the
    finished one is kept. A static cache's reset was refused as a rollback and lost the first example."""
    model = build("llama3", "qk_sniff")
    cache = _reusable_cache(kind, model)
    prompts = (PROMPT, torch.arange(30, 37)[None])
    with qk_attn.session(sampler="all") as s:
        outputs = []
        for prompt in prompts:
            outputs.append(
                model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, **cache_kw(cache))
            )
            cache.reset()
    got = rows_by_key(s.table())
    for example, sequence in enumerate(outputs):
        want = _one_shot(model, sequence[:, :-1], example)  # the last generated token is never fed back
        assert {key for key in got if key[0] == example} == want.keys()
        for key, vector in want.items():
            np.testing.assert_allclose(got[key], vector, rtol=1e-4, atol=1e-5, err_msg=str(key))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_reset_cache_refilled_elsewhere_is_not_continued_by_its_old_example(kind):
    """After reset(), another session fills the cache to the length the old example had: a forward
    that goes on without begin() continues that other conversation, not the old example. It was
    appended to the old example; it is refused, and the old example is kept whole."""
    model = build("llama3", "qk_sniff")
    cache = _reusable_cache(kind, model)
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        model(input_ids=PROMPT, **cache_kw(cache))
        cache.reset()
        with qk_attn.session(sampler="all") as other:
            model(input_ids=torch.arange(50, 58)[None], **cache_kw(cache))  # as long as PROMPT
        with pytest.raises(CaptureError, match="continues a cache at position 8 but no sequence"):
            model(input_ids=torch.tensor([[70, 71]]), **cache_kw(cache))
    assert rows_by_key(s.table()).keys() == _one_shot(model, PROMPT, 1).keys()
    assert {key[4] for key in rows_by_key(other.table())} == set(range(8))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_crop_after_a_reset_discards_only_the_example_after_it(kind, caplog):
    """Crops are noted per cache: one after a reset cut the new example, not the one before the reset,
    which was complete (both were discarded)."""
    if kind == "static" and not callable(getattr(tf.cache_utils.StaticLayer, "crop", None)):
        pytest.skip("this transformers' static cache has no crop() (5.17)")
    model = build("llama3", "qk_sniff")
    cache = _reusable_cache(kind, model)
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        model(input_ids=torch.cat((PROMPT, DRAFTS), 1), **cache_kw(cache))
        cache.reset()
        s.begin([2])
        model(input_ids=PROMPT, **cache_kw(cache))
        cache.crop(-2)
    assert s.sink.committed == [1]
    assert "example(s) [2] was cropped" in caplog.text and "[1] was cropped" not in caplog.text


@pytest.mark.parametrize("why", ["committed", "rows moved", "another session"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_refused_continuation_leaves_the_cache_as_it_was_and_the_retry_is_exact(kind, why):
    """The continuation refusals are raised where the forward's mask is built, before a layer writes the
    new tokens into the cache. Raised in the first attention call, they left layer 0's cache one forward
    longer: the retry that the message advises (begin(), the same forward) failed, or on a static cache
    ran at shifted positions, with logits and rows unlike sdpa's."""
    model, sdpa = build("llama3", "qk_sniff"), build("llama3", "sdpa")
    following = torch.tensor([[40, 41, 42]])
    reference = _cache(kind, sdpa)
    sdpa(input_ids=PROMPT, **cache_kw(reference))
    expected = sdpa(input_ids=following, **cache_kw(reference)).logits
    cache = _cache(kind, model)
    if why == "another session":
        with qk_attn.session(sampler="all"):
            model(input_ids=PROMPT, **cache_kw(cache))
    with qk_attn.session(sampler="all") as s:
        if why != "another session":
            s.begin([1])
            model(input_ids=PROMPT, **cache_kw(cache))
        if why == "committed":
            s.commit()
        if why == "rows moved":
            cache.reorder_cache(torch.tensor([0]))
        lengths = [layer.get_seq_length() for layer in cache.layers]
        with pytest.raises((CaptureError, ValueError), match="qk_sniff: this forward continues|committed|were moved"):
            model(input_ids=following, **cache_kw(cache))
        assert [layer.get_seq_length() for layer in cache.layers] == lengths
        s.begin([9])
        logits = model(input_ids=following, **cache_kw(cache)).logits
    assert torch.equal(logits, expected)
    positions = {key[4] for key in rows_by_key(s.table()) if key[0] == 9}
    assert positions == {PROMPT.shape[1], PROMPT.shape[1] + 1, PROMPT.shape[1] + 2}


@pytest.mark.parametrize("training", ["one attention layer", "the model, not its layers"])
def test_a_continuation_refusal_follows_what_is_recorded_in_training_mode(training, caplog):
    """A forward with an attention layer in training mode is not recorded: continuing another session's
    cache, it passes unrecorded (as README says). The model in train() with its layers in eval is
    recorded: refused at the mask, the cache as it was (the check was skipped on the model's flag)."""
    model = build("llama3", "qk_sniff")
    cache = tf.DynamicCache(config=model.config)
    with qk_attn.session(sampler="all"):
        model(input_ids=PROMPT, **cache_kw(cache))
    if training == "one attention layer":
        model.model.layers[0].self_attn.train()
    else:
        model.train()
        model.model.layers.eval()
    with qk_attn.session(sampler="all") as s:
        if training == "one attention layer":
            model(input_ids=DRAFTS, **cache_kw(cache))
            assert "not recording forwards in training mode" in caplog.text and s.table() is None
        else:
            with pytest.raises(CaptureError, match="continues a cache at position 8"):
                model(input_ids=DRAFTS, **cache_kw(cache))
            assert [layer.get_seq_length() for layer in cache.layers] == [8] * len(cache.layers)
    model.eval()


def test_a_crop_that_removes_nothing_recorded_keeps_the_example():
    """crop(0), and a crop back to the recorded end (the cache held more than was recorded: none here),
    change nothing recorded: the example is committed whole."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        cache = tf.DynamicCache(config=model.config)
        model(input_ids=PROMPT, **cache_kw(cache))
        cache.crop(0)
        model(input_ids=DRAFTS[:, :1], **cache_kw(cache))
    got = rows_by_key(s.table())
    assert {key[0] for key in got} == {1} and {key[4] for key in got} == set(range(9))


def test_a_crop_is_not_forgotten_when_another_session_continues_the_cache(caplog):
    """Each cache kept one crop record, reset by every new sequence on it: a second session (or model)
    that continued the cache after the crop erased it, and the first committed the removed tokens."""
    model = build("llama3", "qk_sniff")
    cache = tf.DynamicCache(config=model.config)
    with qk_attn.session(sampler="all") as first:
        first.begin([1])
        model(input_ids=torch.cat((PROMPT, DRAFTS), 1), **cache_kw(cache))
        cache.crop(-3)
        with qk_attn.session(sampler="all") as second:
            second.begin([5])
            model(input_ids=torch.tensor([[60]]), **cache_kw(cache))
    assert (first.table() is None or first.table().num_rows == 0) and "example(s) [1] was cropped" in caplog.text
    assert {key[0] for key in rows_by_key(second.table())} == {5}


# ---- generate() found at any depth, and only for the model it generates with ---------------------


class PassThrough(torch.nn.Module):
    """A wrapper module that only adds frames between generate() and the mask (hooks, adapters)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _behind_wrappers(depth: int):
    model = build("llama3", "qk_sniff")
    for _ in range(depth):
        model.model = PassThrough(model.model)
    return model


def test_generation_refusals_hold_behind_many_wrappers():
    """generate(use_cache=False) and beam search are refused however many frames lie between them and
    the mask: they were looked for within 40 frames, 13-22 more than a plain model needs."""
    model = _behind_wrappers(48)
    for arguments, refusal in ((dict(use_cache=False), "use_cache=False"), (dict(num_beams=2), "beam search")):
        with qk_attn.session(sampler="all"), pytest.raises(CaptureError, match=refusal):
            model.generate(input_ids=PROMPT, max_new_tokens=2, do_sample=False, pad_token_id=0, **arguments)


def test_rows_of_a_batched_generate_end_at_their_eos_behind_many_wrappers():
    """The pad tokens generate() feeds a finished row are not recorded, however deep the model sits."""
    from support.models import StopRow

    model = _behind_wrappers(48)
    with qk_attn.session(sampler="all", example_ids=[0, 1], capture="k", layers="0") as s:
        sequences = model.generate(
            input_ids=torch.arange(5, 15).reshape(2, 5),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=tf.StoppingCriteriaList([StopRow(0, 7)]),
        )
    assert (sequences[0, 7:] == 0).all()  # row 0 ended with its token at position 6
    table = s.table().to_pydict()
    positions = {e: {p for e2, p in zip(table["example_id"], table["position"]) if e2 == e} for e in (0, 1)}
    assert positions == {0: set(range(7)), 1: set(range(sequences.shape[1] - 1))}


class RunsAnotherModel(tf.LogitsProcessor):
    """A logits processor that decodes a second model (a guide model) one token per step, on its own cache."""

    def __init__(self, model, ids):
        self.model, self.ids, self.cache = model, ids, tf.DynamicCache()

    def __call__(self, input_ids, scores):
        held = self.cache.get_seq_length()
        self.model(input_ids=self.ids[:, held : held + 1] if held else self.ids[:, :4], **cache_kw(self.cache))
        return scores


def _generate_guided(model, processor, stopping_criteria=(), **kwargs) -> dict:
    """Examples 0 and 1 generated by `model` with `processor` running a guide model at every step."""
    with qk_attn.session(sampler="all", capture="k", layers="0") as s:
        s.begin([0, 1])
        model.generate(
            input_ids=torch.arange(5, 15).reshape(2, 5),
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=tf.StoppingCriteriaList(list(stopping_criteria)),
            logits_processor=tf.LogitsProcessorList([processor]),
            **kwargs,
        )
    return s.table().to_pydict()


@pytest.mark.parametrize("config", ["its own config", "the same config object"])
def test_a_model_run_inside_another_models_generate_is_not_its_step(config):
    """A second model's forwards inside generate() are its own, not decode steps of the generating
    model: the generating model's finished row (its padding) does not mark the guide's row 0, also
    when the guide was built on the generating model's config object."""
    from support.models import StopRow

    model = build("llama3", "qk_sniff")
    guide = (
        build("llama3", "qk_sniff", seed=5) if config == "its own config" else tf.LlamaForCausalLM(model.config).eval()
    )
    guide_ids = torch.arange(20, 36).reshape(2, 8)
    table = _generate_guided(
        model, RunsAnotherModel(guide, guide_ids), max_new_tokens=4, stopping_criteria=[StopRow(0, 6)]
    )
    guide_rows = [(e, p) for e, p in zip(table["example_id"], table["position"]) if e not in (0, 1)]
    examples = sorted({e for e, _ in guide_rows})
    assert len(examples) == 2  # one example per guide row, 4 + 3 tokens each (two key heads)
    for example in examples:
        assert sorted(p for e, p in guide_rows if e == example) == [p for p in range(7) for _ in range(2)]


class EmbedsAnotherModel(tf.LogitsProcessor):
    """A logits processor that runs a guide model on embeddings, as long as the running sequences."""

    def __init__(self, model, ids):
        self.model, self.ids = model, ids

    def __call__(self, input_ids, scores):
        embeddings = self.model.get_input_embeddings()(self.ids[:, : input_ids.shape[1]])
        self.model(inputs_embeds=embeddings, use_cache=False)
        return scores


@pytest.mark.parametrize("guide", ["another model", "the model itself"])
def test_a_model_given_embeddings_inside_a_generate_has_no_token_ids(guide):
    """The generating model's running token ids (the same shape as the guide's embeddings) are not
    the guide's, also when the guide is the generating model itself: its rows have no token id, as
    for any model given inputs_embeds."""
    model = build("llama3", "qk_sniff")
    guide = build("llama3", "qk_sniff", seed=5) if guide == "another model" else model
    table = _generate_guided(model, EmbedsAnotherModel(guide, torch.arange(40, 60).reshape(2, 10)), max_new_tokens=3)
    guide_tokens = {t for e, t in zip(table["example_id"], table["token_id"]) if e not in (0, 1)}
    model_tokens = {t for e, t in zip(table["example_id"], table["token_id"]) if e in (0, 1)}
    assert guide_tokens == {None} and None not in model_tokens
