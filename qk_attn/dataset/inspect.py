"""`qk-sniff inspect`: a capture folder's rows, coverage, buckets and plot, as printable lines."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qk_attn.dataset.progress import bar
from qk_attn.dataset.reader import Dataset
from qk_attn.storage.coverage import coverage, head_totals
from qk_attn.storage.model_record import model_name


def inspect_dataset(root: str | Path, progress: bool = True) -> list[str]:
    """Rows, coverage, bucket distribution and plot path, as printable lines (from the files;
    coverage reasons from the manifest, as the card states them). `progress`: a tqdm bar on stderr
    over the (layer, head, kind) folders read; False (`--quiet`): none."""
    import numpy as np

    data = Dataset.open(root)
    sampler = data.sampler()
    committed = data.committed()
    config = data.manifest.get("config", {})
    model = data.manifest.get("model") or {}
    rows: dict[str, Counter] = {"q": Counter(), "k": Counter()}  # kind -> bucket -> rows
    heads: dict[str, set] = {"q": set(), "k": set()}
    for key in bar("qk-sniff inspect: folders", "folder", progress, iterable=data.folders):
        table = data.index(key)
        if table is None or table.num_rows == 0:
            continue
        values, counts = np.unique(table.column("bucket").to_numpy(), return_counts=True)
        rows[key[2]].update(dict(zip(values.tolist(), counts.tolist())))
        heads[key[2]].add(key[:2])
    total = {kind: sum(c.values()) for kind, c in rows.items()}
    lines = [
        f"dataset    {data.root}",
        f"model      {model_name(model)}  ({model.get('model_type')}, {model.get('dtype')})",
        f"sampler    {sampler.strategy}, min_bucket_size {sampler.min_bucket_size}, base_rate {sampler.base_rate:g}, "
        f"seed {sampler.seed}; {config.get('rope', 'post')}-RoPE; captured {config.get('capture')}",
        f"examples   {len(committed)} committed, {sum(committed.values()):,} valid tokens, "
        f"longest {max(committed.values(), default=0):,}",
        f"rows       {total['q'] + total['k']:,}: q {total['q']:,}, k {total['k']:,}",
    ]
    plan = data.manifest.get("plan")
    if plan:
        layers = plan["num_layers"]
        lines.append(
            f"coverage   q: {len(heads['q'])} (layer, head) pairs with rows of {layers} layers x {plan['num_heads']} "
            f"query heads; k: {len(heads['k'])} of {layers} x {plan['num_kv_heads']} key heads"
        )
        cov = coverage(data.manifest)
        for line in head_totals(plan, cov) + cov["missing"]:  # the plan, and why anything is missing (as the card)
            lines.append(f"           {line}")
    lines.append("buckets    bucket  positions              q rows      k rows   q per example-head")
    n_examples = max(1, len(committed))
    for b in sorted(set(rows["q"]) | set(rows["k"])):
        start = sampler.bucket_start(b)
        span = f"[{start:,}, {start + sampler.bucket_size(b):,})"
        per = rows["q"][b] / n_examples / max(1, len(heads["q"]))
        lines.append(f"           {b:>6}  {span:<20} {rows['q'][b]:>10,}  {rows['k'][b]:>10,}   {per:10.2f}")
    if data.bad:
        lines.append(
            f"damaged    {len(data.bad)} committed shard(s) missing or unreadable (not counted above); "
            f"run `qk-sniff verify {data.root}`, then `qk-sniff repair {data.root}`"
        )
    plots = data.plot_paths()
    why = "no rows committed" if not total["q"] + total["k"] else "the card is written when a capture closes"
    lines.append(f"plot       {plots[0] if plots else f'(none: {why})'}")
    if data.folders:
        layer, head, kind = min(
            (k for k in data.folders if data.files(k)), key=lambda k: (k[0], k[1], k[2] == "k"), default=(0, 0, "q")
        )
        lines.append(f"load       qk_attn.load({str(data.root)!r}, layer={layer}, head={head}, kind={kind!r})")
    return lines
