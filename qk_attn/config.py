"""Every capture setting in one place: `SniffConfig`, read from `QK_SNIFF_*` or keywords.

Values are validated when the configuration is built, never inside a forward: a bad value
is a `ConfigError` (a `ValueError`) naming the setting, the value and what is allowed. The
setting is named as the user wrote it: `layers=...` for keyword arguments, `QK_SNIFF_LAYERS=...`
for a value read from the environment, `capture.layers=...` for a run configuration
(qk_attn.run.config relabels it). Each value is read by qk_attn.setting_values; session()'s other
arguments are checked in qk_attn.arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qk_attn.errors import ConfigError
from qk_attn.setting_values import (
    BUCKET_SIZES,
    invalid_value,
    parse_bool,
    parse_choice,
    parse_index_list,
    parse_number,
)

ENV_PREFIX = "QK_SNIFF_"
OTHER_ENV = ("QK_SNIFF_CACHE",)  # read by the demo, not a capture setting
SAMPLERS = ("log_uniform", "uniform", "all")
CAPTURE_KINDS = ("q,k", "q", "k")
ROPE_STAGES = ("post", "pre")
BACKENDS = ("sdpa", "eager", "flash_attention_2")
# What "qk_sniff" wraps. flash_attention_2 is recorded under its own name (qk_attn.wrap_flash_attention()):
# a SniffConfig takes it as a label (a run configuration's inference.backend), but the environment and
# session() refuse it until flash attention records, where "qk_sniff" would refuse it in the first forward.
WRAPPED_BACKENDS = ("sdpa", "eager")
FLASH = "flash_attention_2"
FLASH_ADVICE = (
    "flash attention is recorded under its own name: call qk_attn.wrap_flash_attention() and load the model with "
    'attn_implementation="flash_attention_2", leaving this setting unset'
)
VECTOR_DTYPES = ("float32", "float16")
# The sampler's largest log-uniform bucket is min_bucket_size << 62 (sampler.MAX_BUCKETS): its keep
# probability needs it as a finite float, and the kernel shifts int64 positions by log2 of it.
MAX_MIN_BUCKET_SIZE = 2**62


# Whether the attention registered under a backend's name records: set by qk_attn.capture.hooks when it is
# imported (this layer does not import capture). Before that nothing is wrapped, flash_attention_2 included.
backend_records: Callable[[str], bool] = lambda name: False


def _flash_recorded() -> bool:
    """Whether qk_attn.wrap_flash_attention() made "flash_attention_2" record."""
    return backend_records(FLASH)


def _session_backends() -> str:
    """The backends the environment and session() take now: flash_attention_2 only once it records."""
    if _flash_recorded():
        return " | ".join(BACKENDS)
    return f"{' | '.join(WRAPPED_BACKENDS)}; {FLASH_ADVICE}"


def _looks_like_ours(variable: str, names: list[str]) -> bool:
    """`QK_SNIFF_*` in any case, and a misspelt prefix (QK_SNIF_, QKSNIFF_, QK__SNIFF_) before one of our
    `names` or a name close to one; another tool's QK_SNIFFER_MODE is not ours."""
    upper = variable.upper()
    if upper.startswith(ENV_PREFIX):
        return True
    misspelt = re.match(r"Q_*K_*S_*N_*I_*F+_*", upper)
    return misspelt is not None and bool(difflib.get_close_matches(upper[misspelt.end() :], names, n=1))


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return (f" (did you mean {close[0]}?)" if close else "") + f"; known: {', '.join(known)}"


def command_line_process() -> bool:
    """True inside the `qk-sniff` command (`qk-sniff ...` or `python -m qk_attn.cli ...`), which
    ignores `QK_SNIFF_*` capture settings: its run configuration alone decides a run (README
    "Environment variables"). Checked on the command line because `import qk_attn` reads the
    environment before the command's own code runs."""
    if sys.argv and os.path.basename(sys.argv[0] or "") == "qk-sniff":
        return True
    return main_module(getattr(sys, "orig_argv", ())) == "qk_attn.cli"  # orig_argv: Python >= 3.10


_PYTHON_FLAGS = "bBdEhiIOPqRsSuvx"  # interpreter options without an argument


def main_module(argv) -> str | None:
    """The module that the interpreter command line `argv` runs with `-m` (`-m qk_attn.cli`,
    `-mqk_attn.cli`, `-u -m ...`, `-Im ...`), None for a script, `-c` or stdin."""
    args = iter(list(argv)[1:])
    for arg in args:
        if arg == "--check-hash-based-pycs":  # the one long option that takes a value
            next(args, None)
            continue
        if not arg.startswith("-") or arg in ("-", "--"):
            return None  # a script, or stdin
        if arg.startswith("--"):
            continue
        options = arg[1:].lstrip(_PYTHON_FLAGS)  # flags may share one word: -Im, -Bu
        if not options:
            continue
        option, value = options[0], options[1:]
        if option == "m":
            return value or next(args, None)
        if option in "WX":  # -W arg / -Warg, -X opt / -Xopt
            if not value:
                next(args, None)
            continue
        return None  # -c: a command, not a module
    return None


def _host_memory_mib() -> int | None:
    """This host's physical memory in MiB, None where the system does not say."""
    try:
        return (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) >> 20
    except (AttributeError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class SniffConfig:
    """What to record and where. Field names are the env variables without `QK_SNIFF_`."""

    output: str | None = None
    sampler: str = "log_uniform"
    min_bucket_size: int = 128
    base_rate: float = 1.0
    seed: int = 0
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    key_heads: tuple[int, ...] | None = None
    head_sample_count: int | None = None
    head_sample_seed: int = 0
    capture: str = "q,k"
    rope: str = "post"
    full_attention_only: bool = False
    backend: str = "sdpa"
    vector_dtype: str = "float32"
    pinned_mb: int = 256

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if not (self.output is None or isinstance(self.output, (str, os.PathLike))):
            raise invalid_value("output", self.output, "a folder path")
        set_("output", None if self.output in (None, "") else os.fspath(self.output))
        if self.output is not None and not self.output.strip():  # a folder named " " is a typo
            raise invalid_value("output", self.output, "a folder path (empty or unset: no output)")
        if self.output is not None and "\0" in self.output:  # no file system takes it (os: a bare ValueError)
            raise invalid_value("output", self.output, "a folder path without NUL characters")
        if self.output is not None:  # "~/x" is a home folder, as for qk_attn.load and a run's data_root
            set_("output", os.path.expanduser(self.output))
        set_("sampler", parse_choice("sampler", self.sampler, SAMPLERS))
        raw_bucket = self.min_bucket_size
        try:  # one message with the whole rule, for 0 and 8.0 as for 3
            set_("min_bucket_size", parse_number("min_bucket_size", raw_bucket, int, 1))
        except ConfigError:
            raise invalid_value("min_bucket_size", raw_bucket, BUCKET_SIZES) from None
        if self.min_bucket_size & (self.min_bucket_size - 1) or self.min_bucket_size > MAX_MIN_BUCKET_SIZE:
            raise invalid_value("min_bucket_size", raw_bucket, BUCKET_SIZES)
        set_("base_rate", parse_number("base_rate", self.base_rate, float, 0.0, strict=True))
        raw_seed = self.seed
        set_("seed", parse_number("seed", raw_seed, int, 0))
        if self.seed >= 2**32:
            raise invalid_value("seed", raw_seed, "an integer in [0, 2**32)")
        set_("layers", parse_index_list("layers", self.layers, allow_empty=False))
        set_("heads", parse_index_list("heads", self.heads, allow_empty=False))
        set_("key_heads", parse_index_list("key_heads", self.key_heads, allow_empty=False))
        if self.head_sample_count not in (None, ""):
            set_("head_sample_count", parse_number("head_sample_count", self.head_sample_count, int, 1))
        else:
            set_("head_sample_count", None)
        raw_head_seed = self.head_sample_seed
        set_("head_sample_seed", parse_number("head_sample_seed", raw_head_seed, int, 0))
        if self.head_sample_seed >= 2**63:  # as a run configuration's integers: the manifest's readers take int64
            raise invalid_value("head_sample_seed", raw_head_seed, "an integer in [0, 2**63)")
        set_("capture", parse_choice("capture", self.capture, CAPTURE_KINDS))
        if self.key_heads and "k" not in self.kinds:  # it would choose among no rows
            raise invalid_value(
                "key_heads", ",".join(map(str, self.key_heads)), f"unset while capture={self.capture!r}"
            )
        set_("rope", parse_choice("rope", self.rope, ROPE_STAGES))
        set_("full_attention_only", parse_bool("full_attention_only", self.full_attention_only))
        set_("backend", parse_choice("backend", self.backend, BACKENDS))
        set_("vector_dtype", parse_choice("vector_dtype", self.vector_dtype, VECTOR_DTYPES))
        raw_pinned = self.pinned_mb
        set_("pinned_mb", parse_number("pinned_mb", raw_pinned, int, 1))
        # The pool is allocated whole when a capture starts: a size beyond this host's memory would
        # fail there (an allocator error inside the session) instead of here with the setting's name.
        memory = _host_memory_mib()
        if memory and self.pinned_mb > memory:
            raise invalid_value(
                "pinned_mb",
                raw_pinned,
                f"an integer from 1 to {memory} (MiB of pinned host memory; this host has {memory:,} MiB of memory)",
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.capture.split(","))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> SniffConfig:
        """Read every `QK_SNIFF_<FIELD>` variable; keyword overrides win over the environment.

        A bad value names the variable when it came from the environment, the keyword otherwise.
        In the `qk-sniff` command the process environment is not read (see command_line_process).
        `backend="flash_attention_2"` is refused here unless flash attention records already
        (qk_attn.wrap_flash_attention(), as `qk-sniff run` calls before its session): "qk_sniff" would
        refuse it at the first forward (qk_attn.capture.backends.flash_forward).
        """
        if environ is None:
            environ = {} if command_line_process() else os.environ
        known = {ENV_PREFIX + name.upper(): name for name in cls.field_names()}
        # Names are upper case: qk_sniff_output would be ignored by the shell's user, silently.
        names = [variable[len(ENV_PREFIX) :] for variable in (*known, *OTHER_ENV)]
        unknown = sorted(v for v in environ if v not in known and v not in OTHER_ENV and _looks_like_ours(v, names))
        if unknown:  # a typo would otherwise capture with a default silently
            raise ConfigError(
                f"{unknown[0]} is not a qk-attn variable{_did_you_mean(unknown[0].upper(), [*known, *OTHER_ENV])}"
            )
        cls.refuse_unknown(overrides)
        # An empty variable is unset, as `VAR= cmd` reads in the shell: its default, for every variable alike.
        values = {name: environ[variable] for variable, name in known.items() if environ.get(variable, "").strip()}
        if "output" in values:  # as every other variable's value is read: "out " is the folder out
            values["output"] = values["output"].strip()
        from_environment = set(values) - set(overrides)
        values.update(overrides)
        try:
            config = cls(**values)
            if config.backend == FLASH and not _flash_recorded():
                raise invalid_value("backend", values["backend"], _session_backends())
        except ConfigError as error:
            if error.setting == "backend":  # what the environment and session() take, flash included or not
                error = invalid_value("backend", error.value, _session_backends())
            if error.setting in from_environment:
                raise error.relabel(ENV_PREFIX + error.setting.upper()) from None
            raise error from None
        object.__setattr__(config, "_from_env", frozenset(from_environment))
        return config

    def setting_name(self, name: str) -> str:
        """Field `name` as the user set it, for errors found later (in a forward): `QK_SNIFF_LAYERS`
        when its value came from the environment, else the keyword `layers`."""
        return ENV_PREFIX + name.upper() if name in getattr(self, "_from_env", ()) else name

    def replace(self, **changes: Any) -> SniffConfig:
        self.refuse_unknown(changes)
        config = dataclasses.replace(self, **changes)
        object.__setattr__(config, "_from_env", frozenset(getattr(self, "_from_env", ())) - set(changes))
        return config

    @classmethod
    def refuse_unknown(cls, settings: dict[str, Any], also: tuple[str, ...] = ()) -> None:
        """TypeError for a keyword that is no setting (nor one of `also`, the caller's own keywords)."""
        known = (*also, *cls.field_names())
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TypeError(f"unknown setting {unknown[0]!r}{_did_you_mean(unknown[0], known)}")

    def to_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.field_names()}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}

    def sampler_dict(self) -> dict[str, Any]:
        """The parameters that decide which positions are kept (part of a dataset's identity)."""
        return {
            "sampler": self.sampler,
            "min_bucket_size": self.min_bucket_size,
            "base_rate": self.base_rate,
            "seed": self.seed,
        }
