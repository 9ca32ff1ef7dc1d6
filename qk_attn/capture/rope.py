"""Undo RoPE on captured rows with the model's own rotary code (rope="pre"; docs/architecture.md).

No family tables: `apply_rotary_pos_emb` is the one the attention forward calls and cos/sin are
the ones the layer's forward applied, so partial, interleaved and scaled rotary (GLM, yarn,
longrope, llama3, dynamic) come for free. Whether a forward's rotation can be undone at all, and
whether a layer rotates, is read once per class from the forward's source (`rope_check`): any
other shape is refused in one line, never inverted wrongly. That the inverse (apply with -sin, q and
k each by its own side) undoes the rotation on the layer's own cos/sin is tried once per class, apply
function and rotary class (`_refuse_no_round_trip`). The few documented special cases each sit
behind one small function below.
"""

from __future__ import annotations

import sys

import torch

from qk_attn.capture.gather import SelectionSpec, as_states, select_rows
from qk_attn.capture.rope_check import current_apply, refusal_message, rotates, rotation
from qk_attn.capture.rope_syntax import APPLY
from qk_attn.errors import CaptureError, ConfigError


def uses_rope(module, rotary) -> bool:
    """False for layers whose forward applied no RoPE in this call, read from the forward's own test
    (SmolLM3's `self.use_rope`, Cohere 2's `self.sliding_window is not None`, Falcon's
    `not self.config.alibi`): their vectors are recorded as they are. `rotary`: the layer's
    position_embeddings (None when none were found)."""
    return rotates(module, rotary)


def pre_rope_rows(module, spec: SelectionSpec, tokens, rotary, one_head: torch.Tensor, vector_dtype: torch.dtype):
    """rope="pre": one call's selected rows un-rotated with the cos/sin the layer applied. The
    per-token columns (token id, cos/sin) are gathered by the same selection as the vectors, as
    one-head states (`one_head`: the head-id table (0,) on the states' device). Refused (CaptureError)
    where the forward's rotation is not the one `invert_rope` undoes (`rope_check`)."""
    if rotation(type(module)).refusal is not None:
        rotated = rotary[0].shape[-1] if _is_cos_sin(rotary) else None
        raise CaptureError(refusal_message(module, spec.kind, rotated, spec.states.shape[-1]))
    if rotary is None:
        raise ConfigError(
            f"rope='pre': {type(module).__name__} did not expose the cos/sin it applied (no "
            "position_embeddings in its forward); use rope='post'"
        )
    batch_size, device = tokens.positions.shape[0], spec.states.device
    shapes = [tuple(t.shape) for t in rotary] if _is_cos_sin(rotary) else None
    if (
        shapes is None
        or shapes[0] != shapes[1]
        or not (len(shapes[0]) == 2 or (len(shapes[0]) == 3 and shapes[0][0] in (1, batch_size)))
    ):
        raise ConfigError(  # (a release that shapes cos/sin for the heads already: (B, 1, T, R))
            f"rope='pre': {type(module).__name__} applied cos/sin shaped {shapes}, where qk-attn reads (T, R) or "
            "(batch or 1, T, R) per token; use rope='post'"
        )
    count, row, position, bucket, vectors = select_rows(spec)
    per_token = spec._replace(token_offset=0, heads=one_head, out_dtype=torch.float32)
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
    verdict = rotation(type(module))
    apply = current_apply(verdict)
    side = 0 if kind == "q" else 1  # apply returns (q, k): each undone by its own side
    rows = vectors[None]  # (1, H, N, D) as apply_rotary_pos_emb expects (B, H, T, D)
    try:
        back = _undo(apply, rows, cos, sin, side)
    except (RuntimeError, TypeError, ValueError) as error:  # shapes only: before anything runs on the device
        raise CaptureError(
            f"qk_sniff: rope='pre': {type(module).__name__} rotates {cos.shape[-1]} of the {vectors.shape[-1]} "
            f"dimensions of each {kind} head, which its {getattr(apply, '__name__', APPLY)} cannot undo on the rows "
            f"it hands to attention ({type(error).__name__}: {' '.join(str(error).split())[:120]}); use rope='post'"
        ) from error
    _refuse_no_round_trip(module, apply, cos, sin, vectors.shape[-1])
    out = back[0]
    if kind == "q" and verdict.query_scale is not None:
        out = out / query_scale(module, verdict.query_scale, positions)[:, None]
    return out


def _undo(apply, rows: torch.Tensor, cos, sin, side: int) -> torch.Tensor:
    """R^T y / s^2 for one side (0: q, 1: k) of `apply` (see invert_rope)."""
    ones = torch.ones_like(rows[:, :1])
    scale = apply(*[apply(ones, ones, cos, sin)[side]] * 2, cos, -sin)[side]
    return apply(rows, rows, cos, -sin)[side] / scale


_round_trips: dict[tuple, str | None] = {}  # (attention class, apply, rotary forwards) -> refusal, None: undone
_rotaries: dict[type, tuple] = {}  # attention class -> the rotary embedding classes of its module


def _rotary_classes(cls: type) -> tuple:
    """The rotary embedding classes (by name) of the module `cls` is defined in: a patch of their forward
    (other cos/sin for the same apply) has the round trip tried again."""
    if cls not in _rotaries:
        namespace = vars(sys.modules.get(cls.__module__, object))
        _rotaries[cls] = tuple(
            v
            for v in namespace.values()
            if isinstance(v, type) and issubclass(v, torch.nn.Module) and "Rotary" in v.__name__
        )
    return _rotaries[cls]


def _refuse_no_round_trip(module, apply, cos, sin, head_dim: int) -> None:
    """Whether `apply` with -sin undoes `apply` for both q and k on the cos/sin the layer applied is assumed by
    `invert_rope`, not known: a release whose cos/sin layout does not match its apply (interleaved pairs
    against rotate_half), or which rotates k otherwise than q, breaks it. Tried once per attention class and
    apply function (and rotary forward) on random q and k: one read of the device, at its first rope='pre' call."""
    key = (type(module), apply, *(r.forward for r in _rotary_classes(type(module))))
    # Rows whose cos and sin are all 0 are slots no token was gathered into (the kernel path's capacity):
    # nothing there to undo. (Read only until the key has its verdict: the device read is once per key.)
    live = None if key in _round_trips else cos.ne(0).any(-1) | sin.ne(0).any(-1)
    if live is not None and bool(live.any()):
        generator = torch.Generator().manual_seed(0)
        # One head per row of cos/sin, as the layer's own q and k (a kernel may not broadcast a batch of one)
        rows = cos.shape[0] if cos.dim() == 3 else 1
        q, k = (torch.randn((rows, 1, cos.shape[-2], head_dim), generator=generator).to(cos.device) for _ in "qk")
        rotated = apply(q.clone(), k.clone(), cos, sin)  # (copies: a kernel may rotate in place)
        back = [_undo(apply, rotated[side], cos, sin, side) for side in (0, 1)]
        live = live.expand(rows, cos.shape[-2])
        worst = max(float((b - x).abs().amax(-1)[:, 0][live].max()) for b, x in zip(back, (q, k), strict=True))
        _round_trips[key] = (
            None
            if worst <= 1e-3
            else (
                f"qk_sniff: rope='pre': {type(module).__name__}'s {getattr(apply, '__name__', APPLY)} with -sin does not "
                f"undo its rotation on the cos/sin its layer applied (q and k put through it come back off by up to "
                f"{worst:.2g}), so the pre-RoPE vectors cannot be recovered exactly; use rope='post'"
            )
        )
    if (why := _round_trips.get(key)) is not None:
        raise CaptureError(why)


def query_scale(module, scale_fn, positions: torch.Tensor) -> torch.Tensor:
    """Ministral 3 multiplies queries by 1 + beta*log(1 + floor(pos/orig_max)) after RoPE
    (`scale_fn`: the forward's get_llama_4_attn_scale); (N,) fp32."""
    params = module.config.rope_parameters
    scale = scale_fn(
        positions[None].to(torch.float32),
        params.get("llama_4_scaling_beta"),
        params.get("original_max_position_embeddings"),
    )
    return scale.reshape(-1)


def _is_cos_sin(rotary) -> bool:
    return isinstance(rotary, tuple | list) and len(rotary) == 2 and all(isinstance(t, torch.Tensor) for t in rotary)
