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
unknown section or key, a key written twice, or a value of the wrong type, is a `ConfigError`
that names the section and key (and the closest known key). The capture section maps onto
`SniffConfig` (`RunConfig.sniff_config()`), whose own checks run at the same time. The sections and the
check of each key live in qk_attn.run.sections, the reading of the text and `--set` in
qk_attn.run.yaml_text; this module builds the sections and maps them onto the capture library.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qk_attn.config import SniffConfig
from qk_attn.errors import ConfigError
from qk_attn.run.sections import (
    HEAD_SAMPLING_KEYS,
    SAMPLER_KEYS,
    SECTIONS,
    CaptureSection,
    DatasetSection,
    InferenceSection,
    ModelSection,
    OutputSection,
    TokenizerSection,
    build_section,
    unknown_key,
    validate,
)
from qk_attn.run.yaml_text import apply_override, deep_copy, load_yaml


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
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunConfig:
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise ConfigError(f"a run configuration is a mapping of sections, got {type(data).__name__}")
        for key in data:
            if key not in SECTIONS:
                raise unknown_key(key, "the configuration (top level)", list(SECTIONS))
        sections = {name: build_section(name, data.get(name)) for name in SECTIONS}
        config = cls(**sections)
        config.sniff_config()  # every capture value is checked now, not after the model loaded
        return config

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        base: Mapping | None = None,
    ) -> RunConfig:
        """Read YAML from `path` (or start from `base`), apply `section.key=value` overrides."""
        data: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                why = "is not a regular file" if path.exists() else "does not exist"  # /dev/null, a pipe
                raise ConfigError(f"config file {str(path)!r} {why}")
            try:
                data = load_yaml(path.read_text(), f"run config {path}") or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML: {error}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: a run configuration is a mapping of sections, got {type(data).__name__}")
        elif base is not None:
            data = deep_copy(base)
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
                    raise unknown_key(key, "capture.sampler", SAMPLER_KEYS)
            nested = {k: sampler.get(k) for k in SAMPLER_KEYS[1:]}
            for key, value in nested.items():
                # Both given: each valid before they are compared ('1_0' is invalid, not a disagreement), as read.
                if value is not None and flat[key] is not None:
                    if _sampler_value(key, value, f"capture.sampler.{key}") != _sampler_value(
                        key, flat[key], f"capture.{key}"
                    ):
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
                raise unknown_key(key, "capture.head_sampling", HEAD_SAMPLING_KEYS)
        out = {}
        if hs.get("seed") is not None and hs.get("count") is None:  # it would be recorded, and do nothing
            raise ConfigError(
                f"capture.head_sampling.seed={hs['seed']!r} needs capture.head_sampling.count: without a count every "
                "(layer, head) is recorded and no sample is drawn; set count, or leave head_sampling out"
            )
        if hs.get("count") is not None:
            out["head_sample_count"] = validate("capture.head_sampling.count", hs["count"], "int", None, 1, True)
        if hs.get("seed") is not None:
            out["head_sample_seed"] = validate("capture.head_sampling.seed", hs["seed"], "int", None, 0, True)
        return out

    def sniff_settings(self) -> dict[str, Any]:
        """Keyword arguments for `qk_attn.session()` / `SniffConfig` (field names of `SniffConfig`).

        Every field is given, unset ones at SniffConfig's defaults, so a run is decided by its
        configuration alone: `QK_SNIFF_*` variables in the environment do not change it.
        """
        c = self.capture
        if not (c.capture_queries or c.capture_keys):
            raise ConfigError(
                "capture.capture_queries and capture.capture_keys are both false: nothing would be recorded"
            )
        if c.key_heads is not None and not c.capture_keys:  # it would choose among no rows
            raise ConfigError(
                f"capture.key_heads={c.key_heads!r} cannot apply while capture.capture_keys is false: "
                "no keys are recorded; remove capture.key_heads, or set capture.capture_keys: true"
            )
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
        if (
            setting in SAMPLER_KEYS[1:]
            and isinstance(self.capture.sampler, Mapping)
            and self.capture.sampler.get(setting) is not None
        ):
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


# A run's source record key (qk_attn.run.prepare.source_record) -> the YAML key it is set by.
_SOURCE_YAML_KEYS = {
    "dataset": "dataset.path",
    "dataset_name": "dataset.name",
    "dataset_revision": "dataset.revision",
    "model": "model.name",
    "model_revision": "model.revision",
    "dtype": "model.dtype",
    "config_overrides": "model.config_overrides",
    "tokenizer": "tokenizer.name",
    "tokenizer_revision": "tokenizer.revision",
    "add_special_tokens": "tokenizer.add_special_tokens",
    "max_length": "tokenizer.max_length",
    "padding_side": "tokenizer.padding_side",
    "batch_size": "inference.batch_size",
    "text_folder": "dataset.path",  # (a folder of .txt files, read with dataset.sample_by)
    "description": "dataset.path",  # (the demo's dataset)
    "weights": "model.name",  # (the demo's weights package)
}


def setting_yaml_key(setting: str) -> str:
    """The YAML key of a setting a resume compares (qk_attn.storage.settings.SettingDifference): a
    SniffConfig field, `source.<key>` of the source record, or already a YAML key (`dataset.path`)."""
    if setting.startswith("source."):
        key = setting.removeprefix("source.")
        return _SOURCE_YAML_KEYS.get(key, f"dataset.{key}")
    return setting if "." in setting else _YAML_KEYS.get(setting, f"capture.{setting}")


def described_difference(setting: str, there, now) -> str:
    """`key: X there, Y now` in a run configuration's terms: its YAML key, and the value that key takes
    where the run turns it into another (capture_pre_rope: true for rope "pre"; the kinds for
    capture_queries and capture_keys together)."""
    if setting == "rope":
        return f"capture.capture_pre_rope: {there == 'pre'} there, {now == 'pre'} now"
    if setting == "capture":
        return f"capture.capture_queries and capture.capture_keys: kinds {there!r} there, {now!r} now"
    return f"{setting_yaml_key(setting)}: {there!r} there, {now!r} now"


def _sampler_value(key: str, value: Any, label: str) -> Any:
    """A sampler value as the capture library reads it; refused as invalid, named `label`."""
    try:
        return getattr(SniffConfig(**{key: value}), key)
    except ConfigError as error:
        raise error.relabel(label) from None
