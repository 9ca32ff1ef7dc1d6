"""Undo RoPE on captured rows with the model's own rotary code (rope="pre"; docs/architecture.md).

No family tables: `apply_rotary_pos_emb` is looked up in the attention module's own Python
module and cos/sin are the ones the layer's forward applied, so partial, interleaved and
scaled rotary (GLM, yarn, longrope, llama3, dynamic) come for free. The few documented
special cases each sit behind one small function below.
"""

from __future__ import annotations

import sys

import torch

from qk_attn.capture.gather import SelectionSpec, as_states, select_rows
from qk_attn.errors import CaptureError, ConfigError


def uses_rope(module) -> bool:
    """False for layers that skip rotation (SmolLM3's NoPE layers set `use_rope = 0`)."""
    return bool(getattr(module, "use_rope", True))


def _modeling_module(module):
    return sys.modules[type(module).__module__]


def pre_rope_rows(module, spec: SelectionSpec, tokens, rotary, one_head: torch.Tensor, vector_dtype: torch.dtype):
    """rope="pre": one call's selected rows un-rotated with the cos/sin the layer applied. The
    per-token columns (token id, cos/sin) are gathered by the same selection as the vectors, as
    one-head states (`one_head`: the head-id table (0,) on the states' device)."""
    if rotary is None:
        raise ConfigError(
            f"rope='pre': {type(module).__name__} did not expose the cos/sin it applied (no "
            "position_embeddings in its forward); use rope='post'"
        )
    count, row, position, bucket, vectors = select_rows(spec)
    per_token = spec._replace(token_offset=0, heads=one_head, out_dtype=torch.float32)
    batch_size, device = tokens.positions.shape[0], spec.states.device
    cos, sin = (select_rows(per_token._replace(states=as_states(t, batch_size, device)))[4] for t in rotary)
    vectors = invert_rope(module, spec.kind, vectors, position, (cos, sin)).to(vector_dtype)
    token_id = None
    if tokens.token_ids is not None:
        token_id = select_rows(per_token._replace(states=tokens.token_ids))[4].reshape(-1).to(torch.int32)
    return count, row, position, bucket, vectors, token_id


def invert_rope(module, kind: str, vectors: torch.Tensor, positions: torch.Tensor, rotary) -> torch.Tensor:
    """Pre-RoPE rows from post-RoPE rows, with the cos/sin the forward applied to those tokens.

    vectors (H, N, D) float32, positions (N,) int, rotary = (cos, sin) each (1, N, R) fp32;
    returns (H, N, D) float32. RoPE is y = R x with R a scaled rotation (cos, sin scaled by s),
    so R^T y = s^2 x and R^T is the model's own `apply_rotary_pos_emb` with -sin. The scale s^2
    (1 on pass-through dims of partial rotary) is read off the same code applied to ones, so no
    layout (partial, interleaved) is assumed here.
    """
    cos, sin = rotary
    apply = _modeling_module(module).apply_rotary_pos_emb
    rows = vectors[None]  # (1, H, N, D) as apply_rotary_pos_emb expects (B, H, T, D)
    try:
        back = apply(rows, rows, cos, -sin)[0]
    except RuntimeError as error:  # shapes only: raised before anything runs on the device
        raise CaptureError(
            f"qk_sniff: rope='pre': {type(module).__name__} rotates {cos.shape[-1]} of the {vectors.shape[-1]} "
            f"dimensions of each {kind} head outside the layout its apply_rotary_pos_emb handles (multi-head latent "
            "attention splits heads into rotated and unrotated parts), so it cannot be inverted here; use "
            "rope='post'"
        ) from error
    ones = torch.ones_like(rows[:, :1])
    scale = apply(apply(ones, ones, cos, sin)[0], ones, cos, -sin)[0]
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
