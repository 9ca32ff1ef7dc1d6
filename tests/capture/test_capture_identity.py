"""Issue 17: capture state belongs to one forward (with a start and an end) and one cache, and every
attention call is checked against its forward. Each situation against an independent oracle: hooks
on the projections plus the model's own RoPE, or an uncached forward of the same tokens."""

from __future__ import annotations

import inspect
import logging
import sys

import numpy as np
import pytest
import torch
import transformers as tf
from transformers import DynamicCache, StoppingCriteriaList
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import qk_attn
from qk_attn.errors import CaptureError, ConfigError
from qk_attn.run.documents import normalize_id
from support.models import COMMON, VOCAB, StopRow, build, gemma4, padded_batch
from support.oracle import GroundTruth, all_heads, expected_rows, rows_by_key
from support.run import SPARSE, all_rows, assert_same_rows, write_config

torch.set_grad_enabled(False)
CACHE = "cache" if "cache" in inspect.signature(tf.LlamaModel.forward).parameters else "past_key_values"  # < 5.25


class _Boom(RuntimeError):
    pass


def _tokens(length: int, batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, VOCAB - 2, (batch, length), generator=torch.Generator().manual_seed(seed))


def _raise(*_args, **_kwargs):
    raise _Boom("out of memory (simulated)")


def _one_shot(model, ids, example_ids, **settings):
    """Rows of one uncached forward over the whole sequence: the oracle for cached runs."""
    with qk_attn.session(sampler="all", example_ids=example_ids, **settings) as s:
        model(input_ids=ids, use_cache=False)
    return rows_by_key(s.table())


def _truth(model, call: dict, example_ids) -> dict:
    """The rows of `call` from hooks on the projections plus the model's RoPE, run without capture."""
    truth = GroundTruth(model)
    model(**call)
    truth.remove()
    return expected_rows(truth.post, call, example_ids, all_heads(model))


def _token_ids(table) -> dict[tuple[int, int], int]:
    data = table.select(["example_id", "position", "token_id"]).to_pydict()
    return dict(zip(zip(data["example_id"], data["position"]), data["token_id"]))


def _want_token_ids(call: dict, example_ids) -> dict[tuple[int, int], int]:
    out = {}
    for b, example in enumerate(example_ids):
        for t in torch.nonzero(call["attention_mask"][b]).flatten().tolist():
            out[(example, int(call["position_ids"][b, t]))] = int(call["input_ids"][b, t])
    return out


def _assert_same_rows(got: dict, want: dict, rtol=1e-5, atol=1e-6):
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=rtol, atol=atol, err_msg=str(key))


# ---- a forward that raises is discarded, whole, and nothing of it is reused -------------------


@pytest.mark.parametrize("earlier", [False, True], ids=["first-forward", "later-forward"])
@pytest.mark.parametrize("where", ["mask", "layer0-q_proj"])
def test_a_forward_that_raises_before_any_attention_call_leaves_nothing_to_the_next(where, earlier, monkeypatch):
    """The retry has another batch size, padding and length: it must get its own context."""
    model = build("llama3", "qk_sniff")
    retry = padded_batch("left", lengths=(9, 6), seed=4)
    with qk_attn.session(sampler="all") as s:
        if earlier:
            model(input_ids=_tokens(5, seed=7))  # example 0, a complete forward before the failing one
        with monkeypatch.context() as patch:
            if where == "mask":
                patch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", _raise)
            else:
                patch.setattr(model.model.layers[0].self_attn.q_proj, "forward", _raise)
            with pytest.raises(_Boom):
                model(input_ids=_tokens(9, seed=1))
        model(**retry)
    ids = [1, 2] if earlier else [0, 1]
    got = rows_by_key(s.table())
    want = _truth(model, retry, ids)
    if earlier:
        got = {k: v for k, v in got.items() if k[0] != 0}
    _assert_same_rows(got, want)
    got_ids = {k: v for k, v in _token_ids(s.table()).items() if k[0] in ids}
    assert got_ids == _want_token_ids(retry, ids)
    assert s.sink.committed == ([0] if earlier else []) + ids


def _gpt_neox():
    return tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=96,
            rotary_pct=0.5,
        )
    )


def _phi():
    return tf.PhiForCausalLM(tf.PhiConfig(**COMMON))


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64))


def _falcon():
    return tf.FalconForCausalLM(
        tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    )


def _opt():
    return tf.OPTForCausalLM(
        tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            ffn_dim=96,
            word_embed_proj_dim=64,
        )
    )


def _gptj():
    return tf.GPTJForCausalLM(
        tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=64)
    )


def _bloom():
    return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=3, n_head=4))


NO_NORM_ATTRIBUTE = {
    "gpt_neox": _gpt_neox,
    "phi": _phi,
    "gpt2": _gpt2,
    "falcon": _falcon,
    "opt": _opt,
    "gptj": _gptj,
    "bloom": _bloom,
}


def _build(family: str):
    if family not in NO_NORM_ATTRIBUTE:
        return build(family, "qk_sniff")
    torch.manual_seed(0)
    model = NO_NORM_ATTRIBUTE[family]()
    if "ALL_ATTENTION_FUNCTIONS" not in vars(sys.modules[type(model).__module__]):
        pytest.skip(
            f"{family} does not route attention through AttentionInterface in transformers "
            f'{tf.__version__}, so it cannot run "qk_sniff" there'
        )
    model.set_attn_implementation("qk_sniff")
    return model.eval()


def _last_layer(model) -> torch.nn.Module:
    return [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList)][0][-1]


def _final_norm(model) -> torch.nn.Module | None:
    """The norm the decoder stack runs after its last layer, whatever the architecture calls it."""
    names = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
    norms = [m for name, m in model.base_model.named_modules() if name.rsplit(".", 1)[-1] in names]
    return norms[-1] if norms else None


@pytest.mark.parametrize("family", ["llama3", "gemma3", *NO_NORM_ATTRIBUTE])
@pytest.mark.parametrize("earlier", [False, True], ids=["first-forward", "later-forward"])
@pytest.mark.parametrize("where", ["last-layer", "final-norm"])
def test_an_exception_in_the_last_layer_discards_the_forward_for_every_architecture(family, earlier, where, caplog):
    """No reliance on a final norm called `norm`: the forward's end is its decoder stack's. In the very
    first forward too, where the stack's own hooks cannot fire yet: its end is the return of what the
    stack runs after its last layer (the final norm)."""
    model = _build(family)
    good = _tokens(6, seed=2)
    failing = _last_layer(model) if where == "last-layer" else _final_norm(model)
    with caplog.at_level(logging.WARNING, logger="qk_attn"), qk_attn.session(sampler="all", capture="k") as s:
        if earlier:
            s.begin([5])
            model(input_ids=good)
        handle = failing.register_forward_hook(_raise)  # after the last layer's attention ran
        with pytest.raises(_Boom):
            model(input_ids=_tokens(7, seed=1))
        handle.remove()
        s.begin([9])
        model(input_ids=good)
    assert "stopped before its end" in caplog.text
    assert s.sink.committed == ([5] if earlier else []) + [9]
    got = {k: v for k, v in rows_by_key(s.table()).items() if k[0] == 9}
    _assert_same_rows(got, _one_shot(model, good, [9], capture="k"), rtol=0, atol=0)


# ---- a sequence belongs to its cache ------------------------------------------------------------


def test_two_caches_stepped_alternately_are_two_sequences():
    model = build("llama3", "qk_sniff")
    a, b = _tokens(9, seed=1), _tokens(11, seed=2)  # prompts of 5 and 8 tokens, then decode steps
    with qk_attn.session(sampler="all") as s:
        caches = {3: DynamicCache(config=model.config), 4: DynamicCache(config=model.config)}
        s.begin([3])
        model(input_ids=a[:, :5], **{CACHE: caches[3]})
        s.begin([4])
        model(input_ids=b[:, :8], **{CACHE: caches[4]})
        for step in range(3):
            model(input_ids=a[:, 5 + step : 6 + step], **{CACHE: caches[3]})
            model(input_ids=b[:, 8 + step : 9 + step], **{CACHE: caches[4]})
        model(input_ids=a[:, 8:9], **{CACHE: caches[3]})
    _assert_same_rows(
        rows_by_key(s.table()), {**_one_shot(model, a, [3]), **_one_shot(model, b, [4])}, rtol=1e-4, atol=1e-5
    )
    assert s.sink.committed == [3, 4]


def test_a_refused_rollback_discards_its_sequence_before_the_error_propagates():
    """A decoding loop that rejects candidates by cropping the cache (as speculative decoding does):
    refused, and the example that held the rejected candidates' rows is discarded, so nothing can
    commit it. (generate()'s own assisted decoding is refused at its first forward:
    test_generation_strategies.py.)"""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        model(input_ids=_tokens(4))  # a complete example before
        cache = DynamicCache(config=model.config)
        model(input_ids=_tokens(10, seed=5), **{CACHE: cache})  # example 2: a prompt and candidates
        cache.crop(-3)  # the candidates rejected
        with pytest.raises(CaptureError, match="rolled-back"):
            model(input_ids=_tokens(1, seed=6), **{CACHE: cache})
        assert s.sink.committed == [] and list(s._begun) == [1]
    assert s.sink.committed == [1]
    assert set(rows_by_key(s.table())) == set(_one_shot(model, _tokens(4), [1]))


ENV_SCRIPT = """
import sys, torch, qk_attn.errors
from transformers import AutoModelForCausalLM, DynamicCache
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="qk_sniff").eval()
with torch.no_grad():
    model(input_ids=torch.arange(2, 8)[None])   # example 0
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.arange(2, 12)[None], CACHE=cache)   # example 1: a prompt and candidates
    cache.crop(-3)   # the candidates rejected, as speculative decoding does
    try:
        model(input_ids=torch.tensor([[40]]), CACHE=cache)
    except qk_attn.errors.CaptureError as error:
        print("refused:", error)
"""


def test_a_refusal_in_env_mode_is_not_committed_by_the_exit_handler(tmp_path):
    import os
    import subprocess
    import sys

    build("llama3").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    env = dict(os.environ, QK_SNIFF_OUTPUT=str(out), QK_SNIFF_SAMPLER="all", QK_SNIFF_LAYERS="0", QK_SNIFF_CAPTURE="k")
    result = subprocess.run(
        [sys.executable, "-c", ENV_SCRIPT.replace("CACHE=", f"{CACHE}="), str(tmp_path / "model")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "refused: qk_sniff: this forward continues a cache" in result.stdout
    assert qk_attn.load_examples(out).column("example_id").to_pylist() == [0]
    table = qk_attn.load(out, layer=0, head=0, kind="k")
    assert sorted(table.column("example_id").to_pylist()) == [0] * 6
    from qk_attn.dataset.verify import verify_dataset

    assert verify_dataset(out, log=lambda *_: None) == []


def test_rows_of_a_batched_generate_end_at_their_eos(tmp_path):
    """After a row's end (its EOS), generate() keeps feeding it pad tokens: they are not its document."""
    from qk_attn.dataset.verify import verify_dataset

    model = build("llama3", "qk_sniff")
    prompt = _tokens(5, batch=2, seed=6)
    out = tmp_path / "out"
    with qk_attn.session(output=out, sampler="all", example_ids=[0, 1], capture="k", layers="0"):
        sequences = model.generate(
            input_ids=prompt,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([StopRow(0, 7)]),
        )
    assert sequences.shape[1] == 11 and (sequences[0, 7:] == 0).all()  # row 0 ended with its token at position 6
    got = {}
    for head in (0, 1):
        got.update(rows_by_key(qk_attn.load(out, layer=0, head=head, kind="k")))
    want = {
        **_one_shot(model, sequences[:1, :7], [0], capture="k", layers="0"),
        **_one_shot(model, sequences[1:, :10], [1], capture="k", layers="0"),
    }
    _assert_same_rows(got, want, rtol=1e-4, atol=1e-5)
    lengths = qk_attn.load_examples(out).select(["example_id", "valid_length"]).to_pydict()
    assert lengths == {"example_id": [0, 1], "valid_length": [7, 10]}
    assert verify_dataset(out, log=lambda *_: None) == []


def test_rows_of_a_batched_generate_without_eos_follow_its_sequences(tmp_path):
    """Without an EOS id, generate() does not pad a row that a stopping criterion finished: it goes on
    feeding it real tokens, which `sequences` returns, and which are recorded like the others."""
    model = build("llama3", "qk_sniff")
    prompt = _tokens(5, batch=2, seed=6)
    with qk_attn.session(sampler="all", example_ids=[0, 1], capture="k", layers="0") as s:
        sequences = model.generate(
            input_ids=prompt,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            stopping_criteria=StoppingCriteriaList([StopRow(0, 7)]),
        )
    assert sequences.shape[1] == 11 and (sequences[0, 7:] != 0).any()  # row 0 was fed real tokens after its end
    want = {
        **_one_shot(model, sequences[:1, :10], [0], capture="k", layers="0"),
        **_one_shot(model, sequences[1:, :10], [1], capture="k", layers="0"),
    }
    _assert_same_rows(rows_by_key(s.table()), want, rtol=1e-4, atol=1e-5)


# ---- multimodal wrappers: the text model gets embeddings, the token ids are the wrapper's --------


def _gemma3_multimodal():
    torch.manual_seed(0)
    text = dict(
        COMMON, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
    )
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    return model


def _qwen2_vl():
    torch.manual_seed(0)
    text = dict(COMMON, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
        in_channels=3,
    )
    config = tf.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=VOCAB - 1,
        video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3,
    )
    model = tf.Qwen2VLForConditionalGeneration(config).eval()
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    return model


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_text_only_forwards_of_multimodal_models_record_token_ids_and_their_end(family, caplog):
    model = _gemma3_multimodal() if family == "gemma3" else _qwen2_vl()
    call = padded_batch("right", lengths=(7, 5), seed=8)
    with caplog.at_level(logging.WARNING, logger="qk_attn"), qk_attn.session(sampler="all") as s:
        last = model.model.language_model.layers[-1].register_forward_hook(_raise)
        with pytest.raises(_Boom):
            model(input_ids=_tokens(6, seed=1))  # the first forward: its end is never reached
        last.remove()
        s.begin([4, 5])
        model(input_ids=call["input_ids"], attention_mask=call["attention_mask"])
    assert "example(s) [0] stopped before its end" in caplog.text and s.sink.committed == [4, 5]
    _assert_same_rows(rows_by_key(s.table()), _truth(model, call, [4, 5]))
    assert _token_ids(s.table()) == _want_token_ids(call, [4, 5])


def test_qwen2_vl_text_only_generate_records_its_text_positions():
    """Multimodal RoPE models hand their layers the text row of their (3|4, B, T) positions: not
    "other position_ids" than the forward's (a check against BART-style models refused every step)."""
    model = _qwen2_vl()
    batch = padded_batch("left", lengths=(7, 5), seed=8)
    with qk_attn.session(sampler="all") as s:
        prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}  # generate() makes the positions
        sequences = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)[:, :-1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = {"input_ids": sequences[:, :-1], "attention_mask": mask, "position_ids": positions}  # the last
    # generated token is never fed back
    _assert_same_rows(rows_by_key(s.table()), _truth(model, full, [0, 1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_qwen2_vl_positions_whose_multimodal_rows_depart_from_the_text_row_are_refused(monkeypatch, on_device):
    """Four-row positions (text, then temporal, height, width) whose RoPE rows are not the text row
    (images given as embeddings, positions built by hand): rows were keyed by the text row, which RoPE
    did not use. Refused; on a device the sink finds it with the rows (no sync)."""
    from qk_attn.capture import forward as forward_module
    from qk_attn.errors import MisnumberedPositions

    model, ids = _qwen2_vl(), _tokens(6, seed=1)
    text = torch.arange(6)[None]
    positions = torch.cat([text[None], (text + 3)[None].expand(3, 1, 6)])
    if on_device:
        monkeypatch.setattr(forward_module, "builds_on_host", lambda device: False)
    with qk_attn.session(sampler="all") as s:
        if on_device:
            model(input_ids=ids, position_ids=positions)
            with pytest.raises(MisnumberedPositions, match="had returned"):
                s.table()
        else:
            with pytest.raises(CaptureError, match="multimodal RoPE positions depart from its text positions"):
                model(input_ids=ids, position_ids=positions)
        s.begin([5])
        model(input_ids=ids, position_ids=text[None].expand(4, 1, 6))  # rows that agree: recorded
    assert {key[0] for key in rows_by_key(s.table())} == {5}


def test_qwen2_vl_with_an_image_is_refused_naming_images_and_mrope():
    model = _qwen2_vl()
    ids = torch.tensor([[3, 4, VOCAB - 3] + [VOCAB - 1] * 4 + [5, 6]])  # an image of 2 x 2 patches
    image = dict(pixel_values=torch.randn(4, 12), image_grid_thw=torch.tensor([[1, 2, 2]]))
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:  # transformers >= 5.2x
        image["mm_token_type_ids"] = (ids == VOCAB - 1).long()
    with pytest.raises(CaptureError, match="images and multimodal RoPE \\(mrope\\)"):
        with qk_attn.session(sampler="all") as s:
            model(input_ids=ids, **image)
    assert s.table() is None and s.sink.committed == []
    # generate() encodes the image before the first forward and hands it `mm_encoder_outputs`, no
    # pixel values: it was recorded, every decode position off by the image's repeated positions.
    with pytest.raises(CaptureError, match="images and multimodal RoPE \\(mrope\\)"):
        with qk_attn.session(sampler="all") as s:
            model.generate(input_ids=ids, **image, max_new_tokens=2, do_sample=False)
    assert s.table() is None and s.sink.committed == []


# ---- every attention call checked against its forward ----------------------------------------------


def test_layers_given_only_the_last_queries_record_exactly_those_positions():
    """Gemma 4's KV-shared layers compute only the `logits_to_keep` last queries (transformers >= 5.25):
    their rows are those positions, equal to the same queries of a forward that computes them all."""
    # Per-layer inputs: transformers 5.23-5.24 slice them for the shared layers without checking for None.
    model = gemma4(global_head_dim=16, num_kv_shared_layers=2, hidden_size_per_layer_input=8)
    model.set_attn_implementation("qk_sniff")
    ids = _tokens(7)
    with qk_attn.session(sampler="all", capture="q", example_ids=[2]) as s:
        model(input_ids=ids, logits_to_keep=3)
    full = _one_shot(model, ids, [2], capture="q")
    shared = range(model.config.num_hidden_layers - model.config.num_kv_shared_layers, model.config.num_hidden_layers)
    want = {k: v for k, v in full.items() if k[1] not in shared or k[4] >= 4}
    got = rows_by_key(s.table())
    if not {k for k in got if k[1] in shared and k[4] < 4}:  # transformers slices the queries here
        _assert_same_rows(got, want, rtol=1e-4, atol=1e-5)
    else:  # older transformers compute every query
        _assert_same_rows(got, full, rtol=1e-4, atol=1e-5)
    with qk_attn.session(sampler="all", capture="q", heads="0", example_ids=[3]) as s:
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # logits_to_keep=1
    per_layer = {}
    for layer, position in zip(s.table()["layer"].to_pylist(), s.table()["position"].to_pylist()):
        per_layer.setdefault(layer, []).append(position)
    assert all(sorted(per_layer[layer]) == list(range(9)) for layer in range(2))
    assert all(sorted(per_layer[layer]) in (list(range(6, 9)), list(range(9))) for layer in shared)


def test_an_attention_call_that_does_not_fit_its_forward_is_refused_in_one_line(monkeypatch):
    """A query of another batch or longer than the forward's tokens is never gathered from."""
    model = build("llama3", "qk_sniff")
    attention = model.model.layers[1].self_attn
    original = attention.forward

    def doubled(hidden_states, *args, **kwargs):  # as a layer run with another forward's inputs would be
        return original(torch.cat([hidden_states, hidden_states]), *args, **kwargs)

    monkeypatch.setattr(attention, "forward", doubled)
    with pytest.raises(
        CaptureError,
        match=r"^qk_sniff: layer 1 got a query of batch 2 and a key of batch 2 in a "
        r"forward of batch 1; not recorded$",
    ):
        with qk_attn.session(sampler="all") as s:
            model(input_ids=_tokens(5))
    assert s.sink.committed == [] and s.table() is None  # its staged rows never reached the sink


def test_pre_rope_of_multi_head_latent_attention_is_refused_with_a_message():
    torch.manual_seed(0)
    config = tf.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=64,
    )
    model = tf.DeepseekV3ForCausalLM(config).eval()
    model.set_attn_implementation("qk_sniff")
    with pytest.raises(CaptureError, match=r"rope='pre': DeepseekV3Attention rotates 8 of the 24 dimensions"):
        with qk_attn.session(sampler="all", rope="pre") as s:
            model(input_ids=_tokens(5))
    assert s.sink.committed == []
    with qk_attn.session(sampler="all", example_ids=[0]) as s:  # post-RoPE rows: the projections' own
        model(input_ids=_tokens(5))
    assert {k[4] for k in rows_by_key(s.table())} == set(range(5))


def test_pre_rope_without_the_applied_cos_sin_is_refused_and_records_nothing(monkeypatch):
    """A layer whose forward holds no `position_embeddings` gives nothing to invert with: an error
    that names the way out, and the forward's rows (layers before it included) are not kept."""
    from qk_attn.capture import attention

    model = build("llama3", "qk_sniff")
    applied, given = attention.applied_rotary, []

    def layer_1_without_cos_sin(module):
        rotary = None if module.layer_idx == 1 else applied(module, max_depth=5)  # one frame deeper here
        given.append(rotary is not None)
        return rotary

    monkeypatch.setattr(attention, "applied_rotary", layer_1_without_cos_sin)
    with pytest.raises(ConfigError, match=r"rope='pre': LlamaAttention did not expose the cos/sin .* use rope='post'"):
        with qk_attn.session(sampler="all", rope="pre") as s:
            model(input_ids=_tokens(5))
    assert given == [True, False]  # layer 0 was recorded first
    assert s.sink.committed == [] and s.table() is None


def test_pre_rope_with_cos_sin_shaped_otherwise_is_refused_in_one_line(monkeypatch):
    """A release whose rotary class shapes cos/sin for the heads already, (B, 1, T, R): refused, not
    an IndexError from the gather."""
    from qk_attn.capture import attention

    model = build("llama3", "qk_sniff")
    applied = attention.applied_rotary
    monkeypatch.setattr(attention, "applied_rotary", lambda m: tuple(t[:, None] for t in applied(m, max_depth=5)))
    with pytest.raises(ConfigError, match=r"^rope='pre': LlamaAttention applied cos/sin shaped \[\(1, 1, 5, 16\)"):
        with qk_attn.session(sampler="all", rope="pre") as s:
            model(input_ids=_tokens(5))
    assert s.sink.committed == []


@pytest.mark.parametrize("dtype, median, worst", [(torch.bfloat16, 2.5e-3, 6e-3), (torch.float16, 4e-4, 1e-3)])
def test_pre_rope_in_low_precision_is_within_the_documented_error(dtype, median, worst):
    """The README's numbers: rows against the projection (or q/k-norm) output the model computed."""
    model = build("qwen3", "qk_sniff").to(dtype)
    batch = padded_batch("left", lengths=(64, 40))
    truth = GroundTruth(model)
    with qk_attn.session(sampler="all", rope="pre", example_ids=[0, 1]) as s:
        model(**batch)
    truth.remove()
    got, want = rows_by_key(s.table()), expected_rows(truth.pre, batch, [0, 1], all_heads(model))
    assert got.keys() == want.keys()
    error = np.array([np.linalg.norm(got[k] - v) / np.linalg.norm(v) for k, v in want.items()])
    assert np.median(error) < median and error.max() < worst


# ---- a session never records nothing silently --------------------------------------------------


@pytest.fixture
def registries():
    """Restores transformers' attention and mask registries after the test."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    saved = dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    yield AttentionInterface, AttentionMaskInterface
    for interface, mapping in zip((AttentionInterface, AttentionMaskInterface), saved):
        interface._global_mapping.clear()
        interface._global_mapping.update(mapping)


def _swap_in_hub_kernel(model, attention, masks, name="kernels-community/flash-attn2"):
    """What transformers does when flash_attention_2 is asked for and flash-attn is absent: register the Hub
    kernel with the flash mask and run the model under the kernel's name (here sdpa stands in on the CPU)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attention.register(name, sdpa_attention_forward)
    masks.register(name, masks._global_mapping["flash_attention_2"])
    model.config._attn_implementation = name


@pytest.mark.parametrize("wrapped", ["before-load", "after-load"])
def test_a_hub_flash_kernel_swapped_in_by_transformers_is_recorded(registries, wrapped):
    model = build("llama3", "sdpa")
    ids = _tokens(6)
    want = _one_shot(build("llama3", "qk_sniff"), ids, [0])
    if wrapped == "before-load":
        qk_attn.wrap_flash_attention()
    _swap_in_hub_kernel(model, *registries)
    if wrapped == "after-load":
        qk_attn.wrap_flash_attention()
    with qk_attn.session(sampler="all", example_ids=[0]) as s:
        model(input_ids=ids)
    assert s.table() is not None
    _assert_same_rows(rows_by_key(s.table()), want, rtol=0, atol=0)


def test_what_transformers_registers_under_sdpa_is_what_qk_sniff_runs(registries):
    """A release (or a user) that registers another function under "sdpa", and another sdpa mask, changes
    what a model loaded with "sdpa" computes: "qk_sniff" must compute the same, not a copy imported by name."""
    attention, masks = registries
    sdpa, sdpa_mask = attention._global_mapping["sdpa"], masks._global_mapping["sdpa"]

    def sdpa_in_float64(module, query, key, value, attention_mask, **kwargs):  # other rounding, same maths
        mask = (
            None
            if attention_mask is None
            else attention_mask.double()
            if attention_mask.is_floating_point()
            else attention_mask
        )
        out, weights = sdpa(module, query.double(), key.double(), value.double(), mask, **kwargs)
        return out.to(query.dtype), weights

    def sdpa_mask_as_floats(*args, **kwargs):
        mask = sdpa_mask(*args, **kwargs)
        return mask if mask is None else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)

    attention.register("sdpa", sdpa_in_float64)
    masks.register("sdpa", sdpa_mask_as_floats)
    batch = padded_batch("left", lengths=(9, 6))
    want = build("llama3", "sdpa")(**batch).logits
    model = build("llama3", "qk_sniff")
    assert torch.equal(model(**batch).logits, want)
    with qk_attn.session(sampler="all") as s:
        assert torch.equal(model(**batch).logits, want)
    _assert_same_rows(rows_by_key(s.table()), _truth(model, batch, [0, 1]))


def test_an_implementation_qk_attn_does_not_wrap_is_an_error_in_a_session(registries):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attention, masks = registries
    attention.register("my_attention", sdpa_attention_forward)
    masks.register("my_attention", masks._global_mapping["qk_sniff"])
    model = build("llama3", "sdpa")
    model.config._attn_implementation = "my_attention"
    with pytest.raises(
        CaptureError, match="runs the attention implementation 'my_attention', which qk-attn does not wrap"
    ):
        with qk_attn.session(sampler="all"):
            model(input_ids=_tokens(6))
    model(input_ids=_tokens(6))  # outside a session it runs as registered


# ---- a refusal through the CLI ----------------------------------------------------------------


def test_a_refusal_in_a_cli_run_commits_none_of_the_refused_documents(tiny_model, docs, tmp_path, monkeypatch):
    """`qk-sniff run` refused at layer 1 of its 4th document (layer 0's rows already handed to the saver):
    the three before are committed, the refused one has no row and no entry, and the re-run resumes
    to the rows of a run that was never refused."""
    from transformers.models.llama import modeling_llama

    from qk_attn import cli
    from qk_attn.dataset.verify import verify_dataset

    path, _ = docs
    full = tmp_path / "full"
    assert cli.main(["run", "--config", write_config(tmp_path, tiny_model, path, full, capture=SPARSE), "--quiet"]) == 0
    original, forwards = modeling_llama.LlamaAttention.forward, []

    def doubled_in_the_4th(self, hidden_states, *args, **kwargs):  # a layer run with another forward's inputs
        forwards.append(self.layer_idx)
        if len(forwards) == 3 * 2 + 2:
            hidden_states = torch.cat([hidden_states, hidden_states])
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", doubled_in_the_4th)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model, path, out, capture=SPARSE)
    assert cli.main(["run", "--config", config, "--quiet"]) == 2  # one line: "... layer 1 got a query of batch 2 ..."
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", original)
    committed = set(qk_attn.load_examples(out).column("example_id").to_pylist())
    refused = normalize_id("doc-3")
    assert committed == {normalize_id(f"doc-{i}") for i in range(3)}
    assert refused not in {k[0] for k in all_rows(out)}
    assert verify_dataset(out, log=lambda *_: None) == []
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    assert_same_rows(all_rows(out), all_rows(full))


def test_dropout_and_scaling_passed_by_position_reach_the_backend_as_sdpa_takes_them():
    """A modeling file may pass `dropout` and `scaling` by position after the mask, as sdpa's signature
    allows: "qk_sniff" hands them on, capture on or off, and computes what sdpa computes."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = build("llama3", "qk_sniff")
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, n, 5, 16, generator=generator) for n in (4, 2, 2))
    expected = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, 0.0, 0.5)[0]
    found = ALL_ATTENTION_FUNCTIONS["qk_sniff"](module, query, key, value, None, 0.0, 0.5)[0]
    assert torch.equal(found, expected)
    assert not torch.equal(found, ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, 0.0, 1.0)[0])
