"""The six sections of a run configuration, and the check each key's value gets when read.

Each section is a dataclass whose fields carry their own validator (`_opt`): `build_section`
turns one YAML mapping into a section, refusing an unknown key (naming the closest known one)
or a value of the wrong type with a `ConfigError` that names `section.key`. A null value is
the key's default (as if the key were left out); only a key without a default is required.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qk_attn.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PADDING_SIDES = ("right", "left")
SAMPLE_BY = ("document", "paragraph", "line")
# A number written as text (a quoted YAML value, or one YAML reads as a string) is plain ASCII:
# int() and float() also take "1_0", "+4", " ٣" (other scripts' digits), which no one means as a
# setting (as qk_attn.config refuses them in QK_SNIFF_* values).
_INT_TEXT = re.compile(r"-?[0-9]+")
_FLOAT_TEXT = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_INT_FORM = "in plain ASCII digits, e.g. 8 (no '_', '+' or other scripts' digits)"
_FLOAT_FORM = "in plain ASCII decimal, e.g. 2.5 or 1e3 (no '_', '+' or other scripts' digits)"


# ---- one field = one validator -------------------------------------------------------------
def _check(kind: str, choices: tuple[str, ...] | None = None, minimum: int | None = None, nullable: bool = True):
    """Field metadata: how a YAML value of this key is checked (and lightly coerced)."""
    return {"kind": kind, "choices": choices, "minimum": minimum, "nullable": nullable}


def _opt(default: Any, kind: str, **check: Any):
    return field(default=default, metadata=_check(kind, **check))


def validate(where: str, value: Any, kind: str, choices, minimum, nullable) -> Any:
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where} is required")
    if kind == "column":  # YAML reads `5` as a number: a column named 5 is written '5'
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} is invalid: expected a column name (a string; quote a numeric name)")
        return value
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
        at_least = "" if minimum is None else f" >= {minimum}"
        try:
            if isinstance(value, str) and not _INT_TEXT.fullmatch(value.strip()):
                raise ValueError(value)
            number = int(value)  # ValueError: more digits than int() converts
        except ValueError:
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer{at_least} {_INT_FORM}") from None
        if minimum is not None and number < minimum:
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer >= {minimum}")
        if number >= 1 << 63:  # past int64, which the tokenizer, torch and Arrow take (a bare OverflowError)
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer below 2**63")
        return number
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}={value!r} is invalid: expected a finite number")
        if isinstance(value, str) and not _FLOAT_TEXT.fullmatch(value.strip()):
            raise ConfigError(f"{where}={value!r} is invalid: expected a finite number > {minimum or 0} {_FLOAT_FORM}")
        number = float(value)
        if not math.isfinite(number) or not number > (minimum or 0):  # .nan / .inf: not a size
            raise ConfigError(f"{where}={value!r} is invalid: expected a finite number > {minimum or 0}")
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
    text_column: str = _opt("text", "column", nullable=False)
    id_column: str | None = _opt(None, "column")  # None: the row index is the example id
    max_samples: int | None = _opt(None, "int", minimum=1)
    streaming: bool = _opt(False, "bool")
    sample_by: str = _opt("document", "str", choices=SAMPLE_BY, nullable=False)  # local .txt files only

    def __post_init__(self) -> None:
        # `datasets` streams whole splits only: a slice failed in its loader ("Bad split: train[:3]")
        if self.streaming is True and isinstance(self.split, str) and any(ch in self.split for ch in "[+"):
            raise ConfigError(
                f"dataset.split={self.split!r} cannot be streamed (dataset.streaming: true reads whole splits "
                "only); use dataset.max_samples to take the first documents, or set dataset.streaming: false"
            )


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
        if self.device_map is not None and self.device is not None:  # one of them would be ignored
            raise ConfigError(
                f"model.device_map={self.device_map!r} and model.device={self.device!r} both place the model; "
                "set one of them (device_map: spread over devices, device: all on one)"
            )


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

    def __post_init__(self) -> None:
        if isinstance(self.data_root, str):  # "~/x" is a home folder wherever the run writes, reads or prints it
            self.data_root = os.path.expanduser(self.data_root)
        # How --push writes the repo output.hf_repo_id names: without that repo they would be ignored.
        for key, what in _PUSH_KEYS.items():
            if getattr(self, key) and not self.hf_repo_id:
                raise ConfigError(
                    f"output.{key}={getattr(self, key)!r} cannot apply without output.hf_repo_id ({what}); "
                    f"set output.hf_repo_id (and run with --push), or remove output.{key}"
                )


_PUSH_KEYS = {
    "hf_branch": "it names the branch of the Hub repo that --push pulls and pushes",
    "private": "it makes the Hub repo that --push creates private",
}


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


def unknown_key(key: str, where: str, known) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint}; known keys: {', '.join(known)}")


def build_section(name: str, values: Any):
    cls = SECTIONS[name]
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise unknown_key(key, f"section {name!r}", list(fields))
    checked = {}
    for key, f in fields.items():
        if values.get(key) is None and f.default is not None:
            continue  # null (`dtype:` left empty, `--set model.dtype=null`) is the key's default, as if omitted
        if key in values:
            checked[key] = validate(f"{name}.{key}", values[key], **f.metadata)
        elif not f.metadata.get("nullable", True) and f.default is None:
            raise ConfigError(f"{name}.{key} is required")
    return cls(**checked)
