"""The dataset card (`README.md`) of a capture folder, built from its manifest.

The chart comes from qk_attn.storage.chart, the Buckets table from qk_attn.storage.card_buckets,
the Coverage section from qk_attn.storage.coverage.

YAML front matter: one `datasets` config per folder `l{LL}h{HH}{q|k}`, per layer and kind
(`layer{LL}_q`, `layer{LL}_k`) and per kind (`all_q`, `all_k`), each a `data_files` glob, so

    datasets.load_dataset(OUT_or_repo, "l03h01k", split="train")

works on the folder and on a Hub repo alike. Every number in the body comes from the
manifest, which the saver writes from the same tables it writes to the shards.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml
from huggingface_hub import DatasetCard, DatasetCardData

from qk_attn.sampler import Sampler
from qk_attn.storage.card_buckets import bucket_table
from qk_attn.storage.card_columns import head_dims, mixed_size_features, vector_text, vectors_text
from qk_attn.storage.card_infos import dataset_infos
from qk_attn.storage.chart import bucket_chart, sampler_of
from qk_attn.storage.coverage import coverage, coverage_text, markdown_table
from qk_attn.storage.folder import card_is_ours, signed_card
from qk_attn.storage.layout import CARD, CARD_SIGNATURE, CHART, KEY_RE, key_name, parse_key
from qk_attn.storage.manifest import manifest_digest, read_manifest
from qk_attn.storage.model_record import model_name
from qk_attn.storage.provenance import provenance_versions
from qk_attn.storage.settings import public_manifest, public_value

logger = logging.getLogger(__name__)


# The manifest a card was written from (as pushed, for a card naming a Hub repo): a card behind its
# manifest (a run killed before it wrote the card) is told apart by it (`card_problem`).
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
        names = [key for (this, _, k), key in keys if (this, k) == (layer, kind)]
        configs[f"layer{layer:02d}_{kind}"] = {"data_files": [{"split": "train", "path": _folders(names, layer=True)}]}
    for kind in sorted({kind for (_, _, kind), _ in keys}):
        names = [key for (_, _, k), key in keys if k == kind]
        configs[f"all_{kind}"] = {"data_files": [{"split": "train", "path": _folders(names, layer=False)}]}
    return configs


def _folders(names: list[str], layer: bool) -> str | list[str]:
    """Glob patterns of the key folders `names` (`l03h01k`) by their shape, with digits for the head number (and
    the layer's, unless `layer`): `l*h*k` would also read a copy beside them (`l00h00q.bak`, whose name ends in
    k) into a config, where verify looks at key folders only. One pattern per width of the numbers present."""
    digits = lambda number: "[0-9]" * len(number)  # noqa: E731
    shapes = set()
    for name in names:
        number_l, number_h, kind = KEY_RE.fullmatch(name).groups()
        shapes.add(f"l{number_l if layer else digits(number_l)}h{digits(number_h)}{kind}/*.parquet")
    ordered = sorted(shapes)
    return ordered[0] if len(ordered) == 1 else ordered


def render_card(
    manifest: dict, where: str, revision: str | None = None, chart: bool = True, dims: dict[str, int] | None = None
) -> DatasetCard:
    """The card for a capture whose manifest is `manifest`, loadable from `where` (path or repo id)."""
    return DatasetCard(card_text(manifest, where, revision, chart, dims))


def card_text(
    manifest: dict, where: str, revision: str | None = None, chart: bool = True, dims: dict[str, int] | None = None
) -> str:
    """`render_card`'s Markdown, YAML header included. Written as is at close: parsing it back
    into a DatasetCard and dumping it again would cost a second or more for a dense plan.
    `dims` (folder -> head size, `head_dims`) matters where folders differ in head size."""
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
    dims = {k: d for k, d in (dims or {}).items() if k in configs}
    infos = dataset_infos(manifest, configs, mixed_size_features(manifest, dims))
    if infos:
        data["dataset_info"] = infos

    total = {k: sum(n for key, n in rows.items() if key.endswith(k)) for k in "qk"}
    rev = f", revision={revision!r}" if revision else ""
    first = key_name(*keys[0]) if keys else "l00h00q"
    layer, head, kind = keys[0] if keys else (0, 0, "q")
    cov = coverage(manifest)

    parts = [
        f"# {data.pretty_name}",
        f"Query and key vectors recorded inside the attention calls of `{label}` by "
        f'qk-attn (`attn_implementation="qk_sniff"`): ' + vectors_text(config) + ", sampled over positions.",
        "## Contents",
        markdown_table(
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
        *_incomplete_text(manifest),
        "One config per `(layer, head, kind)` folder (`l03h01k`: layer 3, key head 1), per layer and kind "
        "(`layer03_q`, `layer03_k`) and per kind (`all_q`, `all_k`). Columns: `example_id` int64, `position` int32 "
        "(the RoPE position), `bucket` int32, `layer` int16, `head` int16, `kind` string, `sliding_window` int32 "
        f"(null on full-attention layers), `vector` {vector_text(manifest, dims)}"
        + _token_columns_text(manifest)
        + ".",
        "## Loading",
        "No committed example kept a row yet, so there is no `(layer, head, kind)` config to load."
        if not keys
        else "```python\nfrom datasets import load_dataset\n\n"
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
        markdown_table(
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
        markdown_table(
            ["setting", "value"],
            [[k, f"`{public_value(v)}`"] for k, v in sorted(source.items()) if v is not None and k != "weights"],
        )
        if source
        else "Not recorded.",
        "## Sampler",
        markdown_table(
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
        bucket_table(manifest, sampler, max_length),
    ]
    if chart:
        parts.append(f"![rows per bucket]({CHART})")
    parts += ["## Coverage", coverage_text(manifest, cov), "## Provenance", _provenance(manifest, max_length)]
    return f"---\n{_yaml(data)}\n---\n\n" + "\n\n".join(parts) + "\n"


def _token_columns_text(manifest: dict) -> str:
    columns = manifest.get("columns") or {}
    text = ""
    if columns.get("token_id"):
        text += (
            ", `token_id` int32 (the vocabulary id of the token at that position; null for vision keys and for "
            "tokens given as `inputs_embeds`)"
        )
    if columns.get("token_str"):
        text += ", `token_str` string (dictionary-encoded: the tokenizer's token for `token_id`)"
    return text


def _incomplete_text(manifest: dict) -> list[str]:
    """A merge of unfinished ranks (`--allow-incomplete`) says so where the contents are counted."""
    ranks = manifest.get("ranks") or {}
    if not ranks.get("incomplete"):
        return []
    return [
        f"**Incomplete:** merged with `qk-sniff merge --allow-incomplete` while ranks {ranks['incomplete']} of "
        f"{ranks['world_size']} had not finished their documents: the documents they did not reach are missing."
    ]


def _examples_section(examples_file: str | None, where: str, rev: str) -> list[str]:
    """From `example_id` back to the source document: the examples table, when the capture wrote it."""
    if not examples_file:
        return []
    return [
        "## Examples",
        f"`{examples_file}` (config `examples`) has one row per committed example: `example_id` int64 (as in every "
        "shard), `source_id` string (the source dataset's own id; null when the row number served as id), "
        "`source_index` int64 (the row in the split read: `train[3:5]`'s first row is 0), `valid_length` int64 (its valid tokens), "
        "`first_position` int64 (the smallest position among them).",
        "```python\n"
        f'examples = load_dataset({where!r}, "examples", split="train"{rev})\n'
        f"examples = qk_attn.load_examples({where!r}{rev})  # the same, as a pyarrow Table\n```",
    ]


def _revision(manifest: dict) -> str:
    """The weights' revision: the Hub commit, the configured revision, or what identifies them otherwise."""
    model, source = manifest.get("model") or {}, manifest.get("source") or {}
    if model.get("revision") or source.get("model_revision"):
        return model.get("revision") or source.get("model_revision")
    if source.get("weights"):
        return "the file and package version under weights"
    return "not recorded (a local folder, or a Hub model loaded without a commit hash)"


def _provenance(manifest: dict, max_length: int) -> str:
    versions, releases = provenance_versions(manifest)  # several releases: a table of their own
    model = manifest.get("model") or {}
    source = manifest.get("source") or {}
    rows = [["model", model_name(model)], ["model revision", _revision(manifest)]]
    if source.get("weights"):
        rows.append(["weights", source["weights"]])
    rows += versions
    rows += [
        ["model dtype", model.get("dtype")],
        ["max valid length", f"{max_length:,}"],
        ["created", manifest.get("created")],
        ["updated", manifest.get("updated")],
    ]
    config = {k: val for k, val in manifest.get("config", {}).items() if k != "output"}
    return (
        markdown_table(["", ""], rows)
        + (f"\n\n{releases}" if releases else "")
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
) -> Path | None:
    """Write OUT/README.md (and OUT/buckets.png) from the manifest; returns the card's path, or None
    when OUT/README.md is someone else's (folder.card_is_ours), which is never overwritten."""
    output = Path(output)
    manifest = manifest if manifest is not None else read_manifest(output)
    if manifest is None:
        raise FileNotFoundError(f"{output} has no qk_sniff.json: not a capture folder")
    if not card_is_ours(output):  # checked here, for every writer: close, repair, merge, push
        logger.warning(
            "qk-sniff: %s/README.md was not written by qk-sniff, or was edited since; the dataset card is not "
            "written (delete README.md to have it written)",
            output,
        )
        return None
    written_from = CARD_SIGNATURE.format(manifest_digest(public_manifest(manifest) if repo_id else manifest))
    chart = bucket_chart(manifest, output / CHART)
    # A local card names the folder relative to where it sits: no absolute path is published.
    where = repo_id or output.resolve().name
    text = card_text(manifest, where, revision if repo_id else None, chart, head_dims(output, manifest))
    # Written whole or not at all: a card cut short by a kill would fail its signature and then count
    # as the user's own (never rewritten).
    text += written_from + "\n"
    partial = output / f".{CARD}.tmp"
    with open(partial, "w", newline="", encoding="utf-8") as f:
        f.write(signed_card(text))
    os.replace(partial, output / CARD)
    return output / CARD


def card_problem(output: str | Path, manifest: dict) -> str | None:
    """What is wrong with OUT/README.md for `manifest`: missing (datasets.load_dataset then finds none
    of the configs), or one of ours written from another manifest (its counts and configs are
    behind); None when it is right, is the user's own, or predates the manifest line."""
    import re

    output = Path(output)
    path = output / CARD
    if not path.is_file():
        return f"{CARD} (the dataset card, which names the configs datasets.load_dataset reads) is missing"
    if not card_is_ours(output):
        return None
    found = re.search(CARD_SIGNATURE.format("([0-9a-f]{64})"), path.read_text(encoding="utf-8"))
    if found and found[1] not in (manifest_digest(manifest), manifest_digest(public_manifest(manifest))):
        return f"{CARD} was written from an earlier manifest (a run stopped before it wrote the card): its counts and configs are behind"
    return None
