"""The "qk_sniff" attention function: the wrapped backend's attention, plus capture.

Data path of one call (nothing here reads a device value on the host):

    attention call -> ForwardContext of this forward (ids, positions, validity, key slot)
                   -> per kind: select_rows (sampler mask, compaction, gather)
                   -> optional inverse RoPE -> CaptureBatch -> session's sink
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from qk_attn.capture import active
from qk_attn.capture.backends import attention_forward
from qk_attn.capture.fact_checks_inputs import PACKED_KEYWORDS
from qk_attn.capture.modeling_checks import check_attention_module
from qk_attn.capture.tokens import TextTokens
from qk_attn.errors import CaptureError


def qk_sniff_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Registered as "qk_sniff". query (B, Hq, T, D), key/value (B, Hkv, K, D), post-RoPE;
    K includes cached keys; `args` (a dropout or scaling passed by position) go to the backend as
    given. Returns whatever the wrapped backend returns."""
    check_attention_module(module)
    session = active.current_session()
    backend = attention_forward((session.config if session is not None else active.current_config()).backend)
    output = backend(module, query, key, value, attention_mask, *args, **kwargs)
    if session is not None:
        _record(session, module, query, key, attention_mask, kwargs)
    return output


def attend_and_capture(backend, module, query, key, value, attention_mask, *args, **kwargs):
    """`backend`'s attention, then this call's rows to the active session (if any)."""
    check_attention_module(module)
    session = active.current_session()
    output = backend(module, query, key, value, attention_mask, *args, **kwargs)
    if session is not None:
        _record(session, module, query, key, attention_mask, kwargs)
    return output


def _record(session, module, query, key, attention_mask, kwargs) -> None:
    # Vision towers have no layer_idx: only text attention layers are recorded.
    if getattr(module, "layer_idx", None) is None:
        session.refuse_unnumbered(module)
        return
    rotary = applied_rotary(module) if session.config.rope == "pre" else None
    if query.is_cuda or torch.compiler.is_compiling():
        # The graph-break wrapper costs a few microseconds per call: only pay it while compiling.
        capture = _capture_outside_graph if torch.compiler.is_compiling() else _capture
        capture(session, module, query, key, attention_mask, kwargs, rotary)
    else:
        session.capture(module, query, key, attention_mask, kwargs, rotary)


def applied_rotary(module, max_depth: int = 4):
    """(cos, sin) that the attention module's forward (our caller) applied: its local
    `position_embeddings`. The inverse must use these: dynamic and longrope RoPE depend on the
    whole forward, not only on the positions. None when the forward has no such local."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_locals.get("self") is module:
            return frame.f_locals.get("position_embeddings")
    return None


def _capture(session, module, query, key, attention_mask, kwargs, rotary) -> None:
    """Kept out of torch.compile graphs (`_capture_outside_graph`, a graph break): its Python
    bookkeeping must run every forward, and its buffers must not live in CUDA-graph memory that
    the next replay overwrites."""
    if not query.is_cuda:
        session.capture(module, query, key, attention_mask, kwargs, rotary)
        return
    if torch.cuda.is_current_stream_capturing():
        raise CaptureError(
            "qk_sniff: capture cannot run inside CUDA-graph capture; compile without "
            "mode='reduce-overhead' (generate(..., disable_compile=True) for static caches)"
        )
    with torch.cuda.device(query.device):  # kernels and copies go to the layer's own GPU under device_map
        session.capture(module, query, key, attention_mask, kwargs, rotary)


_capture_outside_graph = torch.compiler.disable(_capture)


class ModuleFacts(NamedTuple):
    """What an attention module says of itself, read and checked once per module (`Session` keeps
    them): reading an attribute that an nn.Module or a config lacks costs microseconds, which a
    decode step pays 2 x layers times."""

    layer: int
    cross: bool  # `is_cross_attention`
    sliding_window: int | None  # the module's own, for calls whose kwargs do not pass one
    layer_type: str | None  # its config's layer_types entry (`layer_type`)
    bidirectional: bool = False  # `is_causal` False (ModernBERT): its window is flash's, one more than its masks'


def module_facts(module) -> ModuleFacts:
    """The module's facts; modules whose rows cannot be attributed exactly are refused, with the reason."""
    layer = module.layer_idx
    num_layers = getattr(module.config, "num_hidden_layers", None)
    if not isinstance(layer, int) or layer < 0 or (num_layers is not None and layer >= num_layers):
        raise CaptureError(
            f"qk_sniff: {type(module).__name__} has layer_idx {layer}, outside the model's {num_layers} "
            "layers (an attention block shared between layers, as Zamba2's), so its rows could not be keyed "
            "by layer; not recorded"
        )
    if getattr(module.config, "is_encoder_decoder", False):
        raise CaptureError(
            f"qk_sniff: {type(module).__name__} belongs to an encoder-decoder model; qk-attn records "
            "decoder-only models (their self-attention positions and caches)"
        )
    kind = layer_type(module.config, layer)
    window, bidirectional = getattr(module, "sliding_window", None), getattr(module, "is_causal", True) is False
    return ModuleFacts(layer, is_cross_attention(module), window, kind, bidirectional)


def layer_type(config, layer: int) -> str | None:
    """`config.layer_types[layer]` ("full_attention", "sliding_attention", "chunked_attention", ...; None
    where the config has none): transformers builds each layer's mask by it. A config's `sliding_window`
    alone says nothing: Moshi sets one and attends in full."""
    try:
        types = getattr(config, "layer_types", None)
    except Exception:  # a per-layer setting read globally (transformers >= 5.25's heterogeneous configs)
        return None
    return str(types[layer]) if types and layer < len(types) else None


def call_window(facts: ModuleFacts, kwargs: dict, mask_windows: set) -> int | None:
    """The sliding window an attention call names: its `sliding_window=` keyword, else its module's own
    (None: none named). Refused when it is not a positive int, and on a layer whose `layer_type` says full
    attention unless every mask its forward built has that window (MiniMax builds its full-attention
    layers' mask with the window): a full mask was built, which sdpa attends through and a flash kernel
    given the window would not, so the rows' `sliding_window` could not be told. Refused too when the
    forward's sliding masks have another window (a config edited after the model was built)."""
    window = kwargs.get("sliding_window", facts.sliding_window)
    if window is None:
        return None
    if type(window) is not int or window <= 0:
        raise CaptureError(
            f"qk_sniff: layer {facts.layer}'s attention call names the sliding window {window!r}, not a positive "
            "int, so its rows' sliding_window could not be recorded; not recorded"
        )
    if facts.layer_type == "full_attention" and mask_windows != {window}:
        raise CaptureError(
            f"qk_sniff: layer {facts.layer}'s attention call names a sliding window of {window} where its config's "
            f"layer_types says full_attention and its forward built masks with windows {sorted(mask_windows, key=str)}, "
            "so which of them it attends through could not be told; not recorded"
        )
    if window not in mask_windows and len(mask_windows) > (None in mask_windows) and not facts.bidirectional:
        # Its sliding masks have another window: the config's edited after loading, while the module kept its own.
        # (Bidirectional models keep flash's window, config.sliding_window + 1, and build their masks with the config's.)
        raise CaptureError(
            f"qk_sniff: layer {facts.layer}'s attention call names a sliding window of {window}, but its forward built "
            f"its sliding masks with {sorted(mask_windows - {None})} (config.sliding_window changed after the model "
            "was built?), so the window it attends through could not be told; not recorded: keep the window the "
            "model was built with, or build it again from the edited config"
        )
    return window


PACKED = frozenset(PACKED_KEYWORDS)  # a call's kwargs meet it (`not PACKED.isdisjoint(kwargs)`) only when packed


def refuse_packed(kwargs: dict) -> None:
    """Calls whose rows cannot be attributed exactly are refused, with the reason."""
    if any(kwargs.get(name) is not None for name in PACKED_KEYWORDS):
        raise CaptureError(
            "qk_sniff: packed sequences (cu_seq_lens_*) hold several documents in one row; "
            "run one document per batch row (pad instead of packing) to record them"
        )


def is_cross_attention(module) -> bool:
    """Cross-attention layers (Mllama) attend text queries to vision keys."""
    explicit = getattr(module, "is_cross_attention", None)
    return bool(explicit) if explicit is not None else "CrossAttention" in type(module).__name__


def key_validity(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """(B, K) bool: key k of row b is attended by some query. None means all valid.

    Used for cross-attention keys only (vision tokens; no 2-D text mask describes them).
    mask is bool or additive float (B|1, 1|H, Q, K), or a 2-D (B, K) padding mask.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    valid = mask if mask.dim() == 2 else mask.any(-2)[:, 0]
    return valid.expand(batch, -1)


def cross_attention_keys(key: torch.Tensor, mask) -> tuple[int, TextTokens]:
    """Vision keys of a cross-attention layer: position = vision token index, no token ids."""
    batch, num_keys = key.shape[0], key.shape[2]
    valid = key_validity(mask, batch)
    if valid is None:
        valid = torch.ones(batch, num_keys, dtype=torch.bool, device=key.device)
    positions = torch.arange(num_keys, device=key.device).expand(batch, num_keys)
    numbered = torch.zeros(batch, dtype=torch.bool, device=key.device)  # vision keys: one per index
    return 0, TextTokens(positions, valid, valid.sum(1), positions[:, 0], numbered, None)


def check_shapes(forward, layer: int, query_shape: torch.Size, key_shape: torch.Size, cross: bool) -> int:
    """An attention call's query and key shapes against its forward, on the host (no device read).
    Returns how many of the forward's new tokens the query holds: all of them, or its last ones
    (layers that compute only the positions whose logits are kept, as Gemma 4's shared-KV layers do)."""
    batch = forward.batch_size
    if query_shape[0] != batch or key_shape[0] != batch:
        raise CaptureError(
            f"qk_sniff: layer {layer} got a query of batch {query_shape[0]} and a key of batch "
            f"{key_shape[0]} in a forward of batch {batch}; not recorded"
        )
    num_queries = query_shape[2]
    if not 0 < num_queries <= forward.num_new:
        raise CaptureError(
            f"qk_sniff: layer {layer} got {num_queries} queries in a forward of {forward.num_new} "
            f"new tokens{_tokens_second(query_shape, forward.num_new)}; not recorded"
        )
    if not cross and key_shape[2] < forward.num_new:
        raise CaptureError(
            f"qk_sniff: layer {layer} got {key_shape[2]} keys in a forward of {forward.num_new} new "
            f"tokens{_tokens_second(key_shape, forward.num_new)}; not recorded"
        )
    return num_queries


def _tokens_second(shape: torch.Size, num_new: int) -> str:
    """What a refused shape says when its axis 1 holds the tokens: states laid out (batch, tokens, heads,
    head_dim), where qk-attn reads (batch, heads, tokens, head_dim) as transformers' backends do."""
    if shape[1] != num_new:
        return ""
    return f" (a {tuple(shape)} tensor: tokens on axis 1, not (batch, heads, tokens, head_dim))"
