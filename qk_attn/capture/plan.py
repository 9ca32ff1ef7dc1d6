"""Which (layer, head) pairs a capture records, and why the others are not recorded.

Built once per model shape from the configuration; the attention call only looks up
`plan.heads(layer, kind)`. The same plan feeds the dataset card's coverage section.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field

from qk_attn.config import SniffConfig
from qk_attn.errors import CaptureError, ConfigError


def dtype_name(dtype) -> str:
    """`torch.bfloat16` -> "bfloat16", as manifests and messages name a dtype."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...] | None = None
    dtype: str | None = None  # what attention ran in (the query's), whatever the config says
    attention_layers: frozenset[int] | None = None  # the layers with an attention module (None: not known)

    @classmethod
    def from_module(cls, module, query, key, model=None) -> ModelShape:
        """Read the shape from an attention module, the tensors it was called with, and the `model` that
        holds it (the module that built the mask: which of its layers have attention)."""
        config = module.config
        heads, groups = _config_int(config, "num_attention_heads"), getattr(module, "num_key_value_groups", 1)
        latent = getattr(module, "kv_lora_rank", None) is not None
        # Heads are axis 1 of (B, H, T, D). A module that groups query heads over key heads (GQA) and
        # hands attention as many key heads as query heads repeated them before the call.
        if heads is not None and query.shape[1] != heads == query.shape[2]:  # (B, T, H, D)
            found = f"a query of shape {tuple(query.shape)}, whose heads (num_attention_heads={heads}) are axis 2"
        # (Multi-head latent attention expands its keys per query head from a latent: kv_lora_rank.)
        elif isinstance(groups, int) and groups > 1 and key.shape[1] == query.shape[1] and not latent:
            found = f"keys of {key.shape[1]} heads, repeated for its num_key_value_groups={groups}"
        else:
            found = None
        if found:
            raise CaptureError(
                f"qk_sniff: {type(module).__name__} called attention with {found}: not laid out (batch, heads, "
                "tokens, head_dim) with the model's own heads, as qk-attn reads it; not recorded"
            )
        layer_types = getattr(config, "layer_types", None)
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=query.shape[1],
            num_kv_heads=key.shape[1],
            head_dim=query.shape[-1],
            layer_types=tuple(layer_types) if layer_types else None,
            dtype=dtype_name(query.dtype),
            attention_layers=attention_layers(model, module) if model is not None else None,
        )

    def has_attention(self, layer: int) -> bool:
        return self.attention_layers is None or layer in self.attention_layers

    def local_attention(self, layer: int) -> str | None:
        """What a layer attends over when not the whole sequence, from the config's layer_types: "sliding-window"
        or "chunked-attention" (Llama 4), else None."""
        kind = self.layer_types[layer] if self.layer_types and layer < len(self.layer_types) else ""
        return "sliding-window" if "sliding" in kind else "chunked-attention" if "chunked" in kind else None


def attention_layers(model, module) -> frozenset[int]:
    """The layers of `model` that hold an attention module of `module`'s config: of `module`'s class, or one
    whose forward calls transformers' attention interface. A hybrid model's conv, Mamba or linear-attention
    layers have none: a plan that counted them would record nothing of a layer filter or a head sample
    drawn there, silently. (A layer taken for one without attention that calls it is refused: binder.)"""
    config, found = module.config, set()
    for candidate in model.modules():
        layer = getattr(candidate, "layer_idx", None)
        if getattr(candidate, "config", None) is not config or not isinstance(layer, int):
            continue
        forward = getattr(inspect.unwrap(type(candidate).forward), "__code__", None)  # (through decorators)
        if type(candidate) is type(module) or (forward is not None and "ALL_ATTENTION_FUNCTIONS" in forward.co_names):
            found.add(layer)
    return frozenset(found)


def _config_int(config, name: str) -> int | None:
    """An int setting of `config`, None where it has none or one per layer (reading the global value of
    a heterogeneous config raises in transformers >= 5.25)."""
    try:
        value = getattr(config, name, None)
    except Exception:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_in_range(config: SniffConfig, shape: ModelShape) -> None:
    """Requested layers and heads must exist: a filter that matches nothing would record nothing."""
    for name, values, limit, what in (
        ("layers", config.layers, shape.num_layers, "layers"),
        ("heads", config.heads, shape.num_heads, "query heads"),
        ("key_heads", config.key_heads, shape.num_kv_heads, "key/value heads"),
    ):
        missing = [v for v in values or () if v >= limit]
        if missing:
            raise ConfigError(
                f"{config.setting_name(name)}={','.join(map(str, values))}: {missing} out of range; the model has "
                f"{limit} {what} (0-{limit - 1})"
            )


@dataclass
class HeadPlan:
    """Per layer: the query heads and the key (KV) heads to record; reasons for the rest."""

    shape: ModelShape
    query_heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    key_heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    excluded_layers: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, config: SniffConfig, shape: ModelShape, model: str = "this model", key=None) -> HeadPlan:
        """The (layer, head, kind) to record; ConfigError when none is left. `key(setting)` names a
        setting as the user wrote it (default: the keyword, or its QK_SNIFF_ variable)."""
        check_in_range(config, shape)
        plan = cls(shape)
        group = max(1, shape.num_heads // shape.num_kv_heads)
        for layer in range(shape.num_layers):
            if config.layers is not None and layer not in config.layers:
                plan.excluded_layers[layer] = "not in layers filter"
            elif not shape.has_attention(layer):
                kind = shape.layer_types[layer] if shape.layer_types and layer < len(shape.layer_types) else None
                plan.excluded_layers[layer] = f"no attention ({kind} layer)" if kind else "no attention module"
            elif config.full_attention_only and shape.local_attention(layer):
                plan.excluded_layers[layer] = f"{shape.local_attention(layer)} layer (full_attention_only)"
        # None is every head; an empty tuple never reaches here (SniffConfig refuses it), and must
        # never mean "all".
        query_heads = range(shape.num_heads) if config.heads is None else config.heads
        active = [layer for layer in range(shape.num_layers) if layer not in plan.excluded_layers]
        pairs = [(layer, h) for layer in active for h in query_heads]
        if config.head_sample_count is not None and config.head_sample_count < len(pairs):
            pairs = sorted(random.Random(config.head_sample_seed).sample(pairs, config.head_sample_count))
            plan.notes.append(
                f"head sampling: {len(pairs)} (layer, query head) pairs drawn with seed {config.head_sample_seed}"
            )
        for layer in active:
            chosen = tuple(h for (pair_layer, h) in pairs if pair_layer == layer)
            plan.query_heads[layer] = chosen if "q" in config.kinds else ()
            if config.key_heads is not None:
                keys = config.key_heads
            else:
                keys = tuple(sorted({h // group for h in chosen}))
            plan.key_heads[layer] = keys if "k" in config.kinds else ()
        if not any(plan.query_heads.values()) and not any(plan.key_heads.values()):
            # Examples would be committed with no rows and no valid tokens, as if they were empty.
            key = key or config.setting_name
            why = sorted(set(plan.excluded_layers.values())) or ["the head filters select no head"]
            raise ConfigError(
                f"nothing would be recorded: {model} has no layer and head left to record ({'; '.join(why)}); "
                f"check {key('layers')}, {key('heads')}, {key('key_heads')} and {key('full_attention_only')}"
            )
        return plan

    def heads(self, layer: int, kind: str) -> tuple[int, ...]:
        table = self.query_heads if kind == "q" else self.key_heads
        return table.get(layer, ())

    def expected(self) -> dict[int, dict[str, tuple[int, ...]]]:
        return {layer: {"q": self.query_heads[layer], "k": self.key_heads[layer]} for layer in self.query_heads}

    def to_dict(self) -> dict:
        return {
            "num_layers": self.shape.num_layers,
            "num_heads": self.shape.num_heads,
            "num_kv_heads": self.shape.num_kv_heads,
            "head_dim": self.shape.head_dim,
            "query_heads": {str(k): list(v) for k, v in self.query_heads.items()},
            "key_heads": {str(k): list(v) for k, v in self.key_heads.items()},
            "excluded_layers": {str(k): v for k, v in self.excluded_layers.items()},
            "notes": list(self.notes),
        }
