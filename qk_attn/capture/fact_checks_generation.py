"""The checks behind the facts about caches and the generation loop (qk_attn.capture.facts): one
function per fact, None when it holds, else what was found."""

from __future__ import annotations

import ast
import inspect
import textwrap

from qk_attn.capture.fact_checks import init_sets
from qk_attn.capture.parsing import parse


def cache_lengths() -> str | None:
    """After 3 tokens, DynamicCache (full and sliding layers) reports 3, as an int. (A static cache
    gives a device tensor; its forwards' q_offset is one too, checked by OffsetCheck instead.)"""
    import torch
    from transformers import DynamicCache, LlamaConfig

    config = LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1)
    states = torch.zeros(1, 1, 3, 8)
    for cache in (
        DynamicCache(config=config),
        DynamicCache(config=LlamaConfig(**config.to_dict(), sliding_window=2, layer_types=["sliding_attention"])),
    ):
        cache.update(states, states, 0, {"cache_position": torch.arange(3)})
        held = cache.get_seq_length()
        if type(held) is not int or held != 3:
            return f"{type(cache).__name__}.get_seq_length() after 3 tokens is {held!r}"
    return None


def cache_row_methods() -> str | None:
    """The Cache methods that move batch rows, `crop` (which rolls tokens back) and `reset`, are defined on
    Cache and inherited, not overridden, by the caches a decoder uses, so that wrapping them on Cache
    sees every call (capture/caches)."""
    from transformers import cache_utils

    from qk_attn.capture.caches import ROW_METHODS

    for name in (*ROW_METHODS, "crop", "reset"):
        if not callable(getattr(cache_utils.Cache, name, None)):
            return f"Cache has no method {name}"
        for cls in (cache_utils.DynamicCache, cache_utils.StaticCache, cache_utils.QuantizedCache):
            if name in vars(cls):
                return f"{cls.__name__} overrides Cache.{name}"
    return None


def cache_layer_updates() -> str | None:
    """The layer types whose `update` capture/caches trusts exist, a Cache keeps its layers where
    refuse_rounding_cache looks, and Fp8QuantizedLayer (where present) is refused."""
    from transformers import cache_utils

    from qk_attn.capture.caches import VETTED_UPDATES, rounding_layer

    missing = [
        name for name in VETTED_UPDATES if not callable(getattr(getattr(cache_utils, name, None), "update", None))
    ]
    if missing:
        return f"no cache_utils.{missing[0]}.update"
    if not {"layers", "layer_class_to_replicate"} <= (found := init_sets(cache_utils.Cache)):  # what caches reads
        return f"Cache.__init__ sets {sorted(found)}, not layers and layer_class_to_replicate"
    fp8 = getattr(cache_utils, "Fp8QuantizedLayer", None)  # transformers 5.25
    if fp8 is not None and not rounding_layer(fp8):
        return "cache_utils.Fp8QuantizedLayer is not refused as rounding the keys"
    return next(filter(None, map(_returns_keys_as_given, VETTED_UPDATES)), None)


def _returns_keys_as_given(name: str) -> str | None:
    """The vetted layer `name`, updated with 3 float32 tokens and then 1, returns each update's new keys bit
    for bit, in their dtype, at the slots of their positions: trusted by name (caches.VETTED_UPDATES), so a
    release that changes what its update returns (a rounding storage dtype) must be seen here. On the CPU,
    whatever the default device."""
    import torch
    from transformers import cache_utils

    class Bfloat16Stored(cache_utils.QuantizedLayer):  # a lossy storage: only the new keys may come back exact
        def _quantize(self, tensor, axis):
            return tensor.to(torch.bfloat16)

        def _dequantize(self, tensor):
            return tensor.to(torch.float32)

    builders = {
        "DynamicLayer": lambda: cache_utils.DynamicLayer(),
        "DynamicSlidingWindowLayer": lambda: cache_utils.DynamicSlidingWindowLayer(sliding_window=8),
        "StaticLayer": lambda: cache_utils.StaticLayer(max_cache_len=8),
        "StaticSlidingWindowLayer": lambda: cache_utils.StaticSlidingWindowLayer(max_cache_len=8, sliding_window=8),
        "QuantizedLayer": lambda: Bfloat16Stored(residual_length=64),
    }
    with torch.device("cpu"):
        keys = torch.randn(1, 2, 4, 8, generator=torch.Generator(device="cpu").manual_seed(0))
        try:
            layer = builders[name]()
            first, _ = layer.update(keys[:, :, :3], keys[:, :, :3].clone())
            first = first[:, :, :3].clone()  # a static layer returns its buffer, which the next update writes
            second, _ = layer.update(keys[:, :, 3:], keys[:, :, 3:].clone())
        except Exception as error:  # noqa: BLE001 - a layer built or updated otherwise than read: the finding
            return f"cache_utils.{name} could not be updated as read: {type(error).__name__}: {error}"
    if first.dtype != keys.dtype or second.dtype != keys.dtype or second.shape[2] < 4:
        return f"cache_utils.{name}.update returns keys of another dtype or length than it was given"
    if not (torch.equal(first, keys[:, :, :3]) and torch.equal(second[:, :, 3], keys[:, :, 3])):
        return f"cache_utils.{name}.update does not return the keys it was given as given"
    return None


def layer_type_names() -> str | None:
    from transformers import Gemma3TextConfig, Llama4TextConfig

    for config, word in (
        (Gemma3TextConfig(num_hidden_layers=2), "sliding"),
        (Llama4TextConfig(num_hidden_layers=4), "chunked"),
    ):
        if not any(word in kind for kind in config.layer_types or ()):
            return f"{type(config).__name__}.layer_types {config.layer_types} name no '{word}' layer"
    return None


def generation_frames() -> str | None:
    """The generation methods generation_frames looks for, by code name and file (GENERATION_FILE), with the locals it reads."""
    from transformers.generation import utils

    from qk_attn.capture.generation_frames import GENERATION_FILE

    for method in ("generate", "_sample", "_beam_search", "_assisted_decoding", "_prefill"):
        fn = getattr(utils.GenerationMixin, method, None)
        if fn is None:
            return f"no GenerationMixin.{method}"
        code = getattr(inspect.unwrap(fn), "__code__", None)
        if method != "generate" and (code is None or code.co_name != method):  # frames match code names
            return f"GenerationMixin.{method} runs code named {getattr(code, 'co_name', None)!r}"
        if code is None or not code.co_filename.endswith(GENERATION_FILE):  # ... in this file
            return f"GenerationMixin.{method} is defined in {getattr(code, 'co_filename', None)}, not {GENERATION_FILE}"
    code = utils.GenerationMixin._sample.__code__
    if not {"model_kwargs", "unfinished_sequences", "has_eos_stopping_criteria"} <= set(code.co_varnames):
        return f"GenerationMixin._sample locals {code.co_varnames}"
    if hasattr(utils, "DeferredStopCheck") and "stop_check" not in code.co_varnames:  # (frames: refused when deferred)
        return "GenerationMixin._sample has no local stop_check, where a deferred stop check is found"
    if "_prefill" not in code.co_names:  # its first forwards feed the caller's tokens (frames)
        return "GenerationMixin._sample does not call self._prefill"
    tree = parse(textwrap.dedent(inspect.getsource(utils.GenerationMixin._sample)))
    if not any(isinstance(n, ast.Subscript) and ast.unparse(n) == "model_kwargs['use_cache']" for n in ast.walk(tree)):
        return "GenerationMixin._sample does not read model_kwargs['use_cache']"  # frames: use_cache=False refusal
    return _pads_only_under_eos_criteria(tree)


def generation_dispatch() -> str | None:
    """generate() calls `decoding_method`, taken by name from GENERATION_MODES_MAPPING: each mode's
    method is one generation_frames knows (DECODING_METHODS) or a Hub repo (a deprecated mode, run as custom_generate);
    frames reads that local (with `custom_generate`) to refuse a decoding method under another name."""
    from transformers.generation import utils

    from qk_attn.capture.generation_frames import DECODING_METHODS

    mapping = getattr(utils, "GENERATION_MODES_MAPPING", None)
    if not isinstance(mapping, dict):
        return "generation/utils.py has no GENERATION_MODES_MAPPING dict"
    for mode, method in mapping.items():
        if "/" not in method and method not in DECODING_METHODS:
            return f"generate() dispatches {getattr(mode, 'name', mode)} to {method}, not one of {sorted(DECODING_METHODS)}"
    generate = inspect.unwrap(utils.GenerationMixin.generate)  # qk-attn's own wrapper (hooks.watch_generate)
    if not {"decoding_method", "custom_generate"} <= set(generate.__code__.co_varnames):
        return "GenerationMixin.generate has no locals decoding_method and custom_generate"
    tree = parse(textwrap.dedent(inspect.getsource(generate)))
    picks = [
        ast.unparse(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["decoding_method"]
    ]
    if not any("GENERATION_MODES_MAPPING[" in pick for pick in picks):
        return f"GenerationMixin.generate picks decoding_method as {picks}, not from GENERATION_MODES_MAPPING"
    if not any(isinstance(n, ast.Call) and ast.unparse(n.func) == "decoding_method" for n in ast.walk(tree)):
        return "GenerationMixin.generate does not call decoding_method"
    return None


def _pads_only_under_eos_criteria(tree: ast.AST) -> str | None:
    """`_sample` mixes pad tokens into finished rows (`next_tokens = ... unfinished_sequences ...`) only
    under `if has_eos_stopping_criteria:`; frames reads that local to tell padding from real tokens."""
    padding = [
        (node, parent)
        for parent in ast.walk(tree)
        for node in ast.iter_child_nodes(parent)
        if isinstance(node, ast.Assign)
        and [ast.unparse(t) for t in node.targets] == ["next_tokens"]
        and "unfinished_sequences" in ast.unparse(node.value)
    ]
    if not padding:
        return "GenerationMixin._sample pads no finished rows (no `next_tokens = ... unfinished_sequences ...`)"
    for node, parent in padding:
        if not (isinstance(parent, ast.If) and ast.unparse(parent.test) == "has_eos_stopping_criteria"):
            under = ast.unparse(parent.test) if isinstance(parent, ast.If) else type(parent).__name__
            return f"GenerationMixin._sample pads finished rows under `{under}`: `{ast.unparse(node)}`"
    return None


def encoded_image_inputs() -> str | None:
    """generate() that encodes images before its first forward (transformers >= 5.18:
    `_prepare_multimodal_encoder_kwargs_for_generation`) hands the model their features as
    `mm_encoder_outputs`, the forward local frames.model_forward reads to tell a forward with images
    (refused with mrope); before 5.18 images reach the forward as `pixel_values`."""
    from transformers.generation import utils

    encode = getattr(utils.GenerationMixin, "_prepare_multimodal_encoder_kwargs_for_generation", None)
    if encode is None:
        return None
    if "'mm_encoder_outputs'" not in ast.unparse(parse(textwrap.dedent(inspect.getsource(encode)))):
        return "GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation does not fill mm_encoder_outputs"
    return None
