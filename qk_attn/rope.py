"""Undo RoPE on captured rows with the model's own rotary code (DESIGN §3, "pre" stage).

No family tables: the rotary class and `apply_rotary_pos_emb` are looked up in the
attention module's own Python module, so partial, interleaved and scaled rotary
(GLM, yarn, longrope, llama3) come for free. The few documented special cases each sit
behind one small function below.
"""

from __future__ import annotations

import inspect
import sys

import torch


def uses_rope(module) -> bool:
    """False for layers that skip rotation (SmolLM3's NoPE layers set `use_rope = 0`)."""
    return bool(getattr(module, "use_rope", True))


def _modeling_module(module):
    return sys.modules[type(module).__module__]


def _rotary_class(module):
    """The text rotary-embedding class defined next to this attention module."""
    candidates = [
        obj
        for name, obj in vars(_modeling_module(module)).items()
        if name.endswith("RotaryEmbedding") and isinstance(obj, type) and "Vision" not in name
    ]
    if not candidates:
        raise ValueError(
            f"QK_SNIFF_ROPE=pre: no *RotaryEmbedding class next to {type(module).__name__}; "
            "this model cannot be un-rotated, use QK_SNIFF_ROPE=post"
        )
    return min(candidates, key=lambda cls: len(cls.__name__))


class RopeInverter:
    """Per model: computes cos/sin for given positions and applies the inverse rotation."""

    def __init__(self, module, device: torch.device):
        rotary_cls = _rotary_class(module)
        self.rotary = rotary_cls(module.config).to(device)
        self.takes_layer_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.apply = _modeling_module(module).apply_rotary_pos_emb
        self.layer_types = getattr(module.config, "layer_types", None)

    def cos_sin(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (1, N, rotary_dim) in fp32 for int positions (N,)."""
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        args = (probe, positions[None].to(torch.int64))
        if self.takes_layer_type:
            return self.rotary(*args, layer_type=self.layer_types[layer])
        return self.rotary(*args)

    def invert(self, module, layer: int, kind: str, vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE rows from post-RoPE rows.

        vectors (H, N, D) float32, positions (N,) int; returns (H, N, D) float32.
        RoPE is y = R x with R a scaled rotation (cos, sin scaled by s), so R^T y = s^2 x and
        R^T is `apply` with -sin. The scale s^2 (1 on pass-through dims of partial rotary) is
        read off the same code applied to ones, so no layout is assumed here.
        """
        if not uses_rope(module):
            return vectors
        cos, sin = self.cos_sin(layer, positions)
        rows = vectors[None]  # (1, H, N, D) as apply_rotary_pos_emb expects (B, H, T, D)
        back = self.apply(rows, rows, cos, -sin)[0]
        ones = torch.ones_like(rows[:, :1])
        scale = self.apply(self.apply(ones, ones, cos, sin)[0], ones, cos, -sin)[0]
        out = (back / scale)[0]
        if kind == "q":
            out = out / query_scale(module, positions)[:, None]
        return out


def query_scale(module, positions: torch.Tensor) -> torch.Tensor:
    """Ministral 3 multiplies queries by 1 + beta*log(1 + floor(pos/orig_max)) after RoPE; (N,) fp32."""
    scale_fn = getattr(_modeling_module(module), "get_llama_4_attn_scale", None)
    params = getattr(module.config, "rope_parameters", None) or {}
    beta = params.get("llama_4_scaling_beta") if isinstance(params, dict) else None
    if scale_fn is None or beta is None:
        return torch.ones(positions.shape, dtype=torch.float32, device=positions.device)
    scale = scale_fn(positions[None].to(torch.float32), beta, params.get("original_max_position_embeddings"))
    return scale.reshape(-1)
