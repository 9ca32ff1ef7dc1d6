"""The arguments of `session()` and `ParquetSink` besides the SniffConfig fields (`overwrite`, `source`,
`vocabulary`), checked before anything is done: a `ConfigError` naming the argument, the value and
what is allowed, as qk_attn.config's are."""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

from qk_attn.errors import ConfigError


def _invalid(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is invalid: expected {allowed}", setting=name, value=value, allowed=allowed)


def check_flag(name: str, value: Any) -> bool:
    """A true/false argument of a Python call (`overwrite=`, `fsync=`): a bool only. By its truth
    value "no", "false" and 2 would all be True (`overwrite="no"` would delete the capture it meant
    to keep), so anything else is refused. (The QK_SNIFF_* words are for SniffConfig fields.)"""
    if not isinstance(value, bool):
        raise _invalid(name, value, "True or False")
    return value


_JSON_TYPES = "str, int, float, bool, None, or a list or str-keyed dict of them"


TOKENIZER_KEYS = ("tokenizer", "tokenizer_revision")


def check_source(source: Any) -> dict | None:
    """`source=`: None, or a dict of str keys to JSON values, recorded in the manifest and card. It is
    returned as the manifest will read it back (tuples as lists), so that a resumed run compares equal
    values; a value JSON would change or refuse (a key 1, NaN, bytes, a Path) is refused here."""
    if source is None:
        return None
    if not isinstance(source, dict):
        raise _invalid("source", source, f"a dict of str keys to JSON values ({_JSON_TYPES}), or None")
    bad = _not_json(source, "source")
    if bad is not None:
        raise ConfigError(
            f"source={reprlib.repr(source)} is invalid: {bad}; expected a dict of str keys to JSON values ({_JSON_TYPES})",
            setting="source",
            value=source,
            allowed=f"a dict of str keys to JSON values ({_JSON_TYPES}), or None",
        )
    for key in TOKENIZER_KEYS:  # read back by load(..., tokens=True): a name or path, and a revision
        if source.get(key) is not None and not (isinstance(source[key], str) and source[key].strip()):
            raise ConfigError(
                f"source[{key!r}]={reprlib.repr(source[key])} is invalid: expected a non-empty str (a tokenizer's "
                f"{'Hub id or folder' if key == 'tokenizer' else 'revision'}), or None",
                setting="source",
                value=source,
                allowed=f"source[{key!r}]: a non-empty str, or None",
            )
    return json.loads(json.dumps(source))


def _not_json(value: Any, where: str) -> str | None:
    """The first part of `value` that JSON cannot hold as it is (`source['a'] is nan`), None when all can."""
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value!r}"
    if isinstance(value, (list, tuple)):
        return next((bad for i, v in enumerate(value) if (bad := _not_json(v, f"{where}[{i}]"))), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has the key {key!r}, not a str"
            bad = _not_json(item, f"{where}[{key!r}]")
            if bad is not None:
                return bad
        return None
    return f"{where} is {reprlib.repr(value)}"


def check_vocabulary(vocabulary: Any) -> list | None:
    """`vocabulary=`: None, or the token strings by id (`token_str` of id i is item i; None for an
    id without a string). A str would be read as one token per character and a dict (token -> id,
    as `get_vocab()` gives it) as its keys in insertion order: both would give ids wrong strings."""
    if vocabulary is None:
        return None
    if hasattr(vocabulary, "tolist") and not isinstance(vocabulary, str):  # a numpy array
        vocabulary = vocabulary.tolist()
    allowed = (
        "a list of token strings indexed by token id (None for an id without one), e.g. "
        "tokenizer.convert_ids_to_tokens(range(len(tokenizer)))"
    )
    if not isinstance(vocabulary, (list, tuple)):
        got = {
            str: "a str would be one token per character",
            dict: "a dict (token -> id, as get_vocab() gives) is not by id",
        }
        why = next((v for t, v in got.items() if isinstance(vocabulary, t)), f"got type {type(vocabulary).__name__}")
        raise ConfigError(
            f"vocabulary={reprlib.repr(vocabulary)} is invalid: expected {allowed}; {why}",
            setting="vocabulary",
            value=vocabulary,
            allowed=allowed,
        )
    if not vocabulary:
        raise ConfigError(
            f"vocabulary={vocabulary!r} is invalid: expected {allowed}",
            setting="vocabulary",
            value=vocabulary,
            allowed=allowed,
        )
    bad = next((i for i, token in enumerate(vocabulary) if token is not None and not _utf8(token)), None)
    if bad is not None:
        what = (
            "not UTF-8 text (a lone surrogate), which Parquet cannot store" if isinstance(vocabulary[bad], str) else ""
        )
        raise ConfigError(
            f"vocabulary={reprlib.repr(vocabulary)} is invalid: item {bad} is {vocabulary[bad]!r}"
            f"{', ' + what if what else ''}; expected {allowed}",
            setting="vocabulary",
            value=vocabulary,
            allowed=allowed,
        )
    return list(vocabulary)


def _utf8(token) -> bool:
    """A str that UTF-8 can encode (a lone surrogate, as "\\ud800", cannot: Arrow refuses it in the saver)."""
    if not isinstance(token, str):
        return False
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
