"""Checks behind the facts about the names a forward's inputs reach qk-attn under (qk_attn.capture.facts):
packed-sequence keywords at the attention call, image inputs in the model's forward."""

from __future__ import annotations

import importlib
import inspect

PACKED_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k")  # attention.refuse_packed
IMAGE_INPUTS = ("pixel_values",)  # frames.model_forward: a forward with images (mrope refused)
IMAGE_MODELS = ("gemma3.Gemma3ForConditionalGeneration", "mllama.MllamaForConditionalGeneration")


def packed_sequence_keywords() -> str | None:
    """Packed documents reach the attention call as the keywords refuse_packed reads (else they would be
    recorded as one document)."""
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs, _flash_attention_forward

    missing = [name for name in PACKED_KEYWORDS if name not in FlashAttentionKwargs.__annotations__]
    if missing:
        return f"FlashAttentionKwargs has {sorted(FlashAttentionKwargs.__annotations__)}"
    signature = inspect.signature(_flash_attention_forward)
    missing = [name for name in PACKED_KEYWORDS if name not in signature.parameters]
    return f"_flash_attention_forward{signature}" if missing else None


def image_inputs() -> str | None:
    """The seed image-text models take their images as `pixel_values` in forward()."""
    for path in IMAGE_MODELS:
        family, name = path.split(".")
        cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
        parameters = inspect.signature(cls.forward).parameters
        if any(image not in parameters for image in IMAGE_INPUTS):
            return f"{name}.forward{inspect.signature(cls.forward)}"
    return None
