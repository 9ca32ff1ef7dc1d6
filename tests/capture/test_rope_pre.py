"""rope="pre": each layer records exactly the vectors RoPE was given, or the forward is refused in
one line that names the class, what its forward does and `use rope='post'` (qk_attn/capture/rope_check.py).

Tiny real models built from their config classes: layers whose forward skips RoPE under a test of the
module (Cohere 2 and EXAONE 4 full-attention layers, Falcon with ALiBi) are recorded as projected;
a norm after RoPE (HunYuan), rotary split inside the forward (Phi), q and k rotated apart (Gemma 4),
another rotary function (Llama 4) and a rotation under a per-call test are refused. The seed families'
pre-RoPE rows against the hooks: tests/capture/test_capture_models.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import transformers as tf
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

import qk_attn
from qk_attn.errors import CaptureError
from support.models import COMMON, build, padded_batch
from support.oracle import captured_and_truth, rows_by_key

torch.set_grad_enabled(False)
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]  # layer 1 applies no RoPE


def _tiny(model_cls, config):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.set_attn_implementation("qk_sniff")
    return model


def _refused(model, pattern: str) -> str:
    """The forward's one-line refusal under rope="pre"; nothing of it is committed."""
    with pytest.raises(CaptureError, match=pattern) as raised:
        with qk_attn.session(sampler="all", rope="pre") as s:
            model(**padded_batch("left"))
    message = str(raised.value)
    assert "\n" not in message and message.endswith("use rope='post'")
    assert s.sink.committed == [] and s.table() is None
    return message


# ---- layers whose forward skips RoPE: recorded as they are ------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: _tiny(
            tf.Cohere2ForCausalLM, tf.Cohere2Config(**COMMON, head_dim=16, sliding_window=4, layer_types=MIXED)
        ),
        lambda: _tiny(
            tf.Exaone4ForCausalLM, tf.Exaone4Config(**COMMON, head_dim=16, sliding_window=4, layer_types=MIXED)
        ),
    ],
    ids=["cohere2", "exaone4"],
)
def test_full_attention_layers_that_skip_rope_record_the_projection(make: Callable):
    """Cohere 2 and EXAONE 4 rotate only where `self.sliding_window` says so: layer 1's rows are its
    projection (after EXAONE 4's q/k norm), not an inverse rotation of it; layers 0 and 2 un-rotated."""
    model = make()
    batch = padded_batch("left", lengths=(12, 7))
    got, want = captured_and_truth(model, batch, [0, 1], stage="pre")
    assert got.keys() == want.keys() and {k[1] for k in got} == {0, 1, 2}
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=1e-5, atol=1e-6, err_msg=str(key))


@pytest.mark.skipif(
    not hasattr(tf.models.falcon.modeling_falcon, "ALL_ATTENTION_FUNCTIONS"),
    reason="Falcon calls no attention interface on this transformers, so it cannot run qk_sniff",
)
def test_falcon_with_alibi_records_the_vectors_attention_sees():
    """ALiBi puts positions in the mask and Falcon never rotates: pre rows are the post rows."""
    config = tf.FalconConfig(
        vocab_size=COMMON["vocab_size"], hidden_size=64, num_hidden_layers=3, num_attention_heads=4, alibi=True
    )
    model = _tiny(tf.FalconForCausalLM, config)
    tables = {}
    for stage in ("post", "pre"):
        with qk_attn.session(sampler="all", rope=stage, example_ids=[0, 1]) as s:
            model(**padded_batch("left"))
        tables[stage] = rows_by_key(s.table())
    assert tables["pre"].keys() == tables["post"].keys() and tables["pre"]
    assert all(np.array_equal(tables["pre"][k], v) for k, v in tables["post"].items())


# ---- rotations rope="pre" cannot undo: refused in one line --------------------------------------


def test_a_norm_after_rope_is_refused():
    """HunYuan normalises q and k after rotating them: un-rotating the normalised vectors gives
    neither the projection nor the norm's output."""
    model = _tiny(tf.HunYuanDenseV1ForCausalLM, tf.HunYuanDenseV1Config(**COMMON, head_dim=16))
    _refused(
        model,
        r"^qk_sniff: rope='pre': HunYuanDenseV1Attention: its forward changes query_states after rotating it "
        r"\(`query_states = self.query_layernorm\(query_states\)`\); ",
    )


def test_rotary_split_off_inside_the_forward_is_refused_naming_the_parts():
    """Phi rotates the first half of each head and joins the rest after RoPE (not multi-head latent attention)."""
    model = _tiny(tf.PhiForCausalLM, tf.PhiConfig(**COMMON))
    message = _refused(
        model,
        r"^qk_sniff: rope='pre': PhiAttention rotates 8 of the 16 dimensions of each q head; its forward rotates "
        r"`query_rot, key_rot` but attends with `query_states, key_states` \(parts split off before RoPE and "
        r"joined after it\); ",
    )
    assert "latent" not in message


def test_q_and_k_rotated_in_separate_calls_are_refused():
    """Gemma 4's apply_rotary_pos_emb takes one tensor: two calls, not the one rope="pre" undoes."""
    config = tf.Gemma4TextConfig(
        **COMMON,
        head_dim=16,
        global_head_dim=16,
        sliding_window=4,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        layer_types=MIXED,
    )
    _refused(
        _tiny(tf.Gemma4ForCausalLM, config),
        r"^qk_sniff: rope='pre': Gemma4TextAttention: its forward rotates in 2 calls "
        r"\(`apply_rotary_pos_emb\(query_states, cos, sin, unsqueeze_dim=2\)`, ",
    )


def test_another_rotary_function_is_refused():
    """Llama 4 rotates with complex frequencies (apply_rotary_emb); its module has no apply_rotary_pos_emb."""
    config = tf.Llama4TextConfig(
        **COMMON, head_dim=16, num_local_experts=2, intermediate_size_mlp=96, interleave_moe_layer_step=1
    )
    _refused(
        _tiny(tf.Llama4ForCausalLM, config),
        r"^qk_sniff: rope='pre': Llama4TextAttention: its forward rotates with another function "
        r"\(`query_states, key_states = apply_rotary_emb\(",
    )


class _RotatesLongInputsOnly(LlamaAttention):
    """Rotates under a test of the call's inputs, which rope="pre" cannot evaluate per layer."""

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        if hidden_states.shape[1] > 64:
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query_states, key_states, value_states, attention_mask, scaling=self.scaling)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights


def test_a_rotation_under_a_test_of_the_inputs_is_refused():
    model = build("llama3", "qk_sniff")
    for layer in model.model.layers:
        layer.self_attn.__class__ = _RotatesLongInputsOnly
    _refused(
        model,
        r"^qk_sniff: rope='pre': _RotatesLongInputsOnly: its forward rotates only when `hidden_states.shape\[1\] > "
        r"64`, which is not a test of the module's own attributes or of its position_embeddings; ",
    )
    with qk_attn.session(sampler="all") as s:  # rope="post" records it
        model(**padded_batch("left"))
    assert s.table().num_rows > 0
