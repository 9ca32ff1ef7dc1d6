"""The check behind each fact of qk_attn.capture.facts: one function per fact, None when it holds, else what was found.

Registries and call signatures (attention_interface_register ... eager_forward) are read with
inspect and ast; frames and attributes (rotary_helpers ... attention_module_attributes) from the
seed modeling modules. A check may raise: `check_all()` reports that as the fact broken.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap

NAME = "qk_sniff"


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _accepts(fn, names) -> str | None:
    """None when `fn` accepts every keyword in `names`, else the signature it has."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        missing = [n for n in names if n in params and params[n].kind is params[n].POSITIONAL_ONLY]
    else:
        missing = [n for n in names if n not in params]
    return f"{fn.__qualname__}{inspect.signature(fn)}" if missing else None


def attention_interface_register() -> str | None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from qk_attn.capture.attention import qk_sniff_attention

    if not callable(getattr(AttentionInterface, "register", None)):
        return "no AttentionInterface.register"
    found = ALL_ATTENTION_FUNCTIONS.get_interface(NAME, None)
    return None if found is qk_sniff_attention else f"ALL_ATTENTION_FUNCTIONS.get_interface({NAME!r}) -> {found!r}"


def mask_interface_register() -> str | None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from qk_attn.capture.hooks import qk_sniff_mask

    if not callable(getattr(AttentionMaskInterface, "register", None)):
        return "no AttentionMaskInterface.register"
    found = ALL_MASK_ATTENTION_FUNCTIONS.get(NAME) if NAME in ALL_MASK_ATTENTION_FUNCTIONS else None
    return None if found is qk_sniff_mask else f"ALL_MASK_ATTENTION_FUNCTIONS[{NAME!r}] -> {found!r}"


MASK_KEYWORDS = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "attention_mask")


def mask_functions() -> str | None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    for name in ("sdpa", "eager", "flash_attention_2"):
        fn = ALL_MASK_ATTENTION_FUNCTIONS[name] if name in ALL_MASK_ATTENTION_FUNCTIONS else None
        if fn is None:
            return f"no ALL_MASK_ATTENTION_FUNCTIONS[{name!r}]"
        if (signature := _accepts(fn, MASK_KEYWORDS)) is not None:
            return signature
    return None


def mask_call_keywords() -> str | None:
    """transformers' mask builders call `mask_interface(...)` with these keywords and `config=`."""
    from transformers import masking_utils

    tree = ast.parse(inspect.getsource(masking_utils.create_causal_mask))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "mask_interface"
    ]
    if not calls:
        return "create_causal_mask calls no mask_interface(...)"
    keywords = {k.arg for k in calls[0].keywords}
    missing = [k for k in (*MASK_KEYWORDS, "config") if k not in keywords]
    return f"mask_interface called with {sorted(keywords)}" if missing else None


ATTENTION_PARAMETERS = ["module", "query", "key", "value", "attention_mask"]


def _attention_call(fn) -> str | None:
    names = _parameters(fn)
    return None if names[:5] == ATTENTION_PARAMETERS else f"{fn.__module__}.{fn.__qualname__}{tuple(names)}"


def sdpa_forward() -> str | None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)
    return "no ALL_ATTENTION_FUNCTIONS['sdpa']" if fn is None else _attention_call(fn)


def flash_forward() -> str | None:
    from transformers.integrations import flash_attention

    fn = getattr(flash_attention, "flash_attention_forward", None)
    return "no flash_attention_forward" if fn is None else _attention_call(fn)


SEED_MODELING = ("llama", "qwen2", "qwen3", "gemma3", "glm", "glm4", "ministral", "ministral3", "mllama", "smollm3")


def _modeling(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def _loaded_modeling():
    """Seed modeling modules plus every other modeling module already imported (the model that runs)."""
    names = {f"transformers.models.{f}.modeling_{f}" for f in SEED_MODELING}
    names |= {n for n in sys.modules if n.startswith("transformers.models.") and ".modeling_" in n}
    return [importlib.import_module(n) for n in sorted(names)]


def eager_forward() -> str | None:
    """Each decoder modeling module defines `eager_attention_forward(module, query, key, value, attention_mask, ...)`."""
    for module in _loaded_modeling():
        if not hasattr(module, "ALL_ATTENTION_FUNCTIONS") or not hasattr(module, "apply_rotary_pos_emb"):
            continue  # not a rotary decoder that dispatches through the registry
        fn = getattr(module, "eager_attention_forward", None)
        if fn is None:
            return f"{module.__name__} has no eager_attention_forward"
        if (found := _attention_call(fn)) is not None:
            return found
    return None


def rotary_helpers() -> str | None:
    """`apply_rotary_pos_emb(q, k, cos, sin)` returns (q, k) rotated, in each seed modeling module
    (transformers >= 5.25 with `kernels` makes it a callable nn.Module); Ministral 3 has
    `get_llama_4_attn_scale(positions, beta, original_max_position_embeddings)`."""
    import torch

    x = torch.arange(1.0, 5.0).reshape(1, 1, 1, 4)
    cos, sin = torch.ones(1, 1, 4), torch.zeros(1, 1, 4)  # the identity rotation
    for family in SEED_MODELING:
        fn = getattr(_modeling(family), "apply_rotary_pos_emb", None)
        if fn is None:
            return f"modeling_{family} has no apply_rotary_pos_emb"
        out = fn(x, x, cos, sin)
        if not (isinstance(out, tuple) and len(out) == 2 and all(torch.equal(o, x) for o in out)):
            return f"modeling_{family}.apply_rotary_pos_emb(q, k, cos=1, sin=0) returned {out!r}"
    scale = getattr(_modeling("ministral3"), "get_llama_4_attn_scale", None)
    if scale is None or len(_parameters(scale)) != 3:
        return f"modeling_ministral3.get_llama_4_attn_scale: {scale!r}"
    return None


ATTENTION_CLASSES = {
    "llama": "LlamaAttention",
    "qwen3": "Qwen3Attention",
    "gemma3": "Gemma3Attention",
    "glm": "GlmAttention",
    "ministral3": "Ministral3Attention",
    "smollm3": "SmolLM3Attention",
}


def attention_forward_locals() -> str | None:
    """Attention modules' forward(self, hidden_states, position_embeddings, ...) holds the cos/sin it applied."""
    for family, name in ATTENTION_CLASSES.items():
        params = _parameters(inspect.unwrap(getattr(_modeling(family), name).forward))
        if params[0] != "self" or "position_embeddings" not in params:
            return f"{name}.forward{tuple(params)}"
    return None


ROTATING_CLASSES = {
    **ATTENTION_CLASSES,
    "qwen2": "Qwen2Attention",
    "glm4": "Glm4Attention",
    "ministral": "MinistralAttention",
    "mllama": "MllamaTextSelfAttention",
}


def attention_forward_rotation() -> str | None:
    """Each seed attention forward rotates as rope="pre" can undo (rope_check.rotation, read from its
    syntax tree): one `q, k = apply_rotary_pos_emb(q, k, cos, sin)` with `cos, sin = position_embeddings`,
    q and k then changed only by the cache update; SmolLM3's under a test of the module (`self.use_rope`),
    Ministral 3's query scaled after it by get_llama_4_attn_scale."""
    from qk_attn.capture.rope_check import rotation

    for family, name in ROTATING_CLASSES.items():
        verdict = rotation(getattr(_modeling(family), name))
        if verdict.refusal is not None:
            return f"{name}.forward {verdict.refusal}"
    if rotation(_modeling("smollm3").SmolLM3Attention).condition is None:
        return "SmolLM3Attention.forward rotates under no test of the module (its NoPE layers)"
    if rotation(_modeling("ministral3").Ministral3Attention).query_scale is None:
        return "Ministral3Attention.forward scales no query by get_llama_4_attn_scale after RoPE"
    return None


BASE_MODELS = {
    "llama": "LlamaModel",
    "qwen3": "Qwen3Model",
    "gemma3": "Gemma3TextModel",
    "mllama": "MllamaTextModel",
    "smollm3": "SmolLM3Model",
}


def model_forward_locals() -> str | None:
    """Base models' forward(self, input_ids, ..., position_ids, cache or past_key_values) builds the masks itself."""
    for family, name in BASE_MODELS.items():
        forward = inspect.unwrap(getattr(_modeling(family), name).forward)
        params = _parameters(forward)
        if (
            params[0] != "self"
            or not {"input_ids", "position_ids"} <= set(params)
            or not ({"cache", "past_key_values"} & set(params))
        ):
            return f"{name}.forward{tuple(params)}"
        if "create_causal_mask" not in forward.__code__.co_names:
            return f"{name}.forward does not call create_causal_mask itself"
    return None


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
    """The Cache methods that move batch rows are defined on Cache and inherited, not overridden, by
    the caches a decoder uses, so that wrapping them on Cache sees every call (capture/caches)."""
    from transformers import cache_utils

    from qk_attn.capture.caches import ROW_METHODS

    for name in ROW_METHODS:
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
    if not {"layers", "layer_class_to_replicate"} <= (found := _init_sets(cache_utils.Cache)):  # what caches reads
        return f"Cache.__init__ sets {sorted(found)}, not layers and layer_class_to_replicate"
    fp8 = getattr(cache_utils, "Fp8QuantizedLayer", None)  # transformers 5.25
    if fp8 is not None and not rounding_layer(fp8):
        return "cache_utils.Fp8QuantizedLayer is not refused as rounding the keys"
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
    from transformers.generation import utils

    for method in ("generate", "_sample", "_beam_search", "_assisted_decoding", "_prefill"):
        fn = getattr(utils.GenerationMixin, method, None)
        if fn is None:
            return f"no GenerationMixin.{method}"
    code = utils.GenerationMixin._sample.__code__
    if not {"model_kwargs", "unfinished_sequences", "has_eos_stopping_criteria"} <= set(code.co_varnames):
        return f"GenerationMixin._sample locals {code.co_varnames}"
    if "_prefill" not in code.co_names:  # its first forwards feed the caller's tokens (frames)
        return "GenerationMixin._sample does not call self._prefill"
    tree = ast.parse(textwrap.dedent(inspect.getsource(utils.GenerationMixin._sample)))
    if not any(isinstance(n, ast.Subscript) and ast.unparse(n) == "model_kwargs['use_cache']" for n in ast.walk(tree)):
        return "GenerationMixin._sample does not read model_kwargs['use_cache']"  # frames: use_cache=False refusal
    return _pads_only_under_eos_criteria(tree)


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


def _init_sets(cls) -> set[str]:
    """Attributes `cls.__init__` assigns on self, read from its source (`kernels` may wrap __init__)."""
    tree = ast.parse(inspect.getsource(cls))
    init = next(n for n in tree.body[0].body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {
        t.attr
        for n in ast.walk(init)
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }


def attention_module_attributes() -> str | None:
    """Text attention modules set self.layer_idx and self.config; SmolLM3 sets self.use_rope;
    sliding-window families set self.sliding_window; Mllama's cross-attention class says so in its name."""
    for family, name in ATTENTION_CLASSES.items():
        if not {"layer_idx", "config"} <= _init_sets(getattr(_modeling(family), name)):
            return f"{name}.__init__ sets no self.layer_idx/self.config"
    if "use_rope" not in _init_sets(_modeling("smollm3").SmolLM3Attention):
        return "SmolLM3Attention.__init__ sets no self.use_rope"
    if "sliding_window" not in _init_sets(_modeling("gemma3").Gemma3Attention):
        return "Gemma3Attention.__init__ sets no self.sliding_window"
    if "CrossAttention" not in getattr(_modeling("mllama"), "MllamaTextCrossAttention", type).__name__:
        return "modeling_mllama has no MllamaTextCrossAttention"
    return None
