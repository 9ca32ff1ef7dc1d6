"""How a run configuration's text is read: YAML whose numbers are plain decimal, with a key written twice
refused (PyYAML keeps the last silently), and the `--set section.key=value` overrides applied to it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import yaml

from qk_attn.errors import ConfigError
from qk_attn.run.sections import SECTIONS, unknown_key


class _PlainNumbers(yaml.SafeLoader):
    """YAML 1.1 reads 010 as 8 (octal), 0x10 as 16, 1_0 as 10, +4 as 4 and 1:30 as 90 (base 60). A run's
    numbers are plain decimal: other forms stay text, which the sections refuse in one line, as they
    refuse them quoted."""


_PlainNumbers.yaml_implicit_resolvers = {
    first: [
        (tag, pattern) for tag, pattern in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_PlainNumbers.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^-?(0|[1-9][0-9]*)$"), list("-0123456789"))
_PlainNumbers.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^-?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+.0123456789"),
)


def load_yaml(text: str, where: str, prefix: str = ""):
    """The YAML `text` (a SafeLoader: no Python objects). A key given twice in one mapping, at any
    depth, is a ConfigError naming `where`, the key's path (below `prefix`, the `--set` key) and,
    for a file, both lines: PyYAML would keep the last one and drop the other without a word."""
    loader = _PlainNumbers(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, prefix, where, lines=not prefix, walked=set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: str, where: str, lines: bool, walked: set[int]) -> None:
    if id(node) in walked:  # an alias of a node walked already
        return
    walked.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{index}]", where, lines, walked)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):  # a complex key (`? [a, b]`): no setting has one
                _refuse_duplicate_keys(value, path, where, lines, walked)
                continue
            name = f"{path}.{key.value}" if path else key.value
            if (key.tag, key.value) in first:
                at = f" (lines {first[key.tag, key.value].start_mark.line + 1} and {key.start_mark.line + 1})"
                raise ConfigError(f"{where}: key {name!r} appears twice{at if lines else ''}; keep one")
            first[key.tag, key.value] = key
            _refuse_duplicate_keys(value, name, where, lines, walked)


def deep_copy(data: Mapping) -> dict:
    return {k: deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


# What a scalar written for a mapping setting means, as a mapping (RunConfig reads both forms alike).
SHORTHAND_KEYS = {
    "sampler": lambda name: {"type": name} if isinstance(name, str) else {},
    "head_sampling": lambda count: {"count": count} if isinstance(count, int) and not isinstance(count, bool) else {},
}


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
        raise unknown_key(section, f"--set {item!r} (sections)", list(SECTIONS))
    known = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in known:
        raise unknown_key(key, f"section {section!r} (--set {item!r})", known)
    try:
        value = load_yaml(raw, f"--set {item!r}", ".".join(parts)) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    target = data.setdefault(section, {})
    if target is None:
        target = data[section] = {}
    for part in parts[1:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            # A shorthand keeps its meaning: capture.sampler=uniform then capture.sampler.base_rate=2 keeps
            # the name as `type`; head_sampling: 300 then capture.head_sampling.seed=5 keeps 300 as `count`.
            nxt = SHORTHAND_KEYS[part](nxt) if part in SHORTHAND_KEYS else {}
            target[part] = nxt
        target = nxt
    target[parts[-1]] = value
