"""What `qk-sniff run` reads: a YAML file with six sections, plus `--set` overrides.

    dataset:   {path, name, split, data_files, revision, text_column, id_column, max_samples,
                streaming, sample_by}
    model:     {name, revision, dtype, device_map, device, trust_remote_code, config_overrides}
    tokenizer: {name, revision, max_length, padding_side, add_special_tokens}
    inference: {batch_size, backend, pinned_mb}
    capture:   {sampler, min_bucket_size, base_rate, seed, layers, heads, key_heads,
                head_sampling: {count, seed}, capture_queries, capture_keys, capture_pre_rope,
                full_attention_only, capture_token_strings, vector_dtype, max_gb}
    output:    {data_root, hf_repo_id, hf_branch, private, overwrite}

Everything is validated when the file is read, before any model or dataset is loaded: an
unknown section or key, or a value of the wrong type, is a `ConfigError` that names the
section and key (and the closest known key). The capture section maps onto `SniffConfig`
(`RunConfig.sniff_config()`), whose own checks run at the same time.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from qk_attn.config import SniffConfig
from qk_attn.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PADDING_SIDES = ("right", "left")
SAMPLE_BY = ("document", "paragraph", "line")


# ---- one field = one validator -------------------------------------------------------------
def _check(kind: str, choices: tuple[str, ...] | None = None, minimum: int | None = None, nullable: bool = True):
    """Field metadata: how a YAML value of this key is checked (and lightly coerced)."""
    return {"kind": kind, "choices": choices, "minimum": minimum, "nullable": nullable}


def _opt(default: Any, kind: str, **check: Any):
    return field(default=default, metadata=_check(kind, **check))


def _validate(where: str, value: Any, kind: str, choices, minimum, nullable) -> Any:
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where} is required")
    if kind == "str":
        if isinstance(value, (dict, list, bool)):
            raise ConfigError(f"{where}={value!r} is invalid: expected a string")
        value = os.fspath(value) if isinstance(value, Path) else str(value)
        if choices and value not in choices:
            raise ConfigError(f"{where}={value!r} is invalid: expected one of {' | '.join(choices)}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}={value!r} is invalid: expected true or false")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer") from None
        if minimum is not None and number < minimum:
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer >= {minimum}")
        return number
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}={value!r} is invalid: expected a number")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is invalid: expected a number") from None
        if not number > (minimum or 0):
            raise ConfigError(f"{where}={value!r} is invalid: expected a number > {minimum or 0}")
        return number
    if kind == "mapping":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}={value!r} is invalid: expected a mapping (key: value, ...)")
        return dict(value)
    return value  # "any": checked where it is used (e.g. by SniffConfig)


# ---- sections ------------------------------------------------------------------------------
@dataclass
class DatasetSection:
    """Which documents to run: anything `datasets.load_dataset` reads, or a local file."""

    path: str | None = _opt(None, "str", nullable=False)  # Hub id, local file/glob/folder, or "demo:kjv"
    name: str | None = _opt(None, "str")  # dataset configuration name
    split: str = _opt("train", "str", nullable=False)
    data_files: Any = _opt(None, "any")
    revision: str | None = _opt(None, "str")
    text_column: str = _opt("text", "str", nullable=False)
    id_column: str | None = _opt(None, "str")  # None: the row index is the example id
    max_samples: int | None = _opt(None, "int", minimum=1)
    streaming: bool = _opt(False, "bool")
    sample_by: str = _opt("document", "str", choices=SAMPLE_BY, nullable=False)  # for .txt files


@dataclass
class ModelSection:
    name: str | None = _opt(None, "str", nullable=False)  # Hub id, local folder, or "demo:smollm2-135m"
    revision: str | None = _opt(None, "str")
    dtype: str = _opt("auto", "str", choices=DTYPES, nullable=False)
    device_map: Any = _opt(None, "any")  # e.g. "auto" (needs accelerate)
    device: str | None = _opt(None, "str")  # without device_map: cuda when available, else cpu
    trust_remote_code: bool = _opt(False, "bool")
    config_overrides: dict = _opt(None, "mapping")  # e.g. rope_parameters for YaRN

    def __post_init__(self) -> None:
        if self.config_overrides is None:
            self.config_overrides = {}


@dataclass
class TokenizerSection:
    name: str | None = _opt(None, "str")  # defaults to model.name
    revision: str | None = _opt(None, "str")  # defaults to model.revision when name is unset
    max_length: int | None = _opt(None, "int", minimum=1)  # defaults to the model's max positions
    padding_side: str = _opt("right", "str", choices=PADDING_SIDES, nullable=False)
    add_special_tokens: bool = _opt(True, "bool")


@dataclass
class InferenceSection:
    batch_size: int = _opt(1, "int", minimum=1, nullable=False)
    backend: str = _opt("sdpa", "str", nullable=False)  # attention that "qk_sniff" wraps
    pinned_mb: int | None = _opt(None, "int", minimum=1)


@dataclass
class CaptureSection:
    sampler: Any = _opt("log_uniform", "any")  # a name, or {type, base_rate, min_bucket_size, seed}
    min_bucket_size: int | None = _opt(None, "int", minimum=1)
    base_rate: Any = _opt(None, "any")
    seed: int | None = _opt(None, "int", minimum=0)
    layers: Any = _opt(None, "any")  # "0,3,10-12" or a list; null = all
    heads: Any = _opt(None, "any")  # query heads; null = all
    key_heads: Any = _opt(None, "any")  # null = the KV heads the chosen query heads read
    head_sampling: Any = _opt(None, "any")  # {count, seed}: a seeded sample of (layer, head) pairs
    capture_queries: bool = _opt(True, "bool")
    capture_keys: bool = _opt(True, "bool")
    capture_pre_rope: bool = _opt(False, "bool")
    full_attention_only: bool = _opt(False, "bool")
    capture_token_strings: bool = _opt(False, "bool")
    vector_dtype: str | None = _opt(None, "str")
    # Refuse a run whose estimated output (qk_attn.run.estimate) exceeds this many GB (10^9 bytes);
    # null: half the free space on the output's file system.
    max_gb: float | None = _opt(None, "float")


@dataclass
class OutputSection:
    data_root: str | None = _opt(None, "str", nullable=False)
    hf_repo_id: str | None = _opt(None, "str")
    hf_branch: str | None = _opt(None, "str")
    private: bool = _opt(False, "bool")
    overwrite: bool = _opt(False, "bool")


SECTIONS: dict[str, type] = {
    "dataset": DatasetSection,
    "model": ModelSection,
    "tokenizer": TokenizerSection,
    "inference": InferenceSection,
    "capture": CaptureSection,
    "output": OutputSection,
}
SAMPLER_KEYS = ("type", "base_rate", "min_bucket_size", "seed")
HEAD_SAMPLING_KEYS = ("count", "seed")


def _unknown(key: str, where: str, known) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint}; known keys: {', '.join(known)}")


def _build_section(name: str, values: Any):
    cls = SECTIONS[name]
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise _unknown(key, f"section {name!r}", list(fields))
    checked = {}
    for key, f in fields.items():
        if key in values:
            checked[key] = _validate(f"{name}.{key}", values[key], **f.metadata)
        elif not f.metadata.get("nullable", True) and f.default is None:
            raise ConfigError(f"{name}.{key} is required")
    return cls(**checked)


@dataclass
class RunConfig:
    """One capture run: where the documents come from, which model, what to record, where to."""

    dataset: DatasetSection
    model: ModelSection
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    capture: CaptureSection = field(default_factory=CaptureSection)
    output: OutputSection = field(default_factory=OutputSection)

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RunConfig":
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise ConfigError(f"a run configuration is a mapping of sections, got {type(data).__name__}")
        for key in data:
            if key not in SECTIONS:
                raise _unknown(key, "the configuration (top level)", list(SECTIONS))
        sections = {name: _build_section(name, data.get(name)) for name in SECTIONS}
        config = cls(**sections)
        config.sniff_config()  # every capture value is checked now, not after the model loaded
        return config

    @classmethod
    def load(
        cls, path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), base: Mapping | None = None
    ) -> "RunConfig":
        """Read YAML from `path` (or start from `base`), apply `section.key=value` overrides."""
        data: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML: {error}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: a run configuration is a mapping of sections, got {type(data).__name__}")
        elif base is not None:
            data = _deep_copy(base)
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    # ---- mapping onto the capture library ---------------------------------------------------
    def sampler_settings(self) -> dict[str, Any]:
        """sampler / min_bucket_size / base_rate / seed, from `capture.sampler` (a name or a
        mapping) and the flat keys; the same value given twice differently is an error."""
        c = self.capture
        flat = {"min_bucket_size": c.min_bucket_size, "base_rate": c.base_rate, "seed": c.seed}
        sampler = c.sampler
        if isinstance(sampler, Mapping):
            for key in sampler:
                if key not in SAMPLER_KEYS:
                    raise _unknown(key, "capture.sampler", SAMPLER_KEYS)
            nested = {k: sampler.get(k) for k in SAMPLER_KEYS[1:]}
            for key, value in nested.items():
                if value is not None and flat[key] is not None and value != flat[key]:
                    raise ConfigError(
                        f"capture.sampler.{key}={value!r} and capture.{key}={flat[key]!r} disagree; set it once"
                    )
                if value is not None:
                    flat[key] = value
            sampler = sampler.get("type", "log_uniform")
        if sampler is None:
            sampler = "log_uniform"
        if not isinstance(sampler, str):
            raise ConfigError(
                f"capture.sampler={sampler!r} is invalid: expected log_uniform | uniform | all, "
                "or a mapping {type, base_rate, min_bucket_size, seed}"
            )
        settings = {"sampler": sampler}
        settings.update({k: v for k, v in flat.items() if v is not None})
        return settings

    def head_sampling(self) -> dict[str, Any]:
        hs = self.capture.head_sampling
        if hs is None or hs is False:
            return {}
        if isinstance(hs, int) and not isinstance(hs, bool):
            hs = {"count": hs}
        if not isinstance(hs, Mapping):
            raise ConfigError(f"capture.head_sampling={hs!r} is invalid: expected a mapping {{count, seed}} or null")
        for key in hs:
            if key not in HEAD_SAMPLING_KEYS:
                raise _unknown(key, "capture.head_sampling", HEAD_SAMPLING_KEYS)
        out = {}
        if hs.get("count") is not None:
            out["head_sample_count"] = _validate("capture.head_sampling.count", hs["count"], "int", None, 1, True)
        if hs.get("seed") is not None:
            out["head_sample_seed"] = _validate("capture.head_sampling.seed", hs["seed"], "int", None, 0, True)
        return out

    def sniff_settings(self) -> dict[str, Any]:
        """Keyword arguments for `qk_attn.session()` / `SniffConfig` (field names of `SniffConfig`).

        Every field is given, unset ones at SniffConfig's defaults, so a run is decided by its
        configuration alone: `QK_SNIFF_*` variables in the environment do not change it.
        """
        c = self.capture
        if not (c.capture_queries or c.capture_keys):
            raise ConfigError("capture.capture_queries and capture.capture_keys are both false: nothing would be recorded")
        kinds = ",".join(k for k, on in (("q", c.capture_queries), ("k", c.capture_keys)) if on)
        defaults = SniffConfig()
        settings: dict[str, Any] = {name: getattr(defaults, name) for name in SniffConfig.field_names()}
        settings.update(output=self.output.data_root, **self.sampler_settings())
        settings.update(
            layers=c.layers,
            heads=c.heads,
            key_heads=c.key_heads,
            capture=kinds,
            rope="pre" if c.capture_pre_rope else "post",
            full_attention_only=c.full_attention_only,
            backend=self.inference.backend,
        )
        settings.update(self.head_sampling())
        if c.vector_dtype is not None:
            settings["vector_dtype"] = c.vector_dtype
        if self.inference.pinned_mb is not None:
            settings["pinned_mb"] = self.inference.pinned_mb
        return settings

    def sniff_config(self) -> SniffConfig:
        """The capture configuration; a bad value names its YAML key (`capture.layers=...`)."""
        settings = self.sniff_settings()
        try:
            return SniffConfig(**settings)
        except ConfigError as error:
            raise error.relabel(self.yaml_key(error.setting)) if error.setting else error from None

    def yaml_key(self, setting: str) -> str:
        """The YAML key a `SniffConfig` field comes from: `base_rate` -> `capture.base_rate`, or
        `capture.sampler.base_rate` when it was given inside the `capture.sampler` mapping."""
        if setting in SAMPLER_KEYS[1:] and isinstance(self.capture.sampler, Mapping) and \
                self.capture.sampler.get(setting) is not None:
            return f"capture.sampler.{setting}"
        return _YAML_KEYS.get(setting, f"capture.{setting}")

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name or self.model.name

    @property
    def tokenizer_revision(self) -> str | None:
        return self.tokenizer.revision if self.tokenizer.name else (self.tokenizer.revision or self.model.revision)


# SniffConfig field -> the YAML key it is set by (the rest are `capture.<field>`).
_YAML_KEYS = {
    "head_sample_count": "capture.head_sampling.count",
    "head_sample_seed": "capture.head_sampling.seed",
    "backend": "inference.backend",
    "pinned_mb": "inference.pinned_mb",
    "output": "output.data_root",
    "rope": "capture.capture_pre_rope",
    "capture": "capture.capture_queries",
}


def _deep_copy(data: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def apply_override(data: dict, item: str) -> None:
    """Apply one `section.key=value` (or `section.key.subkey=value`) to a config mapping.

    The value is read as YAML, so `true`, `8192`, `[0, 1]` and `{type: uniform}` keep their
    types; `0,3,10-12` stays a string. Unknown sections and keys are refused here already.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is invalid: expected section.key=value, e.g. capture.base_rate=2")
    dotted, raw = item.split("=", 1)
    parts = [p.strip() for p in dotted.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r} is invalid: expected section.key=value, e.g. capture.base_rate=2")
    section, key = parts[0], parts[1]
    if section not in SECTIONS:
        raise _unknown(section, f"--set {item!r} (sections)", list(SECTIONS))
    known = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in known:
        raise _unknown(key, f"section {section!r} (--set {item!r})", known)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    target = data.setdefault(section, {})
    if target is None:
        target = data[section] = {}
    for part in parts[1:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            # e.g. capture.sampler=uniform then capture.sampler.base_rate=2: keep the name as `type`
            nxt = {"type": nxt} if (part == "sampler" and isinstance(nxt, str)) else {}
            target[part] = nxt
        target = nxt
    target[parts[-1]] = value
