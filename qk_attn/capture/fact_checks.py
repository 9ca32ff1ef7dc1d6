"""The check behind each fact of qk_attn.capture.facts: one function per fact, None when it holds, else what was found.

Registries and call signatures (attention_interface_register ... eager_forward) are read with
inspect and ast; frames and attributes (rotary_helpers ... attention_module_attributes) from the
seed modeling modules; caches and the generation loop in qk_attn.capture.fact_checks_generation.
A check may raise: `check_all()` reports that as the fact broken.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import textwrap

from qk_attn.capture.parsing import class_source, parse
from qk_attn.capture.rotary_positions import hands_position_ids, rotary_calls

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

    # hooks registered it at `import qk_attn` (read from there, not imported: hooks requires the facts)
    qk_sniff_mask = getattr(sys.modules.get("qk_attn.capture.hooks"), "qk_sniff_mask", None)
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


MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


def mask_call_keywords() -> str | None:
    """transformers' causal mask builders (full, sliding and chunked: all-sliding models build only the
    second) call `mask_interface(...)` with these keywords and `config=`."""
    from transformers import masking_utils

    for builder in MASK_BUILDERS:
        tree = parse(inspect.getsource(getattr(masking_utils, builder)))
        calls = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "mask_interface"
        ]
        if not calls:
            return f"{builder} calls no mask_interface(...)"
        for call in calls:
            keywords = {k.arg for k in call.keywords}
            local = ("local_size",) if builder != "create_causal_mask" else ()  # a window's size: ForwardContext
            if any(k not in keywords for k in (*MASK_KEYWORDS, "config", *local)):
                return f"{builder} calls mask_interface with {sorted(k for k in keywords if k)}"
    return None


# What an attention function's first five parameters hold, by a part of their names: qk-attn passes them by
# position, so a rename that keeps each in its place (`query` -> `query_states`) changes nothing; a reorder does.
ATTENTION_PARAMETERS = ("module", "query", "key", "value", "mask")


def _attention_call(fn) -> str | None:
    params = list(inspect.signature(fn).parameters.values())[:5]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) == 5 and all(
        p.kind in positional and part in p.name for p, part in zip(params, ATTENTION_PARAMETERS)
    ):
        return None
    return f"{fn.__module__}.{fn.__qualname__}{tuple(_parameters(fn))}"


def sdpa_forward() -> str | None:
    """transformers' own sdpa attention, not what is registered under "sdpa" now: a user's own function
    registered there is what a model loaded with "sdpa" runs, and "qk_sniff" calls it the same way."""
    from transformers.integrations import sdpa_attention

    fn = getattr(sdpa_attention, "sdpa_attention_forward", None)
    return "no integrations.sdpa_attention.sdpa_attention_forward" if fn is None else _attention_call(fn)


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


def attention_call_layout() -> str | None:
    """Each seed attention forward hands attention heads-first states: query_states and key_states are
    assigned `...view(<tokens>..., self.head_dim)....transpose(1, 2)` (the view's shape directly, or as
    `hidden_shape = (*input_shape, -1, self.head_dim)`), i.e. (batch, heads, tokens, head_dim). Rows are
    read by that layout; shapes alone cannot tell it from (batch, tokens, heads, head_dim) when a forward
    has as many tokens as heads."""
    for family, name in ROTATING_CLASSES.items():
        values: dict[str, list[str]] = {}
        for node in ast.walk(_forward_tree(getattr(_modeling(family), name))):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                values.setdefault(node.targets[0].id, []).append(ast.unparse(node.value))
        shapes = {"hidden_shape": values.get("hidden_shape", ["?"])[0]}
        for states in ("query_states", "key_states"):
            found = values.get(states, [])
            if not any(_heads_first(text, shapes) for text in found):
                return f"{name}.forward assigns {states} = {' / '.join(found) or 'nothing'}"
    return None


def _heads_first(text: str, shapes: dict[str, str]) -> bool:
    """`text` views its projection as (..., tokens, heads, head_dim) and transposes tokens and heads."""
    view = re.search(r"\.view\(([^()]*)\)", text)
    if view is None or not text.endswith(".transpose(1, 2)"):
        return False
    shape = shapes.get(view.group(1), view.group(1))
    return shape.removeprefix("(").removesuffix(")").replace(" ", "").endswith(",self.head_dim")


def _forward_tree(cls) -> ast.AST:
    return parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward))))


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
        if not _rotates_by_position_ids(forward):  # frames key rows by that local
            return f"{name}.forward does not call self.rotary_emb(..., position_ids)"
    return None


def _rotates_by_position_ids(forward) -> bool:
    """`forward` hands its own `position_ids` local, as it is, to `self.rotary_emb`: the positions RoPE
    uses are the ones frames.model_forward reads."""
    return any(hands_position_ids(call) for call in rotary_calls(inspect.getsource(forward)))


def init_sets(cls) -> set[str]:
    """Attributes `cls.__init__` assigns on self, read from its source (`kernels` may wrap __init__)."""
    tree = parse(class_source(cls))
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
        if not {"layer_idx", "config"} <= init_sets(getattr(_modeling(family), name)):
            return f"{name}.__init__ sets no self.layer_idx/self.config"
    if "use_rope" not in init_sets(_modeling("smollm3").SmolLM3Attention):
        return "SmolLM3Attention.__init__ sets no self.use_rope"
    if "sliding_window" not in init_sets(_modeling("gemma3").Gemma3Attention):
        return "Gemma3Attention.__init__ sets no self.sliding_window"
    if "CrossAttention" not in getattr(_modeling("mllama"), "MllamaTextCrossAttention", type).__name__:
        return "modeling_mllama has no MllamaTextCrossAttention"
    return None


def backend_support_flags() -> str | None:
    """PreTrainedModel declares which backends a model class supports with class flags that default to
    False, and transformers refuses a backend whose flag is False (the check `_sdpa_can_dispatch` makes)."""
    from transformers import LlamaModel, PreTrainedModel

    for flag in ("_supports_sdpa", "_supports_flash_attn"):
        if getattr(PreTrainedModel, flag, None) is not False or getattr(LlamaModel, flag, None) is not True:
            return f"PreTrainedModel.{flag} = {getattr(PreTrainedModel, flag, 'absent')!r}, LlamaModel's " + repr(
                getattr(LlamaModel, flag, "absent")
            )
    if "_supports_sdpa" not in inspect.getsource(PreTrainedModel._sdpa_can_dispatch):
        return "PreTrainedModel._sdpa_can_dispatch does not read _supports_sdpa"
    return None


def text_config_lookup() -> str | None:
    """A composite model's config gives its language model's config with get_text_config(decoder=True)
    (its `text_config`), a language model's gives itself, and its towers' configs are attributes of it
    (frames.tower_of tells a tower's mask from the language model's by these)."""
    from transformers import Gemma3Config, LlamaConfig

    composite, plain = Gemma3Config(), LlamaConfig()
    try:
        text, itself = composite.get_text_config(decoder=True), plain.get_text_config(decoder=True)
    except Exception as error:  # noqa: BLE001 - a changed signature is what this fact reports
        return f"get_text_config(decoder=True) raised {type(error).__name__}: {error}"
    if text is not composite.text_config or itself is not plain:
        return f"Gemma3Config().get_text_config(decoder=True) is {type(text).__name__}, LlamaConfig()'s {type(itself).__name__}"
    if vars(composite).get("vision_config") is not composite.vision_config:
        return "Gemma3Config keeps its vision_config elsewhere than in its instance attributes"
    return None
