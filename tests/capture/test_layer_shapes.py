"""Models whose layers differ in shape: head sizes (recorded, per layer) and head counts (refused)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import qk_attn
from qk_attn.errors import CaptureError
from support.models import build, gemma4, padded_batch
from support.run import all_rows

torch.set_grad_enabled(False)


def test_layers_of_two_head_sizes_are_recorded_in_memory_as_in_parquet(tmp_path):
    """Gemma 4's full-attention layers have their own head size (global_head_dim): an in-memory
    session's table holds both, row for row what the Parquet dataset holds."""
    model = gemma4(["sliding_attention", "full_attention", "sliding_attention"], global_head_dim=32)
    batch = padded_batch("left")
    model.set_attn_implementation("sdpa")
    want = model(**batch).logits
    model.set_attn_implementation("qk_sniff")
    settings = dict(sampler="all", example_ids=[0, 1])
    with qk_attn.session(**settings) as memory:
        assert torch.equal(model(**batch).logits, want)
    with qk_attn.session(output=tmp_path / "out", **settings) as s:
        model(**batch)
        s.commit()
    table = memory.table().to_pydict()
    keys = ("example_id", "layer", "head", "kind", "position", "bucket")
    rows = {tuple(table[k][i] for k in keys): np.asarray(table["vector"][i]) for i in range(len(table["layer"]))}
    sizes = {layer: len(vector) for (_, layer, *_), vector in rows.items()}
    layer_types = model.config.layer_types  # Gemma 4 makes its last layer full attention
    assert sizes == {layer: 32 if kind == "full_attention" else 16 for layer, kind in enumerate(layer_types)}
    assert set(sizes.values()) == {16, 32}
    written = all_rows(tmp_path / "out")
    assert rows.keys() == written.keys()
    for key, vector in rows.items():
        np.testing.assert_array_equal(vector, written[key], err_msg=str(key))


@pytest.mark.parametrize("first", ["sliding_attention", "full_attention"])
def test_layers_with_other_head_counts_are_refused(first):
    """Gemma 4 with num_global_key_value_heads: its full layers have 1 key/value head, its sliding
    layers 2. One head plan cannot serve both (key heads would be missed or mapped to the wrong
    query heads), so the forward is refused, whichever kind of layer comes first."""
    other = "full_attention" if first == "sliding_attention" else "sliding_attention"
    model = gemma4([first, other, first], num_global_key_value_heads=1, attention_k_eq_v=True)
    model.set_attn_implementation("qk_sniff")
    with qk_attn.session(sampler="all") as s:
        with pytest.raises(CaptureError, match=r"layer 1 has 4 query and [12] key/value heads where the model's first"):
            model(**padded_batch("left"))
        assert s.table() is None or s.table().num_rows == 0


@pytest.mark.parametrize("change", ["repeated keys", "tokens before heads"])
def test_attention_called_with_other_heads_than_the_configs_is_refused(change):
    """A release that repeats the key heads for GQA before the attention call, or hands it
    (B, T, H, D): rows would be recorded under heads the model does not have."""
    from qk_attn.capture.plan import ModelShape

    module = build("llama3", "qk_sniff").model.layers[0].self_attn  # 4 query heads, 2 key/value heads
    query, key = torch.zeros(1, 4, 5, 16), torch.zeros(1, 2, 5, 16)
    assert ModelShape.from_module(module, query, key).num_kv_heads == 2
    if change == "repeated keys":
        key, why = key.repeat_interleave(2, 1), "keys of 4 heads, repeated for its num_key_value_groups=2"
    else:
        query, key, why = (
            query.transpose(1, 2),
            key.transpose(1, 2),
            "whose heads \\(num_attention_heads=4\\) are axis 2",
        )
    with pytest.raises(CaptureError, match=why):
        ModelShape.from_module(module, query, key)


def test_latent_attention_keys_for_every_query_head_are_not_taken_for_repeated_ones():
    """DeepSeek-V3's multi-head latent attention expands its keys per query head from a latent, also
    where its config says fewer key/value heads (num_key_value_groups 2)."""
    from qk_attn.capture.plan import ModelShape

    config = tf.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16,
    )  # fmt: skip
    module = tf.DeepseekV3ForCausalLM(config).model.layers[0].self_attn
    assert module.num_key_value_groups == 2
    shape = ModelShape.from_module(module, torch.zeros(1, 4, 5, 16), torch.zeros(1, 4, 5, 16))
    assert (shape.num_heads, shape.num_kv_heads) == (4, 4)
