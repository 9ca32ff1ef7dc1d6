"""The dataset card (`README.md`) of a capture folder, built from its manifest (the chart: qk_attn.storage.chart).

YAML front matter: one `datasets` config per folder `l{LL}h{HH}{q|k}`, per layer and kind
(`layer{LL}_q`, `layer{LL}_k`) and per kind (`all_q`, `all_k`), each a `data_files` glob, so

    datasets.load_dataset(OUT_or_repo, "l03h01k", split="train")

works on the folder and on a Hub repo alike. Every number in the body comes from the
manifest, which the saver writes from the same tables it writes to the shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import DatasetCard, DatasetCardData

from qk_attn.sampler import Sampler
from qk_attn.storage.chart import KINDS, bucket_chart, per_example_head, sampler_of
from qk_attn.storage.layout import CARD, CHART, key_name, parse_key
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.settings import public_value


def dataset_configs(shards: dict[str, list[str]], examples_file: str | None = None) -> dict[str, dict]:
    """`configs:` entries for every folder with committed shards, every layer and kind, each kind,
    and `examples` (one row per committed example) when the capture wrote that table. The card
    lists them sorted by name, as `datasets`' MetadataConfigs writes them (no `datasets` import:
    a capture closes without it)."""
    keys = sorted((parse_key(k), k) for k, names in shards.items() if names)
    configs: dict[str, dict] = {}
    if examples_file:
        configs["examples"] = {"data_files": [{"split": "train", "path": examples_file}]}
    for (_, _, _), key in keys:
        configs[key] = {"data_files": [{"split": "train", "path": f"{key}/*.parquet"}]}
    for layer, kind in sorted({(layer, kind) for (layer, _, kind), _ in keys}):
        configs[f"layer{layer:02d}_{kind}"] = {
            "data_files": [{"split": "train", "path": f"l{layer:02d}h*{kind}/*.parquet"}]
        }
    for kind in sorted({kind for (_, _, kind), _ in keys}):
        configs[f"all_{kind}"] = {"data_files": [{"split": "train", "path": f"l*h*{kind}/*.parquet"}]}
    return configs


def coverage(manifest: dict) -> dict:
    """Layers and heads recorded versus expected, with the reason for each one missing.

    Returns {"layers": [{layer, status, reason, q: {...}, k: {...}}], "missing": [lines]} where
    q/k hold expected heads, recorded heads (rows > 0), heads that ran without a sampled row,
    heads that did not run, and the heads the filters left out, with why.
    """
    plan = manifest.get("plan")
    config = manifest.get("config", {})
    rows = manifest.get("row_counts", {})
    calls = manifest.get("calls", {})
    if not plan:
        return {"layers": [], "missing": ["no attention call was captured: the model never ran with this output"]}
    counts = {"q": plan["num_heads"], "k": plan["num_kv_heads"]}
    kinds = config.get("capture", "q,k").split(",")
    layers, missing = [], []
    for layer in range(plan["num_layers"]):
        entry: dict = {"layer": layer}
        reason = plan["excluded_layers"].get(str(layer))
        if reason:
            entry.update(status="excluded", reason=reason)
            missing.append(f"layer {layer}: not recorded ({reason})")
            layers.append(entry)
            continue
        layer_calls = sum(calls.get(key_name(layer, h, k), 0) for k in "qk" for h in range(counts[k]))
        entry["status"] = "ran" if layer_calls else "did not run"
        for kind in "qk":
            planned = plan["query_heads" if kind == "q" else "key_heads"].get(str(layer), [])
            recorded = [h for h in planned if rows.get(key_name(layer, h, kind), 0) > 0]
            empty = [h for h in planned if h not in recorded and calls.get(key_name(layer, h, kind), 0) > 0]
            not_run = [h for h in planned if calls.get(key_name(layer, h, kind), 0) == 0]
            filtered = {h: _filter_reason(kind, h, config, kinds) for h in range(counts[kind]) if h not in planned}
            entry[kind] = {
                "expected": planned,
                "recorded": recorded,
                "no_rows": empty,
                "did_not_run": not_run,
                "filtered": filtered,
            }
        if not layer_calls:
            entry["reason"] = "planned, but no attention call was recorded for this layer"
            missing.append(f"layer {layer}: did not run ({entry['reason']})")
            layers.append(entry)
            continue
        entry["rows"] = sum(rows.get(key_name(layer, h, k), 0) for k in "qk" for h in entry[k]["expected"])
        if not entry["rows"]:
            missing.append(f"layer {layer}: ran, 0 rows (the sampler kept no position of its planned heads)")
        for kind in "qk":
            part = entry[kind]
            if part["did_not_run"]:
                missing.append(
                    f"layer {layer} {KINDS[kind]} heads {part['did_not_run']}: planned, no attention call recorded"
                )
            if part["no_rows"] and entry["rows"]:
                missing.append(
                    f"layer {layer} {KINDS[kind]} heads {part['no_rows']}: ran, but the sampler kept no position"
                )
        layers.append(entry)
    return {"layers": layers, "missing": missing}


def _filter_reason(kind: str, head: int, config: dict, kinds: list[str]) -> str:
    if kind not in kinds:
        return f"{KINDS[kind]} vectors not captured (capture={config.get('capture')})"
    chosen = config.get("heads" if kind == "q" else "key_heads")
    if chosen is not None and head not in chosen:
        return f"not in the {'heads' if kind == 'q' else 'key_heads'} filter {chosen}"
    if kind == "q" and config.get("head_sample_count"):
        return (
            f"not drawn by head sampling (count {config['head_sample_count']}, seed {config.get('head_sample_seed')})"
        )
    if kind == "k":
        return "no recorded query head in its GQA group"
    return "not planned"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, values = [], sorted(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out) if out else "none"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("unknown" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(manifest: dict, where: str, revision: str | None = None, chart: bool = True) -> DatasetCard:
    """The card for a capture whose manifest is `manifest`, loadable from `where` (path or repo id)."""
    return DatasetCard(card_text(manifest, where, revision, chart))


def card_text(manifest: dict, where: str, revision: str | None = None, chart: bool = True) -> str:
    """`render_card`'s Markdown, YAML header included. Written as is at close: parsing it back
    into a DatasetCard and dumping it again would cost a second or more for a dense plan."""
    model = manifest.get("model") or {}
    source = manifest.get("source") or {}
    config = manifest.get("config", {})
    rows = manifest.get("row_counts", {})
    examples = manifest.get("examples", {})
    plan = manifest.get("plan") or {}
    sampler = Sampler(**sampler_of(manifest))
    max_length = max([int(v) for v in examples.values()] + [0])
    keys = sorted(parse_key(k) for k, names in manifest.get("shards", {}).items() if names)

    label = public_value(model.get("id")) or model.get("model_type") or "unknown model"
    data = DatasetCardData(
        pretty_name=f"qk-sniff: {label} query/key vectors",
        tags=["qk-attn", "attention", "interpretability", "query-key"],
    )
    examples_file = (manifest.get("examples_file") or {}).get("name")
    configs = dataset_configs(manifest.get("shards", {}), examples_file)
    data["configs"] = [{"config_name": name, **config} for name, config in sorted(configs.items())]

    total = {k: sum(n for key, n in rows.items() if key.endswith(k)) for k in "qk"}
    rev = f", revision={revision!r}" if revision else ""
    first = key_name(*keys[0]) if keys else "l00h00q"
    layer, head, kind = keys[0] if keys else (0, 0, "q")
    cov = coverage(manifest)

    parts = [
        f"# {data.pretty_name}",
        f"Query and key vectors recorded inside the attention calls of `{label}` by "
        f'qk-attn (`attn_implementation="qk_sniff"`): the exact vectors the model\'s attention '
        f"used ({'after' if config.get('rope', 'post') == 'post' else 'before'} RoPE), sampled over positions.",
        "## Contents",
        _table(
            ["examples", "valid tokens", "max length", "query rows", "key rows", "configs"],
            [
                [
                    len(examples),
                    f"{sum(int(v) for v in examples.values()):,}",
                    f"{max_length:,}",
                    f"{total['q']:,}",
                    f"{total['k']:,}",
                    f"{len(configs)} ({len(keys)} heads, {len(configs) - len(keys) - bool(examples_file)} "
                    f"per layer or kind{', examples' if examples_file else ''})",
                ]
            ],
        ),
        "One config per `(layer, head, kind)` folder (`l03h01k`: layer 3, key head 1), per layer and kind "
        "(`layer03_q`, `layer03_k`) and per kind (`all_q`, `all_k`). Columns: `example_id` int64, `position` int32 "
        "(the RoPE position), `bucket` int32, `layer` int16, `head` int16, `kind` string, `sliding_window` int32 "
        f"(null on full-attention layers), `vector` fixed-size list of {manifest.get('vector_dtype', 'float32')} "
        f"[{plan.get('head_dim', 'head_dim')}]" + _token_columns_text(manifest) + ".",
        "## Loading",
        "```python\nfrom datasets import load_dataset\n\n"
        f"ds = load_dataset({where!r}, {first!r}, split=\"train\"{rev})  # one head; 'layer{layer:02d}_{kind}', 'all_{kind}' for more\n\n"
        "import qk_attn\n\n"
        f"table = qk_attn.load({where!r}, layer={layer}, head={head}, kind={kind!r}{rev})  # pyarrow Table\n"
        f"vectors = qk_attn.load_vectors({where!r}, layer={layer}, head={head}, kind={kind!r}{rev})  # (N, head_dim) torch tensor\n"
        + (
            f"tokens = qk_attn.load({where!r}, layer={layer}, head={head}, kind={kind!r}{rev}, tokens=True)  "
            "# + `token`: token_id decoded with the recorded tokenizer\n"
            if (manifest.get("columns") or {}).get("token_id") and (manifest.get("source") or {}).get("tokenizer")
            else ""
        )
        + "```",
        *_examples_section(examples_file, where, rev),
        "## Model",
        _table(
            ["model", "revision", "dtype", "type", "layers", "query heads", "key heads", "head dim"],
            [
                [
                    label,
                    _revision(manifest),
                    model.get("dtype"),
                    model.get("model_type"),
                    plan.get("num_layers"),
                    plan.get("num_heads"),
                    plan.get("num_kv_heads"),
                    plan.get("head_dim"),
                ]
            ],
        ),
        "## Source dataset",  # (sorted: the same card whether the manifest was just built or read back)
        _table(
            ["setting", "value"],
            [[k, f"`{public_value(v)}`"] for k, v in sorted(source.items()) if v is not None and k != "weights"],
        )
        if source
        else "Not recorded.",
        "## Sampler",
        _table(
            ["strategy", "min_bucket_size", "base_rate", "seed", "RoPE stage", "captured", "vector dtype"],
            [
                [
                    sampler.strategy,
                    sampler.min_bucket_size,
                    sampler.base_rate,
                    sampler.seed,
                    config.get("rope"),
                    config.get("capture"),
                    manifest.get("vector_dtype"),
                ]
            ],
        ),
        "A token is kept iff a 24-bit hash of (seed, example_id, layer, kind, position) is below its bucket's "
        "threshold: the same positions for every head of a layer, independent of batching and padding.",
        "### Buckets",
        _bucket_table(manifest, sampler, max_length),
    ]
    if chart:
        parts.append(f"![rows per bucket]({CHART})")
    parts += ["## Coverage", _coverage_text(manifest, cov), "## Provenance", _provenance(manifest, max_length)]
    return f"---\n{_yaml(data)}\n---\n\n" + "\n\n".join(parts) + "\n"


def _token_columns_text(manifest: dict) -> str:
    columns = manifest.get("columns") or {}
    text = ""
    if columns.get("token_id"):
        text += ", `token_id` int32 (the vocabulary id of the token at that position; null for vision keys)"
    if columns.get("token_str"):
        text += ", `token_str` string (dictionary-encoded: the tokenizer's token for `token_id`)"
    return text


def _examples_section(examples_file: str | None, where: str, rev: str) -> list[str]:
    """From `example_id` back to the source document: the examples table, when the capture wrote it."""
    if not examples_file:
        return []
    return [
        "## Examples",
        f"`{examples_file}` (config `examples`) has one row per committed example: `example_id` int64 (as in every "
        "shard), `source_id` string (the source dataset's own id; null when the row number served as id), "
        "`source_index` int64 (the row in the source dataset), `valid_length` int64 (its valid tokens), "
        "`first_position` int64 (the smallest position among them).",
        "```python\n"
        f'examples = load_dataset({where!r}, "examples", split="train"{rev})\n'
        f"examples = qk_attn.load_examples({where!r}{rev})  # the same, as a pyarrow Table\n```",
    ]


def _bucket_table(manifest: dict, sampler: Sampler, max_length: int) -> str:
    buckets = manifest.get("buckets", {})
    seen = {int(b) for counts in buckets.values() for b in counts}
    bounds = {b: (s, e, p) for b, s, e, p in sampler.bucket_bounds(max(max_length, 1))}
    per = per_example_head(manifest)
    cell = lambda b, k: f"{per[b][k]:.2f}" if b in per and k in per[b] else "-"  # noqa: E731
    rows = []
    for b in sorted(set(bounds) | seen):
        start = sampler.bucket_start(b)
        end = start + sampler.bucket_size(b)
        rows.append(
            [
                b,
                f"[{start:,}, {end:,})",
                f"{sampler.bucket_size(b):,}",
                f"{sampler.keep_probability(b):.6g}",
                f"{buckets.get('q', {}).get(str(b), 0):,}",
                f"{buckets.get('k', {}).get(str(b), 0):,}",
                cell(b, "q"),
                cell(b, "k"),
                cell(b, "expected"),
            ]
        )
    return _table(
        [
            "bucket",
            "positions",
            "size",
            "keep probability",
            "query rows",
            "key rows",
            "query rows per example-head",
            "key rows per example-head",
            "expected per example-head",
        ],
        rows,
    ) + (
        "\n\nPer example-head: rows over (committed examples x (layer, head) pairs that ran); expected: the "
        "sampler's keep probability x the bucket's overlap with each example's valid length, averaged over examples."
    )


def _coverage_text(manifest: dict, cov: dict) -> str:
    plan = manifest.get("plan")
    if not plan:
        return cov["missing"][0]
    layers = cov["layers"]
    ran = [e["layer"] for e in layers if e["status"] == "ran"]
    expected = [e["layer"] for e in layers if e["status"] != "excluded"]
    lines = [
        f"Layers recorded: {len(ran)} of {plan['num_layers']} ({_ranges(ran)}); expected by the plan: {len(expected)} "
        f"({_ranges(expected)}).",
    ]
    active = [e for e in layers if e["status"] != "excluded"]
    for kind, total in (("q", plan["num_heads"]), ("k", plan["num_kv_heads"])):
        expected_pairs = sum(len(e[kind]["expected"]) for e in active)
        recorded_pairs = sum(len(e[kind]["recorded"]) for e in active)
        line = (
            f"{KINDS[kind].capitalize()} heads: {recorded_pairs} (layer, head) pairs with rows, of {expected_pairs} "
            f"planned ({total} per layer in the model)."
        )
        filtered: dict[str, set[int]] = {}
        for e in active:
            for h, why in e[kind]["filtered"].items():
                filtered.setdefault(why, set()).add(h)
        line += "".join(
            f" Not recorded: {KINDS[kind]} heads {_ranges(sorted(hs))}: {why}." for why, hs in filtered.items()
        )
        lines.append(line)
    rows = []
    for e in layers:
        if e["status"] == "excluded":
            rows.append([e["layer"], "excluded", "-", "-", e["reason"]])
            continue
        notes = []
        for kind in "qk":
            part = e[kind]
            by_reason: dict[str, list[int]] = {}
            for h, why in part["filtered"].items():
                by_reason.setdefault(why, []).append(h)
            notes += [f"{KINDS[kind]} heads {_ranges(hs)}: {why}" for why, hs in by_reason.items()]
            if part["did_not_run"] and e["status"] == "ran":
                notes.append(f"{KINDS[kind]} heads {_ranges(part['did_not_run'])}: planned, did not run")
            if part["no_rows"]:
                notes.append(f"{KINDS[kind]} heads {_ranges(part['no_rows'])}: ran, no position sampled")
        if e["status"] == "did not run":
            notes.insert(0, "**did not run**: " + e["reason"])
        cell = lambda k: f"{len(e[k]['recorded'])}/{len(e[k]['expected'])} ({_ranges(e[k]['recorded'])})"  # noqa: E731
        status = "ran, 0 rows" if e["status"] == "ran" and not e["rows"] else e["status"]
        rows.append([e["layer"], status, cell("q"), cell("k"), "; ".join(notes) or "complete"])
    lines.append(
        _table(
            ["layer", "status", "query heads recorded/expected", "key heads recorded/expected", "missing, and why"],
            rows,
        )
    )
    if cov["missing"]:
        lines.append("Missing versus the plan:\n\n" + "\n".join(f"- {m}" for m in cov["missing"]))
    if manifest.get("cross_attention_layers"):
        lines.append(
            f"Cross-attention layers {_ranges(manifest['cross_attention_layers'])}: their keys are vision "
            "tokens (`position` = vision token index, recorded once per sequence); their queries are text tokens."
        )
    if plan.get("notes"):
        lines.append("Plan notes:\n\n" + "\n".join(f"- {n}" for n in plan["notes"]))
    return "\n\n".join(lines)


def _revision(manifest: dict) -> str:
    """The weights' revision: the Hub commit, the configured revision, or what identifies them otherwise."""
    model, source = manifest.get("model") or {}, manifest.get("source") or {}
    if model.get("revision") or source.get("model_revision"):
        return model.get("revision") or source.get("model_revision")
    if source.get("weights"):
        return "the file and package version under weights"
    return "not recorded (a local folder, or a Hub model loaded without a commit hash)"


def _provenance(manifest: dict, max_length: int) -> str:
    v = manifest.get("versions", {})
    model = manifest.get("model") or {}
    source = manifest.get("source") or {}
    rows = [["model", public_value(model.get("id"))], ["model revision", _revision(manifest)]]
    if source.get("weights"):
        rows.append(["weights", source["weights"]])
    rows += [[name, f"`{version}`"] for name, version in sorted(v.items())]
    rows += [
        ["model dtype", model.get("dtype")],
        ["max valid length", f"{max_length:,}"],
        ["created", manifest.get("created")],
        ["updated", manifest.get("updated")],
    ]
    config = {k: val for k, val in manifest.get("config", {}).items() if k != "output"}
    return (
        _table(["", ""], rows)
        + "\n\nFull capture configuration:\n\n```json\n"
        + json.dumps(config, indent=1, sort_keys=True)
        + "\n```"
    )


def _yaml(data: DatasetCardData) -> str:
    """`data.to_yaml()`, emitted by libyaml when PyYAML has it (10x faster for a dense plan's
    hundreds of configs; tests check that both give the same text)."""
    dumper = getattr(yaml, "CDumper", yaml.Dumper)
    return yaml.dump(data.to_dict(), Dumper=dumper, allow_unicode=True, sort_keys=False).strip()


def write_card(
    output: str | Path, manifest: dict | None = None, repo_id: str | None = None, revision: str | None = None
) -> Path:
    """Write OUT/README.md (and OUT/buckets.png) from the manifest; returns the card's path."""
    output = Path(output)
    manifest = manifest if manifest is not None else read_manifest(output)
    if manifest is None:
        raise FileNotFoundError(f"{output} has no qk_sniff.json: not a capture folder")
    chart = bucket_chart(manifest, output / CHART)
    # A local card names the folder relative to where it sits: no absolute path is published.
    text = card_text(manifest, repo_id or output.resolve().name, revision if repo_id else None, chart)
    with open(output / CARD, "w", newline="", encoding="utf-8") as f:
        f.write(text)
    return output / CARD
