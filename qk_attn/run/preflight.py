"""Checks `qk-sniff run` makes before any weights load: each failure is one `ConfigError` line.

    model      layers, query heads and key heads asked for exist in the model's config
               (AutoConfig); the plan records something; a decoder, on a device this machine
               has, built with its config_overrides
    output     the output folder can take the capture: qk_attn.run.output_checks
    hub        a Hub model or dataset id: the Hub answers one short probe (no retry storm):
               qk_attn.run.input_checks
    dataset    local files non-empty UTF-8, Parquet files with rows; ids unique
               (qk_attn.run.input_checks); the dataset has rows; documents fit the model's
               positions (map-style datasets)
    size       the expected rows and bytes (qk_attn.run.estimate) fit under `capture.max_gb`

This module holds the model's checks, the positions check and the size limit. Every message
names the YAML key, the value and what is allowed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qk_attn.capture.plan import HeadPlan, ModelShape
from qk_attn.config import SniffConfig
from qk_attn.errors import ConfigError, one_line

DEFAULT_FREE_FRACTION = 0.5  # capture.max_gb default: this fraction of the free space at the output


# ---- the model ------------------------------------------------------------------------------
def model_shape(model_config) -> ModelShape:
    """The attention shape from a transformers config (its text config for multimodal models)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layer_types = getattr(text, "layer_types", None)
    return ModelShape(
        int(text.num_hidden_layers), heads, kv_heads, int(head_dim), tuple(layer_types) if layer_types else None
    )


def check_decoder(model_config, where: str, kind: str) -> None:
    """Only decoders are captured: an encoder-decoder (T5) or an encoder (BERT: a masked-LM model
    type not configured as a decoder) is refused from its config, before any weight loads."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError(f"{where} is an encoder-decoder model ({kind}); qk-sniff records decoder-only models")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(model_config, "is_decoder", False):
        raise ConfigError(
            f"{where} is an encoder model ({kind}, bidirectional attention); qk-sniff records decoder-only models"
        )


def check_backend(model_config, backend: str, kind: str) -> None:
    """A model class transformers does not run with `backend` (`_supports_sdpa` False: GPT-OSS) is
    refused from its config, before any weight loads (the capture refuses it at its first forward too:
    qk_attn.capture.backends.check_backend_support)."""
    import transformers

    from qk_attn.capture.backends import SUPPORT_FLAGS
    from qk_attn.capture.facts import require as require_facts

    require_facts()  # the facts hold, the mapping read here among them: else one error naming what changed
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind, ""), None)  # remote code: not known here
    flag = SUPPORT_FLAGS.get(backend)
    if cls is not None and flag is not None and not getattr(cls, flag, True):
        raise ConfigError(
            f"inference.backend={backend!r}: {cls.__name__} does not support {backend} in transformers ({flag} is "
            "False), so it would compute another attention than the model's; set inference.backend: eager"
        )


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map) -> None:
    """`model.device_map`: one of accelerate's strategies, a device, or a mapping of module names to devices
    that this machine has (transformers would fail only after the dataset loaded, with a traceback)."""
    if device_map is None or device_map in DEVICE_MAP_NAMES:
        return
    expected = f"{' | '.join(DEVICE_MAP_NAMES)}, a device (cpu, cuda:N, an index), or {{module name: device}}"
    if isinstance(device_map, dict):
        devices = list(device_map.values())
    elif isinstance(device_map, (str, int)) and not isinstance(device_map, bool):
        devices = [device_map]
    else:
        raise ConfigError(f"model.device_map={device_map!r} is invalid: expected {expected}")
    for device in devices:
        if device == "disk":  # offloaded weights (accelerate)
            continue
        name = f"cuda:{device}" if isinstance(device, int) and not isinstance(device, bool) else device
        try:
            check_device(name if isinstance(name, str) else repr(name))
        except ConfigError as error:
            why = str(error).split(" is invalid: ", 1)[-1].split("; expected", 1)[0]
            raise ConfigError(f"model.device_map={device_map!r} is invalid: {why}; expected {expected}") from None


def check_device(device: str | None) -> None:
    """`model.device` names a torch device this machine has (torch would fail only when the weights
    are moved: a RuntimeError for a bad name, an AssertionError for CUDA on a CPU-only torch)."""
    if device is None:
        return
    import torch

    expected = "cpu, cuda, cuda:N or mps, or omit it (cuda when available, else cpu)"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ConfigError(
            f"model.device={device!r} is invalid: not a torch device ({one_line(error)}); expected {expected}"
        ) from None
    if parsed.type == "cpu":
        return
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ConfigError(
            f"model.device={device!r} is invalid: this machine (torch {torch.__version__}) has no {parsed.type} "
            f"device; expected {expected}"
        )
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        n = count()
        raise ConfigError(
            f"model.device={device!r} is invalid: this machine has {n} {parsed.type} device(s) ({_span(n)}); "
            f"expected {expected}"
        )


def check_overrides_build(
    original, overridden, overrides: dict, trust_remote_code: bool, where: str, folder: str | None = None
) -> None:
    """The model can be built from its config with `model.config_overrides` merged in: built on
    the meta device (no memory, no weights), so an override the model's code cannot take
    (`head_dim: 0`) is refused before the weights load; and, for a local folder of safetensors
    files, its weights still fit (`vocab_size: 5` changes the embedding's shape). Where the config
    without overrides cannot be built that way or does not fit the files itself, nothing is said
    here: loading the weights will tell."""
    import torch
    from transformers import AutoModelForCausalLM

    def build(model_config):
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)

    label = f"model.config_overrides={overrides!r}"
    try:
        model = build(overridden)
    except Exception as error:  # noqa: BLE001 - whatever the model's code raises for these values
        try:
            build(original)
        except Exception:  # noqa: BLE001 - this model is not built on the meta device at all
            return
        raise ConfigError(
            f"{label}: {where} cannot be built with them ({type(error).__name__}: {one_line(error)})"
        ) from None
    files = sorted(Path(os.path.expanduser(folder)).glob("*.safetensors")) if folder else []
    if not files:
        return
    mismatched = _mismatched_shapes(model, files)
    if mismatched and not _mismatched_shapes(build(original), files):
        shown = "; ".join(mismatched[:2]) + (f"; and {len(mismatched) - 2} more" if len(mismatched) > 2 else "")
        raise ConfigError(f"{label}: the weights of {where} do not fit them: {shown}")


def _mismatched_shapes(model, files: list[Path]) -> list[str]:
    """Tensors of the safetensors `files` (read from their headers only) whose shape differs from
    the same-named parameter of `model`."""
    from safetensors import safe_open

    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if name in expected and shape != expected[name]:
                    found.append(f"{name} is {list(shape)} in {file.name}, {list(expected[name])} with them")
    return found


def _span(n: int) -> str:
    return "0" if n == 1 else f"0-{n - 1}"


def check_plan(
    sniff: SniffConfig, shape: ModelShape, key: Callable[[str], str], raw: dict[str, Any], model: str
) -> HeadPlan:
    """Every requested layer / head exists, and something is recorded; returns the head plan.

    `key(setting)` names a setting as the user wrote it (`capture.layers`); `raw` holds the
    values as written (`"0-99"`, not the expanded tuple).
    """
    limits = (
        ("layers", shape.num_layers, "layers"),
        ("heads", shape.num_heads, "query heads"),
        ("key_heads", shape.num_kv_heads, "key/value heads"),
    )
    for setting, limit, what in limits:
        chosen = getattr(sniff, setting) or ()
        missing = [i for i in chosen if i >= limit]
        if missing:
            shown = ", ".join(map(str, missing[:3])) + (", ..." if len(missing) > 3 else "")
            raise ConfigError(
                f"{key(setting)}={raw.get(setting)!r} is out of range: {model} has {limit} {what} "
                f"({_span(limit)}); {shown} do{'es' if len(missing) == 1 else ''} not exist"
            )
    plan = HeadPlan.build(sniff, shape, model, key)
    return plan


def check_positions(
    max_length: int, limit: int | None, longest: tuple[Any, int] | None, model: str, streaming: bool
) -> None:
    """Documents never run past the model's positions (`max_position_embeddings`): only a
    `tokenizer.max_length` above them lets one through, and then the run is refused. `longest`
    is (source id, tokens) of the longest document to capture (cut at max_length)."""
    if limit is None or max_length <= limit:
        return
    fix = (
        f"set tokenizer.max_length to {limit} or less (longer documents are truncated to it), or extend the "
        "model's positions (model.config_overrides: max_position_embeddings with a rope scaling)"
    )
    if streaming:
        raise ConfigError(
            f"tokenizer.max_length={max_length} is more than {model}'s max_position_embeddings ({limit:,}) "
            f"and a streaming dataset's lengths are not known before the run; {fix}"
        )
    if longest is not None and longest[1] > limit:
        raise ConfigError(
            f"tokenizer.max_length={max_length} is more than {model}'s max_position_embeddings ({limit:,}), "
            f"and document {longest[0]!r} has {longest[1]:,} tokens; {fix}"
        )


def model_positions(model_config) -> int | None:
    """The model's `max_position_embeddings` (of its text config), None where it declares none."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and 0 < value < 10**9 else None


# ---- the size of the run ---------------------------------------------------------------------
def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def size_limit(max_gb: float | None, folder: Path) -> tuple[float, str]:
    """The byte limit for a run and how it was set (for messages)."""
    if max_gb is not None:
        return max_gb * 1e9, f"capture.max_gb={max_gb:g}"
    free = free_bytes(folder)
    return free * DEFAULT_FREE_FRACTION, (
        f"half the {free / 1e9:,.1f} GB free at {folder} (the default of capture.max_gb)"
    )
