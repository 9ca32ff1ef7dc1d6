"""The model and tokenizer of a run: config, weights, backbone, max_length, and encoding a batch.

The model loads with attn_implementation="qk_sniff"; only its backbone (`model.base_model`)
runs, so no logits over 128k positions are materialised.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from qk_attn.errors import ConfigError, one_line
from qk_attn.run.config import RunConfig
from qk_attn.run.documents import Document

logger = logging.getLogger(__name__)


def _merge(current: Any, new: Any) -> Any:
    if isinstance(current, dict) and isinstance(new, dict):
        return {**current, **{k: _merge(current.get(k), v) for k, v in new.items()}}
    return new


def refuse_local_revision(section: str, name: str, revision: str | None) -> None:
    if revision is not None:
        raise ConfigError(
            f"{section}.revision={revision!r} cannot apply to the local folder {section}.name={name!r} (a revision "
            "chooses within a Hub repository); remove it"
        )


def _unreadable_header(folder: str | None) -> tuple[Path, BaseException] | None:
    """The first safetensors file of `folder` whose header does not read (a truncated or damaged
    copy: safetensors also checks that the file's size covers every tensor the header lists), and
    why. The headers only: no tensor is read."""
    from safetensors import SafetensorError, safe_open

    path = Path(os.path.expanduser(folder)) if folder else None
    for file in sorted(path.glob("*.safetensors")) if path is not None and path.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return file, error
    return None


def _weight_file_error(model_name: str, file: str, error: BaseException) -> ConfigError:
    return ConfigError(
        f"model.name={model_name!r}: {file} cannot be read ({type(error).__name__}: {one_line(error)}); "
        "it is damaged or incomplete: copy or download it again"
    )


def check_weight_headers(model_name: str, folder: str) -> None:
    """The safetensors files of a local model folder are whole, found by --dry-run too, where loading
    them would fail with a traceback."""
    bad = _unreadable_header(folder)
    if bad is not None:
        raise _weight_file_error(model_name, f"the weight file {bad[0]}", bad[1])


def load_model_config(config: RunConfig, name: str):
    """AutoConfig with `model.config_overrides` merged in (mappings merge key by key, so
    `rope_parameters: {rope_type: yarn, factor: 4}` keeps the model's rope_theta)."""
    from transformers import AutoConfig

    from qk_attn.run.preflight import check_device, check_device_map, check_overrides_build

    cfg = config.model
    check_device(cfg.device)  # first of the model's checks: cheap, and --dry-run makes them
    check_device_map(cfg.device_map)
    local = cfg.name.startswith(("/", "./", "../", "~")) or os.path.isabs(cfg.name)
    if local and not Path(os.path.expanduser(cfg.name)).exists():
        raise ConfigError(f"model.name={cfg.name!r} does not exist: no such folder (a Hub id looks like org/name)")
    if not Path(os.path.expanduser(name)).exists():
        from qk_attn.run.input_checks import check_hub

        check_hub(f"model.name={cfg.name!r}", "model")
    else:  # transformers ignores a revision for a local folder: the card would name one that was not used
        refuse_local_revision("model", cfg.name, cfg.revision)
        if config.tokenizer.name is None or Path(os.path.expanduser(config.tokenizer_name)).exists():
            refuse_local_revision("tokenizer", config.tokenizer_name, config.tokenizer.revision)
        check_weight_headers(cfg.name, name)
    try:
        model_config = AutoConfig.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:  # not found, no network, not a transformers model
        raise ConfigError(f"model.name={cfg.name!r} cannot be loaded: {one_line(error)}") from error
    if not cfg.config_overrides:
        return model_config
    values = model_config.to_dict()
    for key, value in cfg.config_overrides.items():
        if key not in values and not hasattr(model_config, key):
            raise ConfigError(
                f"model.config_overrides.{key}: {type(model_config).__name__} has no setting {key!r} "
                "(check the spelling against the model's config.json)"
            )
        values[key] = _merge(values.get(key), value)
    where = f"model.config_overrides={cfg.config_overrides!r}"
    try:
        overridden = type(model_config).from_dict(values)
    except Exception as error:  # noqa: BLE001 - the config class's own validation (e.g. heads vs hidden size)
        raise ConfigError(
            f"{where}: {type(model_config).__name__} refuses them ({type(error).__name__}: {one_line(error)})"
        ) from None
    folder = name if Path(os.path.expanduser(name)).is_dir() else None
    check_overrides_build(model_config, overridden, cfg.config_overrides, cfg.trust_remote_code, repr(cfg.name), folder)
    return overridden


def default_device(cfg) -> str:
    import torch

    if cfg.device:
        return cfg.device
    if not torch.cuda.is_available():
        return "cpu"
    if "LOCAL_RANK" in os.environ:  # one GPU per process of a launched job (torchrun / accelerate)
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return "cuda"


def load_model(config: RunConfig, name: str, model_config=None):
    """The CausalLM with "qk_sniff" attention (flash attention wrapped under its own name), in eval
    mode, placed on its device(s)."""
    import torch
    from transformers import AutoModelForCausalLM

    import qk_attn  # registers "qk_sniff"

    attention = "qk_sniff"
    if config.inference.backend == "flash_attention_2":
        # Flash is recorded under its own name: transformers takes flash-only branches by name.
        qk_attn.wrap_flash_attention()
        attention = "flash_attention_2"
    cfg = config.model
    kwargs: dict[str, Any] = {
        "config": model_config if model_config is not None else load_model_config(config, name),
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "attn_implementation": attention,
        "dtype": "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype),
    }
    if cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except SafetensorError as error:  # a weight file damaged since the checks (or in the Hub cache)
        raise _damaged_weights(cfg.name, name, cfg.revision, error) from error
    except OSError as error:  # a weight file missing or unreadable (permissions, I/O), or not downloadable
        raise ConfigError(f"model.name={cfg.name!r}: its weights cannot be loaded: {one_line(error)}") from error
    except (RuntimeError, ValueError) as error:
        if not cfg.config_overrides:
            raise
        # e.g. vocab_size: the weights' shapes no longer fit the config (known only once they load)
        raise ConfigError(
            f"model.config_overrides={cfg.config_overrides!r}: the weights of {cfg.name!r} do not fit the "
            f"overridden config ({type(error).__name__}: {one_line(error)})"
        ) from error
    if cfg.device_map is None:
        model.to(default_device(cfg))
    return model.eval()


def _damaged_weights(model_name: str, name: str, revision: str | None, error: BaseException) -> ConfigError:
    """The error of a weight file that failed to load, naming the file where its header does not
    read, in the local folder or the Hub cache (safetensors' own message names no file)."""
    folder: str | None = name
    if not Path(os.path.expanduser(name)).exists():
        from huggingface_hub import snapshot_download

        try:  # the cached snapshot only: never a download
            folder = snapshot_download(name, revision=revision, local_files_only=True, allow_patterns=["*.safetensors"])
        except (OSError, ValueError):
            folder = None
    bad = _unreadable_header(folder)
    if bad is not None:
        return _weight_file_error(model_name, f"the weight file {bad[0]}", bad[1])
    return _weight_file_error(model_name, f"a weight file of {name}", error)


def backbone(model):
    """The decoder without its LM head: hidden states only, never (B, T, vocab) logits."""
    base = model.base_model
    if base is model:
        logger.warning("%s has no separate backbone; running the whole model", type(model).__name__)
    return base


def load_tokenizer(config: RunConfig, name: str):
    from transformers import AutoTokenizer

    from qk_attn.run.documents import missing_local_path
    from qk_attn.run.input_checks import check_hub

    key = "tokenizer.name" if config.tokenizer.name else "model.name"
    if not Path(os.path.expanduser(name)).exists():
        missing_local_path(f"{key}={config.tokenizer_name!r}", name, "tokenizer")
        check_hub(f"{key}={config.tokenizer_name!r}", "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=config.tokenizer_revision, trust_remote_code=config.model.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}={config.tokenizer_name!r}: no tokenizer can be loaded: {one_line(error)}") from error
    tokenizer.padding_side = config.tokenizer.padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def resolve_max_length(config: RunConfig, model_config, tokenizer) -> int:
    """tokenizer.max_length, else the model's max positions (and the tokenizer's, if finite)."""
    if config.tokenizer.max_length is not None:
        return config.tokenizer.max_length
    from qk_attn.run.preflight import model_positions

    limits = [model_positions(model_config), getattr(tokenizer, "model_max_length", None)]
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 10**9]
    if not limits:
        raise ConfigError("tokenizer.max_length is not set and the model declares no maximum length; set it")
    return min(limits)


def encode(
    tokenizer, documents: list[Document], max_length: int, add_special_tokens: bool, device
) -> tuple[dict, list[int]]:
    """The model inputs of one batch, truncated to `max_length`, and each row's valid length.

    A batch without padding (one document, or rows of equal length) passes `input_ids` only:
    the model derives positions 0..T-1 itself, and an all-ones `attention_mask` would only
    make transformers inspect it on the host every forward (a device sync on GPU). A padded
    batch also gets the mask and RoPE positions that count valid tokens only (0, 1, 2, ...
    from each row's first real token), so left and right padding give every example the
    same positions as running it alone. Lengths are read from the host tensor, before any
    copy to the device.
    """
    enc = tokenizer(
        [d.text for d in documents],
        truncation=True,
        max_length=max_length,
        padding=len(documents) > 1,
        add_special_tokens=add_special_tokens,
        return_tensors="pt",
        return_attention_mask=True,
    )
    mask = enc["attention_mask"]
    lengths = mask.sum(-1).tolist()
    batch = {"input_ids": enc["input_ids"].to(device)}
    if any(n != mask.shape[-1] for n in lengths):
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        batch["attention_mask"] = mask.to(device)
        batch["position_ids"] = positions.to(device)
    return batch, lengths
