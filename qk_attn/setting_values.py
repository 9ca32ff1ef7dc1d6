"""Reading one setting's value: integers, finite numbers, true/false words, choices, index lists.

qk_attn.config reads every SniffConfig field with these, whether it came as a keyword argument, a
`QK_SNIFF_*` variable or a run configuration's key. A bad value is a `ConfigError` naming the setting
as a keyword (`layers='x'`); the caller relabels it with where the value came from (ConfigError.relabel).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from qk_attn.errors import ConfigError

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
# Plain ASCII numbers only: int() and float() also take "1_024", "+4" and other scripts' digits ("٣").
_INT_TEXT = re.compile(r"[0-9]+")
_FLOAT_TEXT = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def invalid_value(name: str, value: Any, allowed: str) -> ConfigError:
    """A bad value of field `name`, named as a keyword argument (`layers='x'`) until relabelled."""
    return ConfigError(f"{name}={value!r} is invalid: expected {allowed}", setting=name, value=value, allowed=allowed)


BUCKET_SIZES = "a power of two from 1 to 2**62 (1, 2, 4, ..., 8192, ...)"  # min_bucket_size (config, sampler)
MAX_INDEX = 1 << 20  # a layer or head index at or above it is a typo


def parse_index_list(name: str, value: Any, allow_empty: bool = True) -> tuple[int, ...] | None:
    """`"0,3,10-12"` (or a list of ints) -> (0, 3, 10, 11, 12); None/"" means all.

    Items are ints or strings of ints and ranges; a bool, a float or a mapping is refused, never
    truncated (`[0.9]` is not layer 0). An empty list is refused unless `allow_empty` (for
    `layers`, `heads` and `key_heads` it would select nothing, so "all" must be said by omitting the
    setting; no keys at all is `capture="q"`).
    """
    if hasattr(value, "tolist") and not isinstance(value, str):  # a numpy array or a torch tensor
        value = value.tolist()
    if value is None or (isinstance(value, str) and value.strip() in ("", "all")):
        return None
    expected = 'comma-separated non-negative integers or ranges, e.g. "0,3,10-12"'
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        parts: list[Any] = value.split(",")
    elif isinstance(value, (list, tuple, range, set, frozenset)):
        parts = list(value)
    else:
        raise invalid_value(name, value, expected)
    items: list[int] = []
    try:
        for part in parts:
            if isinstance(part, bool) or not isinstance(part, (numbers.Integral, str)):
                raise TypeError
            if isinstance(part, str) and "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = _int(lo), _int(hi)
                if hi_i < lo_i:
                    raise ValueError
                if hi_i >= MAX_INDEX:  # checked before expanding: "0-99999999999" would fill the memory
                    raise invalid_value(name, value, f"indices below {MAX_INDEX:,} (no model has more layers or heads)")
                items.extend(range(lo_i, hi_i + 1))
            else:
                items.append(_int(part))
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise invalid_value(name, value, expected) from None
    if any(i < 0 for i in items):
        raise invalid_value(name, value, "non-negative integers")
    if not items and not allow_empty:
        raise invalid_value(name, value, _EMPTY_HINTS.get(name, "at least one index (omit the setting for all)"))
    return tuple(sorted(set(items)))


_EMPTY_HINTS = {
    "layers": "at least one layer; omit the setting (null) to record every layer",
    "heads": (
        "at least one query head; omit it to record every query head, or record keys only "
        "(capture='k', QK_SNIFF_CAPTURE=k; in a run configuration capture.capture_queries: false)"
    ),
    "key_heads": (
        "at least one key head; omit it to record the key heads the recorded query heads read, or record "
        "queries only (capture='q', QK_SNIFF_CAPTURE=q; in a run configuration capture.capture_keys: false)"
    ),
}


def _int(value: Any) -> int:
    """An int, or a string of ASCII digits (surrounding spaces allowed); anything else is a ValueError."""
    if isinstance(value, str) and not _INT_TEXT.fullmatch(value.strip()):
        raise ValueError(value)
    return int(value)


def _float(value: Any) -> float:
    """A real number, or a string of a plain ASCII decimal number (`1.5`, `2e3`); else a ValueError."""
    if isinstance(value, str) and not _FLOAT_TEXT.fullmatch(value.strip()):
        raise ValueError(value)
    return float(value)


def parse_bool(name: str, value: Any) -> bool:
    """The words the run configuration takes for its true/false keys (`1`, `true`, `yes`, `on` and their
    opposites, any case), and empty: unset, as the shell unsets a variable."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "":
        return False
    if text not in BOOL_WORDS:
        raise invalid_value(name, value, "0 or 1 (or true/false, yes/no, on/off)")
    return BOOL_WORDS[text]


def parse_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    text = ",".join(part.strip() for part in str(value).split(","))  # "q, k": spaces around items only
    if name == "capture" and text == "k,q":
        text = "q,k"
    if text not in allowed:
        raise invalid_value(name, value, " | ".join(allowed))
    return text


def parse_number(name: str, value: Any, kind: type, minimum: float, strict: bool = False) -> Any:
    """An int (an int or a string of ASCII digits: never a bool or a float, which would be truncated)
    or a finite real number (never a bool, NaN or infinity; a string must be a plain decimal number),
    at least `minimum` (above it if `strict`)."""
    what = f"{'an integer' if kind is int else 'a finite number'} {'>' if strict else '>='} {minimum:g}"
    try:
        if isinstance(value, bool):  # True would pass as 1
            raise TypeError
        if kind is int:
            if not isinstance(value, (numbers.Integral, str)):
                raise TypeError  # 1.5 or 2.0: a float is not silently truncated
            number = _int(value)
        else:
            if not isinstance(value, (numbers.Real, str)):
                raise TypeError
            number = _float(value)
            if not math.isfinite(number):
                raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond a float (10**400)
        raise invalid_value(name, value, what) from None
    if number < minimum or (strict and number == minimum):
        raise invalid_value(name, value, what)
    return number
