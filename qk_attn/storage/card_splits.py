"""What a dataset card says of each config's size: `dataset_info` entries with its rows and bytes.

`datasets.load_dataset(OUT, name)` keys its cache of a local folder on the card's YAML (the config
names and `data_files` globs, not the files they match): two captures with the same head plan had
the same key, so a second capture in a folder of the same name, or the same folder after a resume
or a repair, was read from the first one's cache, silently. With each config's committed bytes in
the YAML, the key follows what was committed."""

from __future__ import annotations

from qk_attn.storage.layout import parse_key


def config_sizes(manifest: dict, configs: dict[str, dict]) -> dict[str, dict]:
    """Config name -> its `dataset_info` field `download_size` (the bytes of its committed files), for the
    names in `configs`. (A split's rows would need its size in Arrow bytes too, which is not known here.)"""
    info = manifest.get("shard_info") or {}
    totals: dict[str, int] = {}
    for key, names in manifest.get("shards", {}).items():
        layer, _, kind = parse_key(key)
        for name in names:
            shard = info.get(f"{key}/{name}") or {}
            for config in (key, f"layer{layer:02d}_{kind}", f"all_{kind}"):
                totals[config] = totals.get(config, 0) + int(shard.get("bytes", 0))
    sizes = {config: {"download_size": size} for config, size in totals.items() if config in configs}
    examples = manifest.get("examples_file") or {}
    if "examples" in configs and "bytes" in examples:
        sizes["examples"] = {"download_size": int(examples["bytes"])}
    return sizes
