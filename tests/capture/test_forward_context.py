"""Issue 10: one capture context per forward. Each situation against an independent oracle:
an uncached one-shot forward of the same tokens, or hooks on the projections plus the model's RoPE."""

from __future__ import annotations

import itertools
import logging
import threading

import numpy as np
import pytest
import torch
import transformers as tf
from transformers import DynamicCache, StaticCache

import qk_attn
from qk_attn import cli
from qk_attn.errors import CaptureError
from support.models import COMMON, VOCAB, build, cache_kw, padded_batch
from support.oracle import GroundTruth, all_heads, captured_and_truth, expected_rows, rows_by_key

torch.set_grad_enabled(False)


def _tokens(length: int, batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, VOCAB - 2, (batch, length), generator=torch.Generator().manual_seed(seed))


def _one_shot(model, ids, example_ids, **settings):
    """Rows of one uncached forward over the whole sequence: the oracle for cached runs."""
    with qk_attn.session(sampler="all", example_ids=example_ids, **settings) as s:
        model(input_ids=ids, use_cache=False)
    return rows_by_key(s.table())


def _assert_same_rows(got: dict, want: dict, rtol=1e-4, atol=1e-5):
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=rtol, atol=atol, err_msg=str(key))


@pytest.mark.parametrize("family", ["llama3", "gemma3"])  # gemma3: sliding layers keep only the window
def test_chunked_prefill_continues_the_begun_sequence(family):
    model = build(family, "qk_sniff")
    ids = _tokens(14)
    with qk_attn.session(sampler="all") as s:
        s.begin([17])
        cache = DynamicCache(config=model.config)
        for chunk in (ids[:, :6], ids[:, 6:11], ids[:, 11:12], ids[:, 12:]):
            model(input_ids=chunk, **cache_kw(cache))
    got = rows_by_key(s.table())
    assert {key[0] for key in got} == {17}
    _assert_same_rows(got, _one_shot(model, ids, [17]))


def test_static_cache_decode_without_mask_records_the_real_slot():
    model = build("llama3", "qk_sniff")
    ids = _tokens(9)
    with qk_attn.session(sampler="all", example_ids=[4]) as s:
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(input_ids=ids[:, :5], **cache_kw(cache))
        for t in range(5, 9):  # decode steps, no attention_mask: the attention call gets mask None or all-ones
            model(input_ids=ids[:, t : t + 1], **cache_kw(cache))
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, ids, [4]))


def test_static_cache_one_token_prompts_are_new_sequences():
    model = build("qwen3", "qk_sniff")
    prompts = [_tokens(1, seed=5), _tokens(1, seed=6)]
    cache = StaticCache(config=model.config, max_cache_len=8)
    with qk_attn.session(sampler="all", capture="k") as s:
        for example, prompt in zip((5, 6), prompts):
            cache.reset()
            s.begin([example])
            model(input_ids=prompt, **cache_kw(cache))
    got = rows_by_key(s.table())
    assert sorted({(k[0], k[4]) for k in got}) == [(5, 0), (6, 0)]
    want = {**_one_shot(model, prompts[0], [5], capture="k"), **_one_shot(model, prompts[1], [6], capture="k")}
    _assert_same_rows(got, want)


def test_forward_without_begin_over_a_fresh_cache_gets_fresh_ids_and_continuations_keep_them():
    model = build("llama3", "qk_sniff")
    a, b = _tokens(6, seed=1), _tokens(5, seed=2)
    with qk_attn.session(sampler="all", capture="k", layers="0") as s:
        cache = DynamicCache(config=model.config)
        model(input_ids=a[:, :4], **cache_kw(cache))
        model(input_ids=a[:, 4:], **cache_kw(cache))
        model(input_ids=b, **cache_kw(DynamicCache(config=model.config)))
    ids_positions = sorted({(k[0], k[4]) for k in rows_by_key(s.table())})
    assert ids_positions == [(0, p) for p in range(6)] + [(1, p) for p in range(5)]


def test_continuing_a_cache_with_another_batch_names_the_batches():
    """It said "at position 4 but the sequence [0] of this cache is at position 4": the batch was never named."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        cache = DynamicCache(config=model.config)
        s.begin([0])
        model(input_ids=torch.arange(10, 14)[None], **cache_kw(cache))
        with pytest.raises(CaptureError, match=r"forward of batch 2 continues a cache that holds 1 sequence\(s\), "):
            model(input_ids=torch.tensor([[14], [15]]), **cache_kw(cache))


def test_continuing_a_cache_the_session_did_not_start_is_refused():
    model = build("llama3", "qk_sniff")
    ids = _tokens(8)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :4], **cache_kw(cache))  # outside any session
    with pytest.raises(CaptureError, match="continues a cache at position 4"):
        with qk_attn.session(sampler="all"):
            model(input_ids=ids[:, 4:], **cache_kw(cache))
    # Naming the sequence makes it recordable: positions 4.. under the given id.
    cache = DynamicCache(config=model.config)  # the refused forward left the first one half-updated
    model(input_ids=ids[:, :4], **cache_kw(cache))
    with qk_attn.session(sampler="all", capture="k", layers="0") as s:
        s.begin([9])
        model(input_ids=ids[:, 4:6], **cache_kw(cache))
    assert sorted({(k[0], k[4]) for k in rows_by_key(s.table())}) == [(9, 4), (9, 5)]


def test_rolled_back_cache_is_refused_not_duplicated():
    model = build("llama3", "qk_sniff")
    ids = _tokens(8)
    with pytest.raises(CaptureError, match="rolled-back"):
        with qk_attn.session(sampler="all"):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :6], **cache_kw(cache))
            cache.crop(-2)  # assisted decoding rejects candidates like this
            model(input_ids=ids[:, 4:5], **cache_kw(cache))


def test_training_and_checkpoint_recompute_are_not_recorded(caplog):
    model = build("llama3", "qk_sniff").train()
    model.gradient_checkpointing_enable()
    ids = _tokens(10)
    with torch.enable_grad(), caplog.at_level(logging.WARNING, logger="qk_attn.session"):
        with qk_attn.session(sampler="all") as s:
            model(input_ids=ids, labels=ids).loss.backward()
            model(input_ids=ids, labels=ids).loss.backward()
    assert s.table() is None and not s._begun
    assert [r.message for r in caplog.records if "qk-attn" in r.message] == [TRAINING_WARNING]
    model.eval()
    with qk_attn.session(sampler="all") as s:
        model(input_ids=ids)
    assert s.table().num_rows > 0


TRAINING_WARNING = "qk-attn: not recording forwards in training mode (call model.eval() to record them)"


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("reentrant", [True, False])
def test_training_under_gradient_checkpointing_is_not_recorded_in_either_mode(reentrant, grad, caplog):
    """A reentrant checkpoint runs its first pass with gradients off (around each layer, or around the
    whole model): training mode decides, not the grad mode."""
    model = build("llama3", "qk_sniff").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = _tokens(10)
    with torch.set_grad_enabled(grad), caplog.at_level(logging.WARNING, logger="qk_attn.session"):
        with qk_attn.session(sampler="all") as s:
            if grad:
                model(input_ids=ids, labels=ids).loss.backward()
            else:
                model(input_ids=ids)
            embeds = model.model.embed_tokens(ids).detach().requires_grad_()
            logits = torch.utils.checkpoint.checkpoint(
                lambda e: model(inputs_embeds=e).logits, embeds, use_reentrant=True
            )
            if grad:
                logits.sum().backward()
    assert s.table() is None and not s._begun
    assert [r.message for r in caplog.records if "qk-attn" in r.message] == [TRAINING_WARNING]


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("training_layer", [0, 1])
def test_a_forward_with_any_layer_in_training_mode_is_not_recorded_even_in_part(training_layer, grad, caplog):
    """Layers frozen in eval() during training, or one layer left in train() (its dropout active):
    nothing of the forward is recorded, and the session goes on."""
    model = build("llama3", "qk_sniff").eval()
    model.model.layers[training_layer].train()
    ids = _tokens(10)
    with torch.set_grad_enabled(grad), caplog.at_level(logging.WARNING):
        with qk_attn.session(sampler="all") as s:
            model(input_ids=ids)
            assert s.table() is None or s.table().num_rows == 0
            model.eval()(input_ids=ids)  # the next forward is recorded whole
    assert TRAINING_WARNING in [r.message for r in caplog.records]
    rows = rows_by_key(s.table())
    assert len({k[0] for k in rows}) == 1 and {k[1] for k in rows} == {0, 1, 2}
    assert len(rows) == 3 * (4 + 2) * 10  # every (layer, head, kind, position) of the second forward, once


def test_two_models_of_different_shapes_in_one_session_are_both_recorded_completely():
    small = build("llama3", "qk_sniff")  # 3 layers, 4 heads
    torch.manual_seed(0)
    big = tf.Qwen3ForCausalLM(
        tf.Qwen3Config(**dict(COMMON, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4), head_dim=16)
    )
    big.set_attn_implementation("qk_sniff")
    big.eval()
    batch = padded_batch("left")
    truths = [GroundTruth(small), GroundTruth(big)]
    with qk_attn.session(sampler="all") as s:
        small(**batch)
        big(**batch)
    for truth in truths:
        truth.remove()
    got = rows_by_key(s.table())
    want = {
        **expected_rows(truths[0].post, batch, [0, 1], all_heads(small)),
        **expected_rows(truths[1].post, batch, [2, 3], all_heads(big)),
    }
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=str(key))


def test_second_model_into_one_output_folder_is_refused(tmp_path):
    small, other = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff")
    ids = _tokens(5)
    with pytest.raises(CaptureError, match="second model"):
        with qk_attn.session(output=tmp_path / "out", sampler="all"):
            small(input_ids=ids)
            other(input_ids=ids)


def test_a_model_built_on_the_first_ones_config_object_is_a_second_model_in_a_folder(tmp_path):
    """Models are told apart by their config object; one built on another's config (other weights: an ablation,
    a fine-tuned copy) was written into the first one's folder as the same model."""
    first = build("llama3", "qk_sniff")
    torch.manual_seed(1)
    other = type(first)(first.config).eval()
    ids = _tokens(5)
    with qk_attn.session(output=tmp_path / "out", sampler="all"):
        first(input_ids=ids)
        with pytest.raises(CaptureError, match="second model .* built on the first one's config object"):
            other(input_ids=ids)
        first(input_ids=ids)  # the first model goes on
    table = qk_attn.load(tmp_path / "out", layer=0, head=0, kind="q")
    rows = {}
    for example, position, vector in zip(*(table[c].to_pylist() for c in ("example_id", "position", "vector"))):
        rows.setdefault(example, {})[position] = vector
    assert len(rows) == 2 and len(qk_attn.load_examples(tmp_path / "out")) == 2
    assert list(rows.values())[0] == list(rows.values())[1]  # both the first model's


@pytest.mark.parametrize("second", ["built-again-on-its-config", "another-model"])
def test_a_model_whose_forwards_were_all_refused_is_not_the_model_of_the_folder(tmp_path, second):
    """A refused forward bound its model (plan, owner) for the whole session: the model called next, even the
    one the refusal advised building, was refused as a second model although nothing of the first was recorded."""
    first = build("gemma3", "qk_sniff")
    first.config.sliding_window = 6  # edited after the model was built: its forwards are refused
    ids = _tokens(9)
    with qk_attn.session(output=tmp_path / "out", sampler="all"):
        with pytest.raises(CaptureError, match="names a sliding window of 4, but its forward built its sliding masks"):
            first(input_ids=ids)
        if second == "another-model":
            model = build("llama3", "qk_sniff")
        else:
            torch.manual_seed(1)
            model = type(first)(first.config).eval()
        model(input_ids=ids)
        with pytest.raises(CaptureError, match="second model"):
            first(input_ids=ids)  # the folder's model is the one that recorded
    assert len(qk_attn.load_examples(tmp_path / "out")) == 1


def test_a_bidirectional_models_window_one_more_than_its_masks_is_recorded():
    """ModernBERT-style encoders keep flash's window (one more than their masks') on their modules and build their
    sliding masks with the config's: no edit of the config, recorded as before."""
    config = tf.ModernBertConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, pad_token_id=0, num_hidden_layers=3,
        local_attention=4, global_attn_every_n_layers=2, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.ModernBertModel(config).eval()
    model.set_attn_implementation("qk_sniff")
    with qk_attn.session(sampler="all") as s:
        model(input_ids=_tokens(9))
    table = s.table()
    assert table.num_rows == 3 * 9 * (4 + 4)  # layers x tokens x (query + key heads)
    assert set(table.column("sliding_window").to_pylist()) == {None, model.layers[1].attn.sliding_window}


class _Boom(RuntimeError):
    pass


def _fail_in(layer: torch.nn.Module):
    """Make `layer` raise, as an out-of-memory error in the middle of a forward would."""

    def boom(*_):
        raise _Boom("out of memory (simulated)")

    return layer.register_forward_pre_hook(boom)


@pytest.mark.parametrize("into", ["memory", "parquet"])
def test_a_forward_stopped_by_an_exception_is_discarded_not_committed(tmp_path, caplog, into):
    """The caller catches the error and goes on (a notebook, a loop skipping long documents):
    the layers recorded before it must not become a committed example."""
    model = build("qwen3", "qk_sniff")
    bad, good = _tokens(6, seed=1), _tokens(5, seed=2)
    out = tmp_path / "out" if into == "parquet" else None
    with caplog.at_level(logging.WARNING, logger="qk_attn"), qk_attn.session(sampler="all", output=out) as s:
        handle = _fail_in(model.model.layers[2])  # layers 0 and 1 have recorded by then
        with pytest.raises(_Boom):
            model(input_ids=bad)  # the first forward of this model: nothing seen before tells its length
        handle.remove()
        model(input_ids=good)
    assert "a forward of example(s) [0] stopped before its end" in caplog.text
    want = _one_shot(model, good, [1])
    if out is None:
        _assert_same_rows(rows_by_key(s.table()), want)
    else:
        assert sorted(qk_attn.load_examples(out).column("example_id").to_pylist()) == [1]
        got = {}
        for layer, head, kind in {(k[1], k[2], k[3]) for k in want}:
            got.update(rows_by_key(qk_attn.load(out, layer=layer, head=head, kind=kind)))
        _assert_same_rows(got, want)
        assert cli.verify_dataset(out, log=lambda *_: None) == []


def test_a_decode_step_stopped_by_an_exception_discards_its_sequence():
    model = build("llama3", "qk_sniff")
    ids = _tokens(7)
    with qk_attn.session(sampler="all") as s:
        s.begin([8])
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :5], **cache_kw(cache))
        handle = _fail_in(model.model.layers[1])
        with pytest.raises(_Boom):
            model(input_ids=ids[:, 5:6], **cache_kw(cache))
        handle.remove()
        stopped = r"continues the cache of examples \[8\], which were discarded when a forward of theirs stopped"
        with pytest.raises(CaptureError, match=stopped):
            model(input_ids=ids[:, 5:6], **cache_kw(cache))  # a broken sequence cannot be continued
        s.begin([9])
        model(input_ids=ids)
    assert {k[0] for k in rows_by_key(s.table())} == {9}
    assert s.sink.committed == [9]


def test_a_decode_step_stopped_by_an_exception_in_parquet_loses_only_its_sequence(tmp_path):
    """The same with the pieces a Parquet sink holds back: 25 decode steps of example 8 are queued
    or held when its step fails; none of its rows is committed, and example 9 is exact."""
    model = build("llama3", "qk_sniff")
    ids = _tokens(40)
    out = tmp_path / "out"
    with qk_attn.session(sampler="all", output=out) as s:
        s.begin([8])
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :5], **cache_kw(cache))
        for t in range(5, 30):
            model(input_ids=ids[:, t : t + 1], **cache_kw(cache))
        handle = _fail_in(model.model.layers[1])
        with pytest.raises(_Boom):
            model(input_ids=ids[:, 30:31], **cache_kw(cache))
        handle.remove()
        s.begin([9])
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :5], **cache_kw(cache))
        for t in range(5, 25):
            model(input_ids=ids[:, t : t + 1], **cache_kw(cache))
        s.commit()
    assert qk_attn.load_examples(out).column("example_id").to_pylist() == [9]
    got = {}
    for layer in range(model.config.num_hidden_layers):
        got.update(rows_by_key(qk_attn.load(out, layer=layer)))
    _assert_same_rows(got, _one_shot(model, ids[:, :25], [9]))
    assert cli.verify_dataset(out, log=lambda *_: None) == []


def test_diffllama_layer_called_twice_is_recorded_once():
    torch.manual_seed(0)
    model = tf.DiffLlamaForCausalLM(tf.DiffLlamaConfig(**COMMON)).eval()
    model.set_attn_implementation("qk_sniff")
    got, want = captured_and_truth(model, padded_batch("right"), [3, 4])  # rows_by_key asserts no duplicates
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=str(key))


def test_prepared_4d_mask_is_refused():
    model = build("llama3", "qk_sniff")
    ids = _tokens(6)
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None]
    with pytest.raises(CaptureError, match="prepared 4-D attention mask"):
        with qk_attn.session(sampler="all"):
            model(input_ids=ids, attention_mask=mask)


def test_encoder_decoder_is_refused_at_the_first_call():
    torch.manual_seed(0)
    config = tf.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    model = tf.BartForConditionalGeneration(config).eval()
    model.set_attn_implementation("qk_sniff")
    with pytest.raises(CaptureError, match="encoder-decoder"):
        with qk_attn.session(sampler="all"):
            model(input_ids=_tokens(5), decoder_input_ids=_tokens(3))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + i / 8 for i in range(8)],
            "long_factor": [2.0 + i / 4 for i in range(8)],
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_pre_rope_is_exact_for_forward_dependent_rope(rope):
    torch.manual_seed(0)
    config = tf.LlamaConfig(**dict(COMMON, max_position_embeddings=32), rope_parameters=rope)
    model = tf.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("qk_sniff")
    batch = padded_batch("left", lengths=(40, 23))  # longer than the original context: the scaling is active
    got, want = captured_and_truth(model, batch, [0, 1], stage="pre")
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_generate_in_a_worker_thread_records():
    model = build("llama3", "qk_sniff")
    prompt = _tokens(5)
    with qk_attn.session(sampler="all", capture="k", layers="0", example_ids=[8]) as s:
        worker = threading.Thread(
            target=model.generate, kwargs=dict(input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        )
        worker.start()
        worker.join()
    assert sorted({(k[0], k[4]) for k in rows_by_key(s.table())}) == [(8, p) for p in range(7)]


def test_left_padding_without_position_ids_records_the_positions_rope_used():
    """transformers rotates a left-padded row by its index in the padded row when no position_ids
    are given; `position` is what RoPE used, so the rows equal the model's own vectors there."""
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(9, 6))
    call = {k: batch[k] for k in ("input_ids", "attention_mask")}
    index_positions = dict(batch, position_ids=torch.arange(9).expand(2, 9))
    got, want = captured_and_truth(model, call, [0, 1], expected_batch=index_positions)
    assert got.keys() == want.keys()
    assert min(k[4] for k in got if k[0] == 1) == 3  # 3 pads before the second document
    for key, vector in want.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=str(key))


def test_out_of_range_heads_are_a_config_error():
    model = build("llama3", "qk_sniff")  # 4 query heads, 2 KV heads, 3 layers
    for setting, message in (
        (dict(heads="0-20"), "heads=.*model has 4 query heads"),
        (dict(key_heads="7"), "key_heads=7: .*2 key/value heads"),
        (dict(layers="3"), "layers=3: .*3 layers"),
    ):
        with pytest.raises(qk_attn.ConfigError, match=message):
            with qk_attn.session(sampler="all", **setting):
                model(input_ids=_tokens(4))


def test_out_of_range_heads_from_the_environment_name_the_variable(monkeypatch):
    """Found in the forward, a value that came from QK_SNIFF_* is named as that variable; a keyword
    given to session() overrides it and is named as the keyword."""
    model = build("llama3", "qk_sniff")
    monkeypatch.setenv("QK_SNIFF_LAYERS", "3")
    monkeypatch.setenv("QK_SNIFF_HEADS", "0,9")
    for setting, message in (
        (dict(layers="0"), r"^QK_SNIFF_HEADS=0,9: \[9\] out of range"),
        (dict(heads="1"), r"^QK_SNIFF_LAYERS=3: "),
    ):
        with pytest.raises(qk_attn.ConfigError, match=message):
            with qk_attn.session(sampler="all", **setting):
                model(input_ids=_tokens(4))
    with pytest.raises(qk_attn.ConfigError, match=r"^layers=7: \[7\] out of range"):
        with qk_attn.session(sampler="all", layers="7", heads="0"):
            model(input_ids=_tokens(4))


@pytest.mark.parametrize("masked", [False, True])
def test_compiled_model_records_every_forward_like_eager(masked):
    """torch.compile traces the layers once; the mask function, the capture context and the capture itself
    are kept out of the graph, so each forward is recorded with its own ids. With an attention_mask, the
    first compiled forward inside a session failed in dynamo (it traced the mask function's frame reads)."""
    torch._dynamo.reset()  # (compiled code is kept per code object: each case compiles afresh)
    model = build("llama3", "qk_sniff")
    first, second = _tokens(6, seed=1), _tokens(6, seed=2)
    mask = dict(attention_mask=torch.ones_like(first)) if masked else {}
    compiled = torch.compile(model, backend="eager")
    with qk_attn.session(sampler="all", capture="k") as s:
        compiled(input_ids=first, use_cache=False, **mask)
        compiled(input_ids=second, use_cache=False, **mask)
    got = rows_by_key(s.table())
    want = {**_one_shot(model, first, [0], capture="k"), **_one_shot(model, second, [1], capture="k")}
    _assert_same_rows(got, want, rtol=0, atol=0)


def test_flash_is_recorded_under_its_own_name_only():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from qk_attn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^backend='flash_attention_2' is invalid: .*wrap_flash_attention"):
        with qk_attn.session(sampler="all", backend="flash_attention_2"):
            pytest.fail("refused when the session opens, not in the first forward")
    saved = dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    original = saved[0]["flash_attention_2"]
    try:
        qk_attn.wrap_flash_attention()
        wrapped = AttentionInterface._global_mapping["flash_attention_2"]
        assert wrapped.func is qk_attn.capture.attention.attend_and_capture and wrapped.args == (original,)
        assert AttentionMaskInterface._global_mapping["flash_attention_2"].args[0].__name__ == "flash_attention_mask"
    finally:
        for interface, mapping in zip((AttentionInterface, AttentionMaskInterface), saved):
            interface._global_mapping.clear()
            interface._global_mapping.update(mapping)


def test_static_cache_generate_with_transformers_automatic_compile_records_like_eager():
    """generate() compiles the forward by itself for static caches (on CUDA; here forced on CPU with
    the eager backend): the same rows as without compilation."""
    from transformers import CompileConfig

    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(7, 5))
    prompt = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=4,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
    )
    compile_config = CompileConfig(backend="eager", mode=None)
    compile_config._compile_all_devices = True  # what makes generate() compile off CUDA
    tables = []
    for extra in (dict(compile_config=compile_config), dict(disable_compile=True)):
        with qk_attn.session(sampler="all") as s:
            model.generate(**prompt, **extra)
        tables.append(rows_by_key(s.table()))
    _assert_same_rows(tables[0], tables[1], rtol=1e-5, atol=1e-6)


def test_beam_search_is_refused():
    model = build("llama3", "qk_sniff")
    with pytest.raises(CaptureError, match="beam search"):
        with qk_attn.session(sampler="all"):
            model.generate(input_ids=_tokens(4), max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)


def test_generate_without_a_cache_is_refused_before_anything_is_recorded():
    """Every step re-runs the whole sequence: it would be recorded once per new token."""
    model = build("llama3", "qk_sniff")
    with pytest.raises(CaptureError, match=r"use_cache=False"):
        with qk_attn.session(sampler="all") as s:
            model.generate(input_ids=_tokens(4), max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert s.table() is None


def test_decode_steps_do_not_warn_about_the_first_position(caplog):
    model = build("llama3", "qk_sniff")
    with caplog.at_level(logging.WARNING, logger="qk_attn"), qk_attn.session(sampler="all", example_ids=[3]) as s:
        model.generate(input_ids=_tokens(6), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert {k[4] for k in rows_by_key(s.table()) if k[3] == "k"} == set(range(8))
    assert "starts at position" not in caplog.text


def test_an_in_memory_generate_whose_prefill_keeps_no_row_does_not_warn_about_its_first_position(caplog):
    """A sparse sampler keeping nothing of a short prompt: the first call with rows was a decode step's,
    so an in-memory session warned "example 7 starts at position 5, not 0" (a folder did not)."""
    model = build("llama3", "qk_sniff")
    settings = dict(sampler="uniform", min_bucket_size=16, base_rate=1, seed=0, example_ids=[7])
    with caplog.at_level(logging.WARNING, logger="qk_attn"), qk_attn.session(**settings) as s:
        model.generate(input_ids=_tokens(2, seed=3), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert min(s.table().column("position").to_pylist()) > 1  # the prompt kept no row
    assert "starts at position" not in caplog.text


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "folder"])
def test_an_all_padding_prompt_row_warns_alike_in_memory_and_in_a_folder(in_memory, tmp_path, caplog):
    """generate() numbers an all-padding prompt row's new tokens from 1: a folder warned, an in-memory
    session took the row's placeholder position (no real token) for its start and did not."""
    model = build("llama3", "qk_sniff")
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1] = 0
    out = None if in_memory else tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="qk_attn"):
        with qk_attn.session(output=out, sampler="all", example_ids=[4, 5]):
            model.generate(
                input_ids=_tokens(4, 2) * mask, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
            )
    assert "example 5 starts at position 1, not 0" in caplog.text and "example 4 starts" not in caplog.text


def test_an_id_begun_again_after_its_forward_was_discarded_is_checked_for_its_start_again(caplog):
    """An in-memory session remembered the discarded forward's start (0) for the id, and did not warn
    when the id, begun again, started at position 3 (a folder warned)."""
    model = build("llama3", "qk_sniff")
    ids = _tokens(6)
    with caplog.at_level(logging.WARNING, logger="qk_attn"), qk_attn.session(sampler="all") as s:
        model(input_ids=ids[:, :2])  # (the first forward: its end found by structure)
        failing = model.lm_head.register_forward_hook(lambda *_: 1 / 0)  # raises after the stack returned
        s.begin([5])
        with pytest.raises(ZeroDivisionError):
            model(input_ids=ids[:, :4])
        failing.remove()
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :3], **cache_kw(cache))  # filled as example 1
        s.begin([5])
        model(input_ids=ids[:, 3:6], **cache_kw(cache))
    assert sorted({key[4] for key in rows_by_key(s.table()) if key[0] == 5}) == [3, 4, 5]
    assert "example 5 starts at position 3, not 0" in caplog.text


def test_generate_with_chunked_prefill_records_each_position_once():
    model = build("llama3", "qk_sniff")
    ids = _tokens(13)
    with qk_attn.session(sampler="all", example_ids=[5]) as s:
        sequences = model.generate(
            input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0, prefill_chunk_size=4
        )
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, sequences[:, :-1], [5]))


def test_left_padding_without_position_ids_verifies_and_warns_once(tmp_path, caplog):
    """The position contract end to end: the examples table records where each document starts,
    `verify` expects the sampler's positions from there, and the user is told once."""
    from qk_attn.dataset.verify import verify_dataset

    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(9, 6))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="qk_attn.capture.batch"):
        with qk_attn.session(output=out, sampler="log_uniform", min_bucket_size=2, example_ids=[0, 1]):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    starts = dict(zip(*qk_attn.load_examples(out).select(["example_id", "first_position"]).to_pydict().values()))
    assert starts == {0: 0, 1: 3}
    assert verify_dataset(out, log=lambda *_: None) == []
    assert sum("starts at position 3, not 0" in r.message for r in caplog.records) == 1


def test_sessions_opened_in_two_threads_each_record_their_own_model():
    """Process-wide visibility is for threads that opened no session; a thread with its own
    session records into it even while another thread's session is open."""
    small, other = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff")
    opened, done = threading.Barrier(2), {}

    def run(name, model, example):
        with qk_attn.session(sampler="all", capture="k", layers="0", example_ids=[example]) as s:
            opened.wait()  # both sessions open at once
            model(input_ids=_tokens(5, seed=example))
            opened.wait()
        done[name] = s.table()

    threads = [threading.Thread(target=run, args=("a", small, 1)), threading.Thread(target=run, args=("b", other, 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(done["a"]["example_id"].to_pylist()) == {1}
    assert set(done["b"]["example_id"].to_pylist()) == {2}


def test_layers_that_do_not_pass_position_ids_get_the_forwards_positions():
    """Mllama's cross-attention layers get no position_ids: their query rows must carry the same
    positions as the self-attention layers of that forward (the positions RoPE used)."""
    from support.models import _mllama_image_batch

    model = build("mllama", "sdpa")
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    batch, _ = _mllama_image_batch()
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # row 1 starts at 0
    with qk_attn.session(sampler="all", capture="q", heads="0", example_ids=[0, 1]) as s:
        model(**batch)
    data = s.table().to_pydict()
    cross = model.config.text_config.cross_attention_layers[0]
    per_layer = {}
    for e, l, p in zip(data["example_id"], data["layer"], data["position"]):
        per_layer.setdefault(l, set()).add((e, p))
    want = {(0, p) for p in range(9)} | {(1, p) for p in range(6)}
    assert per_layer[cross] == want and all(rows == want for rows in per_layer.values())


@pytest.mark.parametrize("expected", ["none", "continues", "unknown", "skips"])
@pytest.mark.parametrize(
    "mask, alive, position_ids, ids",
    [
        (None, None, torch.tensor([[7]]), torch.tensor([[5]])),  # a decode step
        (None, None, None, None),  # no position_ids: the cache positions; embeddings only
        (
            torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),  # left padding
            torch.tensor([1, 0]),  # row 1 finished before this step
            torch.tensor([[0, 0, 0, 1, 2], [2, 3, 4, 5, 6]]),
            torch.tensor([[1, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
        ),
        (torch.tensor([[1.0, 1, 1, 1, 1, 1, 1]]), None, torch.tensor([[[3, 4, 5, 0, 1]]] * 3), None),  # mrope, packed
        (torch.ones(2, 5, dtype=torch.bool), None, torch.tensor([[0, 1, 2, 3, 4]]).expand(2, 5), None),
    ],
)
def test_host_tokens_equal_the_torch_path(mask, alive, position_ids, ids, expected):
    """On the CPU a forward's per-row columns are made in Python: the same values, dtypes and shapes as in torch,
    the check of their positions against where the sequence's earlier forwards ended included."""
    from qk_attn.capture.forward import ForwardContext
    from qk_attn.capture.forward_tokens import device_tokens, host_tokens

    batch = 1 if mask is None else mask.shape[0]
    num_new = 1 if position_ids is None else position_ids.shape[-1]
    forward = ForwardContext(None, batch, num_new, 3, mask, ids, position_ids)
    forward.alive = alive
    first = device_tokens(forward, position_ids, torch.device("cpu")).first_position
    after = {"none": None, "continues": first, "unknown": torch.full_like(first, -1), "skips": first + 1}[expected]
    host, _ = host_tokens(forward, position_ids, None if after is None else after.tolist())
    reference = device_tokens(forward, position_ids, torch.device("cpu"), after)
    if expected == "skips":  # every row with a real token starts one before where it should
        assert reference.misnumbered.tolist() == (reference.valid_count > 0).tolist()
    for name, got, want in zip(reference._fields, host, reference):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("seed", range(40))
def test_host_tokens_equal_the_torch_path_on_random_rows(seed):
    """The Python per-row columns against the torch path on random rows: padding anywhere, rows all
    padding, finished rows, positions that repeat, skip, go negative or past int32, a previous forward
    that ended elsewhere."""
    from qk_attn.capture.forward import ForwardContext
    from qk_attn.capture.forward_tokens import device_tokens, host_tokens

    generator = torch.Generator().manual_seed(seed)
    batch, num_new = (int(n) for n in torch.randint(1, 5, (2,), generator=generator))
    mask = (torch.rand(batch, num_new + 2, generator=generator) < 0.7).long()
    start = torch.randint(-2, 6, (batch, 1), generator=generator)
    if seed % 5 == 0:  # rows ending at the position column's int32 end, one before, or one past it
        start = torch.arange(-1, batch - 1)[:, None] % 3 - 1 + 2**31 - num_new
        mask = torch.ones_like(mask)
    positions = start + torch.arange(num_new)
    if seed % 3 == 0:  # a repeat or a gap in some row
        positions[int(torch.randint(batch, (1,), generator=generator)), -1] += int(torch.randint(-1, 2, (1,)))
    forward = ForwardContext(None, batch, num_new, 2, mask, None, positions)
    forward.alive = (torch.rand(batch, generator=generator) < 0.8).long() if seed % 2 else None
    expected = torch.randint(-1, 7, (batch,), generator=generator) if seed % 4 else None
    host, rows = host_tokens(forward, positions, None if expected is None else expected.tolist())
    reference = device_tokens(forward, positions, torch.device("cpu"), expected)
    for name, got, want in zip(reference._fields, host, reference):
        if want is not None:
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
    assert rows == (reference.valid_count.tolist(), reference.first_position.tolist(), reference.misnumbered.tolist())


@pytest.mark.parametrize("strategy", ["uniform", "log_uniform"])
def test_decode_steps_decide_from_the_window_like_the_sampler(strategy):
    """A decode step takes the sampler's decisions from its sequence's DecisionWindow: the same as
    the sampler's own, past the window's end too (it is made again there)."""
    from types import SimpleNamespace

    from qk_attn.capture.decisions import DECISION_WINDOW, decide
    from qk_attn.capture.forward import ForwardContext
    from qk_attn.sampler import Sampler

    sampler = Sampler(strategy, min_bucket_size=4, base_rate=2.0, seed=3)
    sequence = SimpleNamespace(decisions=None)
    start = torch.tensor([[5], [0], [3]])  # rows at different positions (left padding)
    # a pad in row 1, at a position far outside the window; row 2 all padding (a finished row)
    valid = torch.tensor([[True, True], [False, True], [False, False]])
    for step in range(0, 2 * DECISION_WINDOW + 3, 2):
        positions = (start + step + torch.arange(2)).expand(3, 2).clone()
        positions[1, 0] = 10**6
        forward = ForwardContext(None, 3, 2, 0, None)
        forward.example_ids, forward.sequence = (7, 2**40 + 1, 9), sequence
        host = SimpleNamespace(positions=positions, valid=valid)
        got = decide(sampler, forward, 5, host)
        want = sampler.keep_all_layers(torch.tensor(forward.example_ids), 5, positions) & valid
        masks = torch.stack([torch.stack([got.mask(layer, kind) for kind in (0, 1)]) for layer in range(5)])
        assert torch.equal(masks, want), step
        assert [got.keeps(layer, kind) for layer in range(5) for kind in (0, 1)] == want.flatten(2).any(
            -1
        ).flatten().tolist()
        assert got.host is host


def test_continuing_a_committed_sequence_is_refused_and_decode_steps_do_not_copy_the_committed_set():
    """A decode step's ids are checked against the committed ones again only after a commit: each
    forward copying every committed id would cost O(committed) per step in a long run."""
    model = build("llama3", "qk_sniff")
    ids = _tokens(8)
    with qk_attn.session(sampler="all", capture="k", layers="0") as s:
        s.begin([4])
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :5], **cache_kw(cache))
        reads = []
        real = s.sink.committed_ids
        s.sink.committed_ids = lambda: reads.append(1) or real()
        model(input_ids=ids[:, 5:6], **cache_kw(cache))
        model(input_ids=ids[:, 6:7], **cache_kw(cache))
        assert not reads  # nothing was committed since the sequence began
        s.commit()
        with pytest.raises(ValueError, match=r"continues the cache of examples \[4\], which a commit\(\) or flush\(\)"):
            model(input_ids=ids[:, 7:], **cache_kw(cache))


def _bert(decoder: bool, attn_implementation: str):
    config = tf.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, is_decoder=decoder,
    )  # fmt: skip
    torch.manual_seed(0)
    model = (tf.BertLMHeadModel if decoder else tf.BertModel)(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_a_model_that_builds_its_mask_around_its_layer_stack_is_recorded_exactly(decoder, padded):
    """BERT builds its mask in BertModel and runs its layers in BertEncoder. Without padding transformers skips
    the mask (None), which the encoder got as None: every forward was refused ("ran without transformers
    building its mask"), though a padded one (a 4-D mask passed in) was recorded. Both are recorded, equal to
    the query and key projections, with outputs equal to sdpa's."""
    model, reference = _bert(decoder, "qk_sniff"), _bert(decoder, "sdpa")
    ids = _tokens(7, batch=2)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 5:] = 0
    kept, handles = {}, []
    for layer, block in enumerate(model.bert.encoder.layer if decoder else model.encoder.layer):
        for kind, linear in (("q", block.attention.self.query), ("k", block.attention.self.key)):
            handles.append(linear.register_forward_hook(lambda _m, _a, out, key=(layer, kind): kept.update({key: out})))
    with qk_attn.session(sampler="all") as s:
        got = model(input_ids=ids, attention_mask=mask if padded else None)
    for handle in handles:
        handle.remove()
    want = reference(input_ids=ids, attention_mask=mask if padded else None)
    assert torch.equal(got[0], want[0])
    expected = {}
    for (layer, kind), states in kept.items():
        states = states.view(2, 7, 4, 8)
        for b, t, h in itertools.product(range(2), range(7), range(4)):
            if mask[b, t]:
                expected[(b, layer, h, kind, t)] = states[b, t, h].numpy()
    rows = rows_by_key(s.table())
    assert rows.keys() == expected.keys()
    assert all(np.array_equal(rows[key], expected[key]) for key in expected)
