"""What a dataset card says of the `vector` column: what the vectors are (after RoPE, or RoPE
inverted), and where layers differ in head size (Gemma 4's global layers) each folder's head size,
read from its first shard's schema, the `dataset_info` features that let `datasets` load configs
that mix sizes, and the column's description."""

from __future__ import annotations

from pathlib import Path

from qk_attn.storage.layout import parse_key


def head_dims(output: str | Path, manifest: dict) -> dict[str, int]:
    """Folder name -> the head size of its vectors, from the schema of its first committed shard
    (a footer read; folders whose shard cannot be read are left out)."""
    import pyarrow.parquet as pq

    dims = {}
    for key, names in manifest.get("shards", {}).items():
        try:
            dims[key] = pq.read_schema(Path(output) / key / names[0]).field("vector").type.list_size
        except (IndexError, OSError, KeyError, AttributeError, ValueError):  # no shard, or not readable
            continue
    return dims


def mixed_size_features(manifest: dict, dims: dict[str, int]) -> list[dict]:
    """`dataset_info` entries for the configs whose folders differ in head size (Gemma 4's global
    layers): their `vector` is a variable-length list, as in qk_attn.load, so that `datasets`
    can put the folders in one table (it cannot concatenate fixed-size lists of different sizes)."""
    groups: dict[str, set[int]] = {}
    for key, dim in dims.items():
        layer, _, kind = parse_key(key)
        for name in (f"layer{layer:02d}_{kind}", f"all_{kind}"):
            groups.setdefault(name, set()).add(dim)
    columns = manifest.get("columns") or {}
    features = [
        {"name": name, "dtype": dtype}
        for name, dtype in (
            ("example_id", "int64"),
            ("position", "int32"),
            ("bucket", "int32"),
            ("layer", "int16"),
            ("head", "int16"),
            ("kind", "string"),
            ("sliding_window", "int32"),
        )
    ]
    features.append({"name": "vector", "list": manifest.get("vector_dtype", "float32")})
    features += [{"name": "token_id", "dtype": "int32"}] * bool(columns.get("token_id"))
    features += [{"name": "token_str", "dtype": "string"}] * bool(columns.get("token_str"))
    return [  # a copy each: the same object twice would be written as a YAML alias
        {"config_name": name, "features": [dict(f) for f in features]}
        for name, sizes in sorted(groups.items())
        if len(sizes) > 1
    ]


def vector_text(manifest: dict, dims: dict[str, int]) -> str:
    """The `vector` column's type; where layers differ in head size, each size and its layers."""
    dtype = manifest.get("vector_dtype", "float32")
    layers: dict[int, set[int]] = {}
    for key, dim in dims.items():
        layers.setdefault(dim, set()).add(parse_key(key)[0])
    if len(layers) < 2:
        return f"fixed-size list of {dtype} [{next(iter(layers), (manifest.get('plan') or {}).get('head_dim', 'head_dim'))}]"
    sizes = "; ".join(f"[{dim}] in layers {', '.join(map(str, sorted(ls)))}" for dim, ls in sorted(layers.items()))
    return (
        f"fixed-size list of {dtype}: {sizes} (configs that mix head sizes, such as `all_q`, give a "
        "variable-length list)"
    )


def vectors_text(config: dict) -> str:
    """What the recorded vectors are, by the capture's `rope` setting."""
    if config.get("rope", "post") == "post":
        return "the exact vectors the model's attention used (after RoPE)"
    return (
        "the vectors before RoPE (`rope=pre`: RoPE inverted on the vectors attention used, equal to the "
        "projections' outputs up to rounding, not bit for bit)"
    )
