"""The bucket chart (`buckets.png`) of a capture folder: rows per (example, head) in each sampler
bucket, observed from the manifest and expected from the sampler."""

from __future__ import annotations

from pathlib import Path

from qk_attn.sampler import Sampler
from qk_attn.storage.layout import key_name

KINDS = {"q": "query", "k": "key"}


def sampler_of(manifest: dict) -> dict:
    """The Sampler keywords a manifest records."""
    s = manifest["sampler"]
    return {
        "strategy": s["sampler"],
        "min_bucket_size": int(s["min_bucket_size"]),
        "base_rate": float(s["base_rate"]),
        "seed": int(s["seed"]),
    }


def _heads_that_ran(manifest: dict, kind: str) -> int:
    """(layer, head) pairs of `kind` the plan records and that received attention calls
    (cross-attention keys, which are vision tokens, are left out)."""
    plan = manifest.get("plan") or {}
    calls = manifest.get("calls", {})
    cross = set(manifest.get("cross_attention_layers", [])) if kind == "k" else set()
    table = plan.get("query_heads" if kind == "q" else "key_heads", {})
    return sum(
        1
        for layer, heads in table.items()
        for h in heads
        if int(layer) not in cross and calls.get(key_name(int(layer), h, kind), 0) > 0
    )


def per_example_head(manifest: dict) -> dict[int, dict[str, float]]:
    """bucket -> {"q": rows per (example, head), "k": ..., "expected": the sampler's expectation}.

    Observed: the manifest's committed rows of a bucket over (committed examples x heads that
    ran). Expected: the mean over the committed examples of keep probability x the bucket's
    overlap with [0, valid length) -- the same for q and k.
    """
    sampler = Sampler(**sampler_of(manifest))
    lengths = [int(v) for v in manifest.get("examples", {}).values()]
    buckets = manifest.get("buckets", {})
    if not lengths:
        return {}
    ids = {int(b) for counts in buckets.values() for b in counts}
    ids |= {b for b, *_ in sampler.bucket_bounds(max(lengths))}
    out: dict[int, dict[str, float]] = {}
    heads = {kind: _heads_that_ran(manifest, kind) for kind in "qk"}
    for b in sorted(ids):
        start, size = sampler.bucket_start(b), sampler.bucket_size(b)
        p = sampler.keep_probability(b)
        expected = sum(p * max(0, min(start + size, n) - start) for n in lengths) / len(lengths)
        row = {"expected": expected}
        for kind in "qk":
            if heads[kind]:
                row[kind] = buckets.get(kind, {}).get(str(b), 0) / (len(lengths) * heads[kind])
        out[b] = row
    return out


def bucket_chart(manifest: dict, path: Path) -> bool:
    """Rows per (example, head) in each sampler bucket, q and k side by side, with the sampler's
    expected value marked; a linear axis, so bar length is a count. False if nothing was committed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = per_example_head(manifest)
    if not table or not any(row.get(k) for row in table.values() for k in "qk"):
        return False
    sampler = Sampler(**sampler_of(manifest))
    ids = sorted(table)
    x = list(range(len(ids)))
    width_in, height_in = min(16, max(6, 0.5 * len(ids) + 2)), 4
    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)  # no pyplot: leaves the user's matplotlib state alone
    ax = figure.add_subplot()
    kinds = [k for k in "qk" if any(k in row for row in table.values())]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        offset = (i - (len(kinds) - 1) / 2) * width
        ax.bar([v + offset for v in x], [table[b].get(kind, 0) for b in ids], width, label=f"{KINDS[kind]} rows")
    ax.hlines(
        [table[b]["expected"] for b in ids],
        [v - 0.45 for v in x],
        [v + 0.45 for v in x],
        colors="black",
        linewidth=1.5,
        label="expected (sampler)",
    )
    step = max(1, len(ids) // 24)
    ax.set_xticks(
        x[::step],
        [f"{sampler.bucket_start(b):,}" for b in ids][::step],
        fontsize=7,
        rotation=45 if len(ids) > 12 else 0,
    )
    ax.set_xlabel("bucket (first position)")
    ax.set_ylabel("rows per (example, head)")
    top = max(max(row.get(k, 0) for k in ("q", "k", "expected")) for row in table.values())
    ax.set_ylim(0, top * 1.3 or 1)  # headroom for the legend, above the bars
    n = len(manifest.get("examples", {}))
    s = manifest["sampler"]
    ax.set_title(
        f"rows per (example, head) in each bucket, mean over {n} committed example{'s' if n != 1 else ''}\n"
        f"{s['sampler']} sampler, min_bucket_size {s['min_bucket_size']}, base_rate {float(s['base_rate']):g}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    # Fixed margins in inches (room for the labels and rotated ticks) instead of tight_layout, which
    # measures every text and was half of the chart's cost at a short capture's close.
    figure.subplots_adjust(
        left=0.8 / width_in,
        right=1 - 0.2 / width_in,
        bottom=(1.0 if len(ids) > 12 else 0.65) / height_in,
        top=1 - 0.6 / height_in,
    )
    figure.savefig(path)
    # matplotlib keeps the fonts it opened (open files) per thread id, up to 64 threads: each session's
    # saver thread draws its own chart and then ends, so a process that opens many sessions would hold
    # fonts of threads that are gone. Cleared here (they are opened again when needed).
    from matplotlib import font_manager

    clear = getattr(getattr(font_manager, "_get_font", None), "cache_clear", None)
    if clear is not None:
        clear()
    return True
