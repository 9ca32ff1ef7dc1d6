"""Tiny random models of every seed family, built from their config classes (no Hub)."""

from __future__ import annotations

import inspect

import torch
import transformers as tf

VOCAB = 96
# The forward's cache argument: `cache` from transformers 5.2x, `past_key_values` before (5.17);
# a name the forward does not know would be swallowed by **kwargs and the cache silently unused.
CACHE_ARG = "cache" if "cache" in inspect.signature(tf.LlamaModel.forward).parameters else "past_key_values"


def cache_kw(cache) -> dict:
    """{CACHE_ARG: cache}, for `model(input_ids=ids, **cache_kw(cache))` on every transformers."""
    return {CACHE_ARG: cache}


COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
)


def llama3():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, rope_parameters=rope))


def qwen2():
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON))


def qwen3():
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=16))


def gemma3():
    config = tf.Gemma3TextConfig(
        **COMMON,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return tf.Gemma3ForCausalLM(config)


def glm():
    return tf.GlmForCausalLM(tf.GlmConfig(**COMMON, head_dim=16))


def glm4():
    return tf.Glm4ForCausalLM(tf.Glm4Config(**COMMON, head_dim=16))


def ministral():
    config = tf.MinistralConfig(
        **COMMON,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return tf.MinistralForCausalLM(config)


def ministral3():
    rope = {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 4,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale_all_dim": 1.0,
        "mscale": 1.0,
        "llama_4_scaling_beta": 0.1,
    }
    # original_max_position_embeddings=4 so that the query scale 1 + beta*log(1 + pos // 4) varies in a short test
    config = tf.Ministral3Config(**dict(COMMON, max_position_embeddings=64), head_dim=16, rope_parameters=rope)
    return tf.Ministral3ForCausalLM(config)


def smollm3():
    config = tf.SmolLM3Config(**COMMON, no_rope_layers=[1, 0, 1], bos_token_id=1, eos_token_id=2)
    return tf.SmolLM3ForCausalLM(config)


def mllama_config():
    text = dict(COMMON, num_hidden_layers=4, cross_attention_layers=[1], rope_parameters=None)
    text.pop("max_position_embeddings")
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        max_num_tiles=1,
        vision_output_dim=64,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1]],
    )
    return tf.MllamaConfig(text_config=text, vision_config=vision, image_token_index=VOCAB - 1)


def mllama_text():
    return tf.MllamaForCausalLM(mllama_config().text_config)


def mllama():
    return tf.MllamaForConditionalGeneration(mllama_config())


def gemma4(layer_types=("sliding_attention", "full_attention") * 2, **config):
    """Tiny Gemma 4 (text), seeded: head size 16, window 4; `config` sets the rest (global_head_dim,
    num_kv_shared_layers, num_global_key_value_heads, ...)."""
    torch.manual_seed(0)
    text = tf.Gemma4TextConfig(
        **dict(COMMON, num_hidden_layers=len(layer_types)),
        head_dim=16,
        sliding_window=4,
        layer_types=list(layer_types),
        **{"hidden_size_per_layer_input": 0, **config},
    )
    return tf.Gemma4ForCausalLM(text).eval()


FAMILIES = {
    "llama3": llama3,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma3": gemma3,
    "glm": glm,
    "glm4": glm4,
    "ministral": ministral,
    "ministral3": ministral3,
    "smollm3": smollm3,
    "mllama_text": mllama_text,
}


def build(name: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[name]() if name in FAMILIES else globals()[name]()
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def padded_batch(side: str, lengths=(9, 6), seed: int = 1):
    """input_ids, attention_mask and RoPE position_ids for a padded batch (positions count real tokens)."""
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.randint(2, VOCAB - 2, (len(lengths), total), generator=generator)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "left":
            mask[row, total - length :] = 1
        else:
            mask[row, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def _mllama_image_batch():
    batch = padded_batch("left", lengths=(9, 6))
    batch.pop("position_ids")
    batch["input_ids"][:, -6] = model_image_token = 95
    batch["pixel_values"] = torch.randn(2, 1, 1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    batch["aspect_ratio_ids"] = torch.ones(2, 1, dtype=torch.long)
    batch["aspect_ratio_mask"] = torch.ones(2, 1, 1, dtype=torch.long)
    cross = torch.zeros(2, 9, 1, 1, dtype=torch.long)
    cross[:, -6:] = 1  # text from the image token on attends to the image
    batch["cross_attention_mask"] = cross
    return batch, model_image_token


class StopRow(tf.StoppingCriteria):
    """Row `row` is finished once the sequences reach `length` tokens (as an EOS would end it)."""

    def __init__(self, row: int, length: int):
        self.row, self.length = row, length

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.row] = input_ids.shape[1] >= self.length
        return done
