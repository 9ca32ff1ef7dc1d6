"""Layers and heads recorded versus the plan, and why each missing one is missing (the card's Coverage section).

`coverage` is the per-layer status table (`qk-sniff inspect` prints it); `coverage_text` writes it
as markdown for the dataset card.
"""

from __future__ import annotations

from qk_attn.storage.chart import KINDS
from qk_attn.storage.layout import key_name


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


def head_totals(plan: dict, cov: dict) -> list[str]:
    """Per kind: the (layer, head) pairs with rows, of those planned, and why the others are not recorded
    (the card's and `qk-sniff inspect`'s lines)."""
    active = [e for e in cov["layers"] if e["status"] != "excluded"]
    lines = []
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
            f" Not recorded: {KINDS[kind]} heads {ranges(sorted(hs))}: {why}." for why, hs in filtered.items()
        )
        lines.append(line)
    return lines


def coverage_text(manifest: dict, cov: dict) -> str:
    """The card's Coverage section from `coverage(manifest)`: totals, the per-layer table, what is missing."""
    plan = manifest.get("plan")
    if not plan:
        return cov["missing"][0]
    layers = cov["layers"]
    ran = [e["layer"] for e in layers if e["status"] == "ran"]
    expected = [e["layer"] for e in layers if e["status"] != "excluded"]
    lines = [
        f"Layers recorded: {len(ran)} of {plan['num_layers']} ({ranges(ran)}); expected by the plan: {len(expected)} "
        f"({ranges(expected)}).",
    ]
    lines += head_totals(plan, cov)
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
            notes += [f"{KINDS[kind]} heads {ranges(hs)}: {why}" for why, hs in by_reason.items()]
            if part["did_not_run"] and e["status"] == "ran":
                notes.append(f"{KINDS[kind]} heads {ranges(part['did_not_run'])}: planned, did not run")
            if part["no_rows"]:
                notes.append(f"{KINDS[kind]} heads {ranges(part['no_rows'])}: ran, no position sampled")
        if e["status"] == "did not run":
            notes.insert(0, "**did not run**: " + e["reason"])
        cell = lambda k: f"{len(e[k]['recorded'])}/{len(e[k]['expected'])} ({ranges(e[k]['recorded'])})"  # noqa: E731
        status = "ran, 0 rows" if e["status"] == "ran" and not e["rows"] else e["status"]
        rows.append([e["layer"], status, cell("q"), cell("k"), "; ".join(notes) or "complete"])
    lines.append(
        markdown_table(
            ["layer", "status", "query heads recorded/expected", "key heads recorded/expected", "missing, and why"],
            rows,
        )
    )
    if cov["missing"]:
        lines.append("Missing versus the plan:\n\n" + "\n".join(f"- {m}" for m in cov["missing"]))
    if manifest.get("cross_attention_layers"):
        lines.append(
            f"Cross-attention layers {ranges(manifest['cross_attention_layers'])}: their keys are vision "
            "tokens (`position` = vision token index, recorded once per sequence); their queries are text tokens."
        )
    unseen = [info["unseen_queries"] for info in manifest.get("example_info", {}).values() if "unseen_queries" in info]
    if unseen:
        layers = sorted({int(layer) for spans in unseen for layer in spans})
        lines.append(
            f"Layers {ranges(layers)} were given only the last queries of some forwards (Gemma 4's KV-shared layers "
            f"in a prefill, 1 query under `generate()`) in {len(unseen)} example(s): their query rows are those "
            "positions; the positions each did not get are in `qk_sniff.json` (`example_info`, `unseen_queries`), "
            "and `qk-sniff verify` holds the rows to the sampler's selection without them."
        )
    if plan.get("notes"):
        lines.append("Plan notes:\n\n" + "\n".join(f"- {n}" for n in plan["notes"]))
    return "\n\n".join(lines)


def ranges(values: list[int]) -> str:
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


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; a None cell reads "unknown"."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("unknown" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
