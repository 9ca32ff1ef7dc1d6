"""Models qk_sniff cannot record are refused in one line, never run with 0 rows recorded."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

import qk_attn
from qk_attn.errors import CaptureError, ConfigError
from support.models import COMMON, VOCAB, build, cache_kw, padded_batch

torch.set_grad_enabled(False)


@pytest.mark.parametrize("into", ["memory", "parquet"])
def test_a_model_whose_attention_does_not_use_the_interface_is_refused_not_recorded_empty(tmp_path, into):
    """Bloom builds its mask with transformers' mask functions (so through qk_sniff's) but computes
    attention itself: nothing reaches qk_sniff's attention. The session refuses it when the forward
    is over (here at the commit), instead of committing examples with no rows. (Bloom declares no sdpa
    support, so the eager backend: under sdpa it is refused at its mask already.)"""
    config = tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    model = tf.BloomForCausalLM._from_config(config, attn_implementation="qk_sniff").eval()
    assert model.config._attn_implementation == "qk_sniff"
    out = tmp_path / "out"
    with pytest.raises(CaptureError, match="a bloom model built its attention mask through qk_sniff but none of its"):
        with qk_attn.session(sampler="all", backend="eager", **({"output": out} if into == "parquet" else {})) as s:
            model(input_ids=torch.randint(2, VOCAB - 2, (1, 8)))
            s.commit()
    if into == "parquet":
        assert qk_attn.load_examples(out).num_rows == 0


@pytest.mark.parametrize("which", ["every layer", "layer 1"])
def test_attention_modules_without_a_layer_idx_are_named_in_the_refusal(which, tmp_path):
    """Attention calls without a layer_idx are not recorded (vision towers have none): a release that
    stops setting it on a text model's attention recorded nothing, and where only some layers lost it, the
    others' rows were committed with that layer missing, which verify passed. Refused, naming layer_idx,
    and the session goes on."""
    model = build("llama3", "qk_sniff")
    for index, layer in enumerate(model.model.layers):
        if which == "every layer" or index == 1:
            layer.self_attn.layer_idx = None
    with qk_attn.session(sampler="all", output=tmp_path / "out") as s:
        with pytest.raises(
            CaptureError, match=r"^qk_sniff: LlamaAttention, an attention module of .* has no layer_idx, so its rows"
        ):
            s.begin([0, 1])
            model(**padded_batch("left"), use_cache=False)
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = index
        s.begin([2, 3])
        model(**padded_batch("left"), use_cache=False)
    assert s.sink.committed_ids() == {2, 3}
    assert set(qk_attn.load_examples(tmp_path / "out")["example_id"].to_pylist()) == {2, 3}


def test_a_session_that_records_nothing_says_so_when_it_ends(tmp_path, caplog):
    """set_attn_implementation("qk_sniff") on Bloom keeps "eager" (transformers only warns): its
    forwards never reach qk_sniff, so the session would end with an empty dataset and no word."""
    config = tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    model = tf.BloomForCausalLM._from_config(config, attn_implementation="eager").eval()
    model.set_attn_implementation("qk_sniff")
    assert model.config._attn_implementation == "eager"
    with qk_attn.session(sampler="all", output=tmp_path / "out"):
        model(input_ids=torch.randint(2, VOCAB - 2, (1, 8)))
    assert [r for r in caplog.records if "the session ends having recorded nothing" in r.getMessage()]
    caplog.clear()
    recorded = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all"):
        recorded(input_ids=torch.randint(2, VOCAB - 2, (1, 8)))
    assert not [r for r in caplog.records if "recorded nothing" in r.getMessage()]
    with pytest.raises(KeyboardInterrupt), qk_attn.session(sampler="all"):  # its error says enough
        raise KeyboardInterrupt
    assert not [r for r in caplog.records if "recorded nothing" in r.getMessage()]
    # Forwards that reached qk_sniff and were discarded: the backend is not to blame.
    hook = recorded.model.layers[1].register_forward_hook(lambda *_: 1 / 0)
    with qk_attn.session(sampler="all"):
        with pytest.raises(ZeroDivisionError):
            recorded(input_ids=torch.randint(2, VOCAB - 2, (1, 8)))
    hook.remove()
    (told,) = [r.getMessage() for r in caplog.records if "recorded nothing" in r.getMessage()]
    assert "its 1 forward(s) that reached qk_sniff were discarded" in told and "_attn_implementation" not in told


def test_an_attention_block_shared_between_layers_is_refused():
    """Zamba2's shared attention block has layer_idx -1: its rows could not be keyed by layer."""
    torch.manual_seed(0)
    config = tf.Zamba2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_head_dim=16,
        layers_block_type=["mamba", "hybrid", "mamba", "mamba"],
        mamba_d_state=8,
        mamba_headdim=8,
        mamba_ngroups=1,
        n_mamba_heads=16,
        num_mem_blocks=1,
        max_position_embeddings=256,
        pad_token_id=0,
        use_mem_rope=True,
    )
    model = tf.Zamba2ForCausalLM(config).eval()
    model.set_attn_implementation("qk_sniff")
    batch = padded_batch("left")
    with qk_attn.session(sampler="all") as s:
        with pytest.raises(CaptureError, match="has layer_idx -1, outside the model's 4 layers"):
            model(**batch)
        assert s.table() is None or s.table().num_rows == 0


def test_full_attention_only_on_a_model_with_no_full_attention_layer_is_refused():
    """Mistral with a sliding window has it on every layer: full_attention_only would record nothing."""
    torch.manual_seed(0)
    config = tf.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        attn_implementation="qk_sniff",
    )
    model = tf.MistralForCausalLM(config).eval()

    def refused():
        with pytest.raises(CaptureError, match="full_attention_only=True, but every layer of this mistral model"):
            with qk_attn.session(sampler="all", full_attention_only=True) as s:
                model(**padded_batch("left"))
                s.commit()

    refused()  # the model's first forward: its end is found by structure
    with qk_attn.session(sampler="all", full_attention_only=False) as s:  # the way out
        model(**padded_batch("left"))
    assert s.table().num_rows > 0
    refused()  # a later forward: its end is the decoder stack's own hook


def test_an_assistant_model_loaded_with_qk_sniff_is_refused():
    """Assisted decoding's assistant drafts tokens that are mostly thrown away: its forwards are no
    document, and its first forward would take the ids given for the main model's rows."""
    from support.models import build

    main, assistant = build("llama3", "qk_sniff"), build("llama3", "qk_sniff", seed=7)
    with qk_attn.session(sampler="all", example_ids=[1]):
        with pytest.raises(CaptureError, match="assisted decoding's assistant model, loaded with qk_sniff"):
            main.generate(
                input_ids=torch.arange(5, 13)[None], max_new_tokens=4, do_sample=False, assistant_model=assistant
            )


def test_a_mask_built_for_another_position_than_the_cache_holds_is_refused():
    """BertLMHeadModel without is_decoder (as AutoModelForCausalLM builds it from a BERT config) fills a
    cache it is given, yet builds each mask for cache position 0: a decode step's new keys would be
    taken from slot 0 (the prompt's first key) under a new example id. Refused."""
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    model = tf.BertLMHeadModel(config).eval()
    model.set_attn_implementation("qk_sniff")
    batch = padded_batch("left")
    with qk_attn.session(sampler="all", example_ids=[0, 1]):
        cache = DynamicCache(config=config)
        model(**batch, **cache_kw(cache), use_cache=True)
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
        step = dict(
            input_ids=torch.tensor([[5], [6]]), attention_mask=mask, position_ids=batch["position_ids"][:, -1:] + 1
        )
        with pytest.raises(CaptureError, match="mask for new tokens at cache position 0, but its cache holds 9 tokens"):
            model(**step, **cache_kw(cache), use_cache=True)


def test_a_model_transformers_runs_without_sdpa_is_refused_under_the_sdpa_backend():
    """GPT-OSS declares no sdpa support (its sdpa would drop the attention sinks): qk_sniff's default
    backend would compute another model, capture on or off; backend="eager" records it exactly."""
    config = tf.GptOssConfig(
        **dict(COMMON, num_hidden_layers=2),
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(config).eval()
    ids = torch.randint(1, 90, (1, 12))
    model.set_attn_implementation("eager")
    want = model(input_ids=ids).logits
    model.set_attn_implementation("qk_sniff")
    with pytest.raises(CaptureError, match=r"^qk_sniff: GptOssModel does not support sdpa .* use backend=eager$"):
        model(input_ids=ids)  # capture off
    with pytest.raises(CaptureError, match="GptOssModel does not support sdpa"):
        with qk_attn.session(sampler="all"):
            model(input_ids=ids)
    with qk_attn.session(sampler="all", backend="eager") as s:
        got = model(input_ids=ids).logits
    assert torch.equal(got, want) and s.table().num_rows > 0


def _mpt():  # (set_attn_implementation keeps sdpa on MPT, with transformers' warning: built so)
    config = tf.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="qk_sniff")


def _t5gemma():
    part = dict(COMMON, num_hidden_layers=2, head_dim=16, sliding_window=4)
    part["layer_types"] = ["sliding_attention", "full_attention"]
    config = tf.T5GemmaConfig(encoder=dict(part), decoder=dict(part), vocab_size=VOCAB, pad_token_id=0)
    model = tf.T5GemmaForConditionalGeneration(config)
    model.set_attn_implementation("qk_sniff")
    return model


ENCODER_DECODER = r"^qk_sniff: (T5GemmaEncoder|layer 0) belongs to an encoder-decoder model \(T5GemmaModel\); qk-attn"


@pytest.mark.parametrize(
    "make, backend, says",
    [
        (_mpt, "sdpa", r"^qk_sniff: MptModel's attention does not go through transformers' attention interface"),
        (_t5gemma, "sdpa", ENCODER_DECODER),  # (sdpa: refused as unsupported from transformers 5.25 on)
        (_t5gemma, "eager", ENCODER_DECODER),
    ],
)
def test_a_model_without_sdpa_that_eager_could_not_record_either_is_not_advised_eager(make, backend, says):
    """They were told `use backend=eager`, whose forward was then refused for another reason (no attention
    interface: MPT, Bloom; an encoder-decoder whose encoder and decoder have configs of their own, T5Gemma: its
    layer 0 "ran again with other inputs", with advice about 4-D masks)."""
    torch.manual_seed(0)
    model = make().eval()
    extra = {"decoder_input_ids": torch.tensor([[3, 4, 5]])} if model.config.is_encoder_decoder else {}
    with pytest.raises(CaptureError, match=says) as refused:
        with qk_attn.session(sampler="all", backend=backend):
            model(input_ids=torch.tensor([[3, 4, 5, 6, 7]]), **extra)
    assert "eager" not in str(refused.value) and "4-D" not in str(refused.value)


@pytest.mark.parametrize("into", ["memory", "parquet"])
def test_settings_that_select_no_layer_of_the_model_are_refused_not_committed_empty(tmp_path, into):
    """Gemma 3's layers 0 and 2 have a sliding window: layers="0,2" with full_attention_only selects
    nothing, and its examples were committed with no rows and a valid length of 0."""
    model = build("gemma3", "qk_sniff")
    out = tmp_path / "out"
    settings = dict(sampler="all", layers="0,2", full_attention_only=True)
    with pytest.raises(
        ConfigError,
        match=r"^nothing would be recorded: this model has no layer .*check layers, heads, key_heads and full_att",
    ):
        with qk_attn.session(**settings, **({"output": out} if into == "parquet" else {})) as s:
            model(**padded_batch("left"))
    assert not s.sink.committed_ids()
    with qk_attn.session(sampler="all", layers="0,1", full_attention_only=True) as s:  # layer 1 is full
        model(**padded_batch("left"))
    assert set(s.table()["layer"].to_pylist()) == {1}


def test_a_cache_that_reports_no_tokens_from_a_linear_first_layer_is_refused_naming_it():
    """MiniMax-Text-01's layout: layer 0 is linear attention, so MiniMaxCache.get_seq_length() (read from
    layer 0) says 0 after the prefill, and the decode step's key slot cannot be told. The refusal names the
    cache's reported length, not only the key lengths."""
    torch.manual_seed(0)
    config = tf.MiniMaxConfig(
        **{**COMMON, "num_hidden_layers": 2}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"], block_size=4, attn_implementation="qk_sniff",
    )  # fmt: skip
    model = tf.MiniMaxForCausalLM(config).eval()
    ids = torch.randint(2, VOCAB - 2, (1, 7), generator=torch.Generator().manual_seed(1))
    # (5.17's generate() passes the mask, whose columns are then checked first; 5.2x's passes none)
    with torch.no_grad(), pytest.raises(CaptureError, match=r"the cache said it held 0 tokens .*MiniMax"):
        with qk_attn.session(sampler="all"):
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_layers_pruned_in_place_within_a_session_are_refused_not_keyed_by_their_old_index():
    """A pruning script drops layer 0 and renumbers the others' layer_idx (and num_hidden_layers): the
    session had each module's layer index from its first call and keyed the rows by the old one."""
    model = build("llama3", "qk_sniff")
    ids = torch.randint(2, VOCAB - 2, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qk_attn.session(sampler="all") as s:
        s.begin([0])
        model(input_ids=ids)
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[1:])
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = index
        model.config.num_hidden_layers = len(model.model.layers)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[1:]
        s.begin([1])
        with pytest.raises(CaptureError, match="the model now has 2 layers where its first recorded forward"):
            model(input_ids=ids)


def _lfm2():
    """A hybrid model: layers 0 and 2 are convolutions (no attention), layers 1 and 3 attend."""
    torch.manual_seed(0)
    config = tf.Lfm2Config(**{**COMMON, "num_hidden_layers": 4}, layer_types=["conv", "full_attention"] * 2)
    model = tf.Lfm2ForCausalLM(config).eval()
    model.set_attn_implementation("qk_sniff")
    return model


@pytest.mark.parametrize("into", ["memory", "parquet"])
def test_layers_without_attention_of_a_hybrid_model_are_not_planned(tmp_path, into):
    """A hybrid model's conv (Mamba, linear-attention) layers were planned as attention layers: layers="0"
    committed examples with no rows and a valid length of 0, which verify passed, and a head sample drew
    pairs there (seed 2 of 3 pairs: none recorded). They are excluded, named in the refusal and the plan."""
    model = _lfm2()
    ids = torch.randint(2, VOCAB - 2, (1, 8), generator=torch.Generator().manual_seed(0))
    out = {"output": tmp_path / "out"} if into == "parquet" else {}
    with pytest.raises(
        ConfigError, match=r"^nothing would be recorded: .*\(no attention \(conv layer\); not in layers"
    ):
        with qk_attn.session(sampler="all", layers="0", **out) as s:
            model(input_ids=ids)
    assert not s.sink.committed_ids()
    for seed in range(4):
        with qk_attn.session(sampler="all", capture="q", head_sample_count=3, head_sample_seed=seed) as s:
            model(input_ids=ids)
        assert s.plan.excluded_layers == {0: "no attention (conv layer)", 2: "no attention (conv layer)"}
        recorded = set(zip(s.table()["layer"].to_pylist(), s.table()["head"].to_pylist()))
        assert len(recorded) == 3 and {layer for layer, _ in recorded} <= {1, 3}


def test_a_layer_planned_without_attention_that_calls_it_is_refused(monkeypatch):
    """Which layers attend is read from the model's modules (plan.attention_layers): a layer it missed that
    calls attention is refused in one line, never recorded under a plan that left it out."""
    from qk_attn.capture import plan

    monkeypatch.setattr(plan, "attention_layers", lambda model, module: frozenset({0}))
    model = build("llama3", "qk_sniff")
    with pytest.raises(CaptureError, match=r"^qk_sniff: layer 1 \(LlamaAttention\) called attention, but qk-attn"):
        with qk_attn.session(sampler="all") as s:
            model(input_ids=torch.tensor([[2, 3, 4]]))
    assert s.table() is None
