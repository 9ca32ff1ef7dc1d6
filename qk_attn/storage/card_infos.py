"""What a dataset card says of each config's files: `dataset_info` entries with their bytes and digest.

`datasets.load_dataset(OUT, name)` keys its cache of a local folder on the card's YAML (the config
names and `data_files` globs, not the files they match): two captures with the same head plan had
the same key, so a second capture in a folder of the same name, or the same folder after a resume,
a repair or an overwrite, was read from the first one's cache, silently. Each config's committed
bytes (`download_size`) and a digest of its shards' sha256 (`description`, which `datasets` reads
into the same key) make the key follow what was committed."""

from __future__ import annotations

import hashlib

from qk_attn.storage.layout import parse_key


def dataset_infos(manifest: dict, configs: dict[str, dict], features: list[dict]) -> list[dict]:
    """The card's `dataset_info`: per config, its files' fields merged with its `features` entry (configs
    that mix head sizes, card_columns.mixed_size_features)."""
    by_name = {entry["config_name"]: entry for entry in features}
    files = config_infos(manifest, configs)
    return [
        {"config_name": name, **by_name.get(name, {}), **files.get(name, {})}
        for name in sorted(configs)
        if name in by_name or name in files
    ]


def config_infos(manifest: dict, configs: dict[str, dict]) -> dict[str, dict]:
    """Config name -> its `dataset_info` fields, for the names in `configs` whose files the manifest lists."""
    info = manifest.get("shard_info") or {}
    files: dict[str, list[tuple[str, dict]]] = {}
    for key, names in manifest.get("shards", {}).items():
        layer, _, kind = parse_key(key)
        for name in names:
            path = f"{key}/{name}"
            for config in (key, f"layer{layer:02d}_{kind}", f"all_{kind}"):
                files.setdefault(config, []).append((path, info.get(path) or {}))
    examples = manifest.get("examples_file") or {}
    if "name" in examples:
        files["examples"] = [(examples["name"], examples)]
    return {config: _fields(listed) for config, listed in files.items() if config in configs}


def _fields(listed: list[tuple[str, dict]]) -> dict:
    digest = hashlib.sha256("".join(f"{path} {record.get('sha256')}\n" for path, record in sorted(listed)).encode())
    return {
        "description": f"qk-sniff shards sha256 {digest.hexdigest()}",
        "download_size": sum(int(record.get("bytes", 0)) for _, record in listed),
    }
