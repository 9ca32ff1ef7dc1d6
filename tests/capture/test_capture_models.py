"""Exactness on every seed family: logits bit for bit, captured vectors equal ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import qk_attn
from support.models import FAMILIES, _mllama_image_batch, build, padded_batch
from support.oracle import captured_and_truth, rows_by_key

torch.set_grad_enabled(False)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_wrapped_backend_bit_for_bit(family, side, backend):
    model = build(family, backend)
    batch = padded_batch(side)
    reference = model(**batch).logits
    model.set_attn_implementation("qk_sniff")
    with qk_attn.session(sampler="all", backend=backend) as s:
        logits = model(**batch).logits
    assert torch.equal(logits, reference)
    assert s.table().num_rows > 0


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_post_rope_vectors_equal_ground_truth(family, side):
    model = build(family, "qk_sniff")
    got, want = captured_and_truth(model, padded_batch(side), [10, 11])
    # Same keys: every valid token once per head, no pad token at all.
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=str(key))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_post_rope_vectors_equal_ground_truth_in_low_precision(family, dtype):
    """The rows are the model's own bf16/fp16 vectors, bit for bit, not a float32 recomputation."""
    model = build(family, "qk_sniff").to(dtype)
    got, want = captured_and_truth(model, padded_batch("left"), [10, 11])
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=str(key))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pre_rope_vectors_equal_hook_outputs(family):
    model = build(family, "qk_sniff")
    batch = padded_batch("left", lengths=(40, 23))  # long enough for Ministral 3's query scale to vary
    got, want = captured_and_truth(model, batch, [0, 1], stage="pre")
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_pre_and_post_differ_where_rope_applies_and_match_on_nope_layers():
    model = build("smollm3", "qk_sniff")  # layer 1 is a NoPE layer
    batch = padded_batch("right")
    tables = {}
    for stage in ("post", "pre"):
        with qk_attn.session(sampler="all", rope=stage) as s:
            model(**batch)
        tables[stage] = rows_by_key(s.table())
    nope = [k for k in tables["post"] if k[1] == 1]
    rotated = [k for k in tables["post"] if k[1] == 0 and k[4] > 0]
    assert all(np.array_equal(tables["post"][k], tables["pre"][k]) for k in nope)
    assert not any(np.allclose(tables["post"][k], tables["pre"][k]) for k in rotated)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama3", "gemma3", "qwen3"])
def test_generate_records_each_token_once_and_equal_to_uncached(family, cache):
    model = build(family, "qk_sniff")
    batch = padded_batch("left", lengths=(7, 5))
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with qk_attn.session(sampler="all") as s:
        sequences = model.generate(
            **prompt, max_new_tokens=4, do_sample=False, cache_implementation=cache, pad_token_id=0
        )
    generated = rows_by_key(s.table())  # asserts no duplicates

    mask = torch.cat([batch["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1)
    full = {"input_ids": sequences, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with qk_attn.session(sampler="all") as s:
        model(**full)
    uncached = rows_by_key(s.table())
    # The last generated token is never fed back, so it has no row in either run... except the
    # uncached run sees it: drop it there.
    last = {(e, l, h, k, p) for (e, l, h, k, p) in uncached if p == int(full["position_ids"][e, -1])}
    assert generated.keys() == uncached.keys() - last
    for key, vector in generated.items():
        np.testing.assert_allclose(vector, uncached[key], rtol=1e-4, atol=1e-5, err_msg=str(key))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("sampler", ["log_uniform", "uniform"])
@pytest.mark.parametrize("family", ["llama3", "gemma3"])  # gemma3: sliding layers of 4 keys, rolled 80 times
def test_a_long_sampled_generate_into_parquet_keeps_what_one_uncached_forward_keeps(tmp_path, family, sampler, cache):
    """80 decode steps of a left-padded batch: the host's decode decisions (windows of 64 positions
    per row, rebuilt past their end), the forwards' pieces the sink holds back, and the empty calls
    counted without rows must keep exactly the rows the sampler keeps in one uncached forward."""
    model = build(family, "qk_sniff")
    batch = padded_batch("left", lengths=(7, 5))
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
    settings = dict(sampler=sampler, min_bucket_size=4, base_rate=3, example_ids=[0, 1])
    out = tmp_path / "out"
    with qk_attn.session(output=out, **settings):
        sequences = model.generate(
            **prompt, max_new_tokens=80, min_new_tokens=80, do_sample=False, cache_implementation=cache, pad_token_id=0
        )
    generated = {}
    for layer in range(model.config.num_hidden_layers):
        generated.update(rows_by_key(qk_attn.load(out, layer=layer)))

    mask = torch.cat([batch["attention_mask"], torch.ones(2, 80, dtype=torch.long)], dim=1)
    full = {"input_ids": sequences, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with qk_attn.session(**settings) as s:
        model(**full)
    uncached = rows_by_key(s.table())
    last = {(e, l, h, k, p) for (e, l, h, k, p) in uncached if p == int(full["position_ids"][e, -1])}
    want = uncached.keys() - last  # the last generated token is never fed back
    assert generated.keys() == want and any(p >= 64 for *_, p in want)  # decode rows past the first window
    for key, vector in generated.items():
        np.testing.assert_allclose(vector, uncached[key], rtol=1e-4, atol=1e-5, err_msg=str(key))


def test_mllama_with_image_records_cross_attention_keys_once():
    model = build("mllama", "sdpa")
    batch, _ = _mllama_image_batch()
    reference = model(**batch).logits
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    with qk_attn.session(sampler="all") as s:
        logits = model(**batch).logits
    assert torch.equal(logits, reference)
    table = s.table().to_pydict()
    cross_layer = model.config.text_config.cross_attention_layers[0]
    keys = [
        (e, p)
        for e, l, k, p, h in zip(table["example_id"], table["layer"], table["kind"], table["position"], table["head"])
        if l == cross_layer and k == "k" and h == 0
    ]
    num_vision = model.model.vision_model.num_patches  # tokens per tile (1 tile)
    assert sorted(keys) == sorted((e, p) for e in (0, 1) for p in range(num_vision))
    queries = sum(1 for l, k in zip(table["layer"], table["kind"]) if l == cross_layer and k == "q")
    assert queries == (9 + 6) * model.config.text_config.num_attention_heads


def test_mllama_cross_layer_alone_uses_this_forwards_text_tokens():
    model = build("mllama", "sdpa")
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    batch, _ = _mllama_image_batch()
    cross_layer = model.config.text_config.cross_attention_layers[0]
    with qk_attn.session(sampler="all", layers=str(cross_layer), capture="q") as s:
        model(**batch)
    table = s.table().to_pydict()
    assert set(table["layer"]) == {cross_layer}
    rows = sorted((e, p) for e, p, h in zip(table["example_id"], table["position"], table["head"]) if h == 0)
    # No position_ids were passed, so positions are token indices; row 1 has 3 left pads.
    assert rows == sorted([(0, p) for p in range(9)] + [(1, p) for p in range(3, 9)])


def test_mllama_cross_attention_layers_are_named_in_manifest_and_card(tmp_path):
    from qk_attn.storage.manifest import read_manifest

    model = build("mllama", "sdpa")
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    batch, _ = _mllama_image_batch()
    with qk_attn.session(output=tmp_path, sampler="all", heads="0"):
        model(**batch)
    cross_layer = model.config.text_config.cross_attention_layers[0]
    assert read_manifest(tmp_path)["cross_attention_layers"] == [cross_layer]
    assert f"Cross-attention layers {cross_layer}: their keys are vision tokens" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("sampler", ["all", "log_uniform"])
def test_a_generate_with_an_image_passes_verify(tmp_path, sampler):
    """Cross-attention keys are vision tokens: verify must not hold them to the text's positions."""
    from qk_attn.dataset.verify import verify_dataset

    model = build("mllama", "sdpa")
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    batch, _ = _mllama_image_batch()
    with qk_attn.session(output=tmp_path, sampler=sampler, min_bucket_size=4, base_rate=2, example_ids=[0, 1]):
        model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    cross_layer = model.config.text_config.cross_attention_layers[0]
    assert qk_attn.load(tmp_path, layer=cross_layer, kind="k").num_rows > 0  # the image's keys are there
    assert verify_dataset(tmp_path, log=lambda *_: None) == []


def test_text_only_forwards_beside_image_ones_pass_verify(tmp_path):
    """Without an image Mllama skips its cross-attention layers: a text-only example holds no query rows there,
    which verify read as a selection differing from the sampler's (and repair could not mend)."""
    from qk_attn.dataset.verify import verify_dataset

    model = build("mllama", "sdpa")
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    batch, _ = _mllama_image_batch()
    with qk_attn.session(output=tmp_path, sampler="all") as session:
        model(**batch)  # examples 0 and 1
        session.commit()
        model(input_ids=batch["input_ids"][:, :2])  # 2 and 3
    cross_layer = model.config.text_config.cross_attention_layers[0]
    recorded = set(qk_attn.load(tmp_path, layer=cross_layer, kind="q").column("example_id").to_pylist())
    assert recorded == {0, 1}  # the image forward's examples only
    assert verify_dataset(tmp_path, log=lambda *_: None) == []


def _gemma4_with_vision(impl):
    import transformers as tf

    from support.models import COMMON, VOCAB

    torch.manual_seed(0)
    text = dict(
        COMMON,
        num_hidden_layers=2,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=2,
        pooling_kernel_size=2,
        position_embedding_size=64,
    )
    config = tf.Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=VOCAB - 1,
        boi_token_id=VOCAB - 3,
        eoi_token_id=VOCAB - 2,
        video_token_id=VOCAB - 4,
        boa_token_id=VOCAB - 5,
        eoa_token_index=VOCAB - 6,
        audio_token_id=VOCAB - 7,
    )
    model = tf.Gemma4ForConditionalGeneration(config).eval()
    model.set_attn_implementation(impl)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(1, 16, 2)
    call = dict(
        input_ids=torch.tensor([[3, 4, VOCAB - 3] + [VOCAB - 1] * 4 + [VOCAB - 2, 5, 6]]),
        pixel_values=torch.randn(1, 16, 12, generator=torch.Generator().manual_seed(1)),
        image_position_ids=grid,
    )
    return model, call, "vision_config"


def _qwen2_audio(impl):
    import transformers as tf

    from support.models import COMMON, VOCAB

    torch.manual_seed(0)
    audio = dict(
        num_mel_bins=8,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        d_model=32,
        max_source_positions=8,
    )
    config = tf.Qwen2AudioConfig(
        text_config=dict(COMMON, num_hidden_layers=2, model_type="qwen2"),
        audio_config=audio,
        audio_token_index=VOCAB - 1,
    )
    model = tf.Qwen2AudioForConditionalGeneration(config).eval()
    model.set_attn_implementation(impl)
    ids = torch.tensor([[3, 4] + [VOCAB - 1] * 4 + [5, 6]])
    call = dict(
        input_ids=ids,
        input_features=torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(3)),
        feature_attention_mask=torch.ones(1, 16, dtype=torch.long),
        attention_mask=torch.ones_like(ids),
    )
    return model, call, "audio_config"


@pytest.mark.parametrize("warm", [False, True], ids=["", "after-a-forward-with-capture-off"])
@pytest.mark.parametrize("make", [_gemma4_with_vision, _qwen2_audio], ids=["gemma4-vision", "qwen2-audio"])
def test_vision_and_audio_towers_are_not_recorded(make, warm, tmp_path):
    """A tower that builds its mask through qk_sniff and numbers its layers (Gemma 4's vision encoder,
    Qwen2-Audio's audio encoder) is no text model: loaded whole with "qk_sniff", the model records
    exactly what its text model alone records, under the ids begun for the document (the tower's
    forward once took them, and its patches were stored as text layers 0 and 1; Qwen2-Audio was
    refused whole), and a folder takes it as one model; also after a forward with capture off."""
    sdpa, call, tower = make("sdpa")
    reference = sdpa(**call).logits
    text_only, _, _ = make({"text_config": "qk_sniff", tower: "sdpa"})
    with qk_attn.session(sampler="all", example_ids=[7]) as s:
        text_only(**call)
    want = rows_by_key(s.table())
    whole, _, _ = make("qk_sniff")
    if warm:  # a tower's forward with capture off is none of the text model's: Gemma 4's was refused after one
        whole(**call)
    with qk_attn.session(sampler="all", example_ids=[7]) as s:
        logits = whole(**call).logits
    assert torch.equal(logits, reference)
    got = rows_by_key(s.table())
    assert got.keys() == want.keys() and {key[0] for key in got} == {7}
    for key, vector in want.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=str(key))
    assert set(s.table()["token_id"].to_pylist()) <= set(call["input_ids"][0].tolist())

    with qk_attn.session(output=str(tmp_path / "out"), sampler="all", example_ids=[7]):
        whole(**call)
    assert qk_attn.load_examples(tmp_path / "out")["example_id"].to_pylist() == [7]


def test_gemma4_generate_with_an_image_records_the_text_model_only(tmp_path):
    """generate() encodes the image before its first forward (get_image_features, outside any model
    forward): the vision tower's patches were stored as text layers under the begun id."""
    sdpa, call, _ = _gemma4_with_vision("sdpa")
    reference = sdpa.generate(**call, max_new_tokens=3, do_sample=False)
    text_only, _, _ = _gemma4_with_vision({"text_config": "qk_sniff", "vision_config": "sdpa"})
    with qk_attn.session(sampler="all", example_ids=[7]) as s:
        text_only.generate(**call, max_new_tokens=3, do_sample=False)
    want = rows_by_key(s.table())
    whole, _, _ = _gemma4_with_vision("qk_sniff")
    with qk_attn.session(sampler="all", example_ids=[7]) as s:
        assert torch.equal(whole.generate(**call, max_new_tokens=3, do_sample=False), reference)
    got = rows_by_key(s.table())
    assert got.keys() == want.keys() and {key[0] for key in got} == {7}
    for key, vector in want.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=str(key))
    with qk_attn.session(output=str(tmp_path / "out"), sampler="all", example_ids=[7]):
        whole.generate(**call, max_new_tokens=3, do_sample=False)
    from qk_attn.dataset.verify import verify_dataset

    assert verify_dataset(tmp_path / "out", log=lambda *_: None) == []  # its global layers' head size included


def test_mllama_text_only_over_an_early_initialised_static_cache_records_no_cross_attention_layer():
    """Chunked prefill initialises a static cache early: Mllama then runs its cross-attention layer over
    the cache's zeros. Those all-zero "vision keys" of no image were recorded (and verify passed); now the
    layer is not recorded, as over a dynamic cache, and every other row is the same."""
    model = build("mllama_text", "qk_sniff")
    cross_layer = model.config.cross_attention_layers[0]
    batch = padded_batch("left", lengths=(10,), seed=3)
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
    rows = {}
    for chunk in (None, 3):
        with torch.no_grad(), qk_attn.session(sampler="all", example_ids=[0]) as s:
            model.generate(
                **prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static",
                prefill_chunk_size=chunk,
            )  # fmt: skip
        rows[chunk] = rows_by_key(s.table())
    assert not any(layer == cross_layer for _, layer, *_ in rows[3])
    assert rows[3].keys() == rows[None].keys()
    for key, vector in rows[3].items():
        np.testing.assert_allclose(vector, rows[None][key], rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_mllama_decode_steps_over_a_static_cache_with_an_image_record_the_cross_attention_queries():
    """The image's forward marks its cache as holding vision states: the decode steps after it, which have
    no image of their own, still record their cross-attention queries."""
    model = build("mllama", "sdpa")
    batch, _ = _mllama_image_batch()
    generate = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    try:
        model.generate(**batch, **generate)
    except RuntimeError as error:  # transformers 5.17's own cross-attention mask over a static cache
        pytest.skip(f"sdpa itself cannot run this generate() on transformers {tf.__version__}: {error}")
    model.set_attn_implementation({"text_config": "qk_sniff", "vision_config": "sdpa"})
    cross_layer = model.config.text_config.cross_attention_layers[0]
    with torch.no_grad(), qk_attn.session(sampler="all", layers=str(cross_layer), heads="0", capture="q") as s:
        model.generate(**batch, **generate)
    table = s.table().to_pydict()
    rows = sorted(zip(table["example_id"], table["position"]))
    # generate() numbers real tokens from 0 (row 1 has 3 left pads); the last generated token is not fed
    assert rows == sorted([(0, p) for p in range(9 + 2)] + [(1, p) for p in range(6 + 2)])
