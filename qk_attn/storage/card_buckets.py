"""The dataset card's Buckets table (qk_attn.storage.card), from the manifest and the sampler.

One row per bucket the sampler defines up to the longest example, or that holds rows: its positions,
size and keep probability, the query and key rows recorded in it, and those rows per example-head
next to the sampler's expectation (qk_attn.storage.chart.per_example_head, the chart's numbers).
"""

from __future__ import annotations

from qk_attn.sampler import Sampler
from qk_attn.storage.chart import per_example_head
from qk_attn.storage.coverage import markdown_table


def bucket_table(manifest: dict, sampler: Sampler, max_length: int) -> str:
    """The Markdown under the card's "### Buckets": the table and the note on how it counts."""
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
    return markdown_table(
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
        + (
            " Query rows fall short of it where layers were given only a forward's last queries (see Coverage): the "
            "positions they did not get are not recorded."
            if any("unseen_queries" in info for info in manifest.get("example_info", {}).values())
            else ""
        )
    )
