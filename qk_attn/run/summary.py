"""What `qk-sniff run` prints at the end: the run's summary, where the files are, how to load them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunSummary:
    output: str
    model: str
    dataset: str
    max_length: int = 0
    documents: int = 0  # processed in this run
    resumed: int = 0  # skipped: committed by an earlier run
    empty: int = 0  # skipped: no tokens
    tokens: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    pool_waits: tuple[int, float] = (0, 0.0)  # times capture waited for host pool space, seconds in all
    pulled: bool = False
    pushed: str | None = None
    rank: str | None = None  # "rank 1 of 4" when several processes capture
    merged: bool = False  # this process merged the ranks' manifests and wrote the card
    ids: dict[int, Any] = field(default_factory=dict)  # example_id -> dataset id (this run)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"model      {self.model}",
            f"dataset    {self.dataset}",
            f"documents  {self.documents} captured, {self.resumed} already committed (resumed), {self.empty} empty",
            f"tokens     {self.tokens:,} (max_length {self.max_length:,}) in {self.seconds:.1f} s "
            f"= {self.tokens_per_second:,.0f} tokens/s",
            f"rows       {self.rows_written:,} written",
            f"output     {self.output}",
        ]
        waits, waited = self.pool_waits
        if waits:  # the saver fell behind: capture could have run this much faster
            share = waited / self.seconds if self.seconds > 0 else 0.0
            out.append(
                f"waits      capture waited {waits} time(s), {waited:.1f} s ({share:.0%} of the run), for the saver "
                "to free host pool space (raise inference.pinned_mb, or write to a faster disk)"
            )
        if self.rank:
            out.append(
                f"ranks      {self.rank}; "
                + (
                    "merged the manifest parts and wrote the card"
                    if self.merged
                    else "the card is written when the parts are merged"
                )
            )
        if self.ids and any(source != example for example, source in self.ids.items()):
            shown = ", ".join(f"{_clipped(source)} -> {example}" for example, source in list(self.ids.items())[:4])
            out.append(f"ids        {shown}{', ...' if len(self.ids) > 4 else ''}")
        if self.pulled:
            out.append("hub        pulled the existing remote dataset before capture")
        if self.pushed:
            out.append(f"hub        pushed to {self.pushed}")
        return out


def output_files(output: str) -> list[str]:
    """Summary lines for the card and chart, where the run wrote them."""
    from qk_attn.storage.layout import CARD, CHART

    paths = (("card", Path(output) / CARD), ("plot", Path(output) / CHART))
    return [f"{name:<10} {path}" for name, path in paths if path.is_file()]


def format_load_hint(output: str) -> list[str]:
    """How to load the result, naming a (layer, head, kind) that has rows."""
    from qk_attn.storage.layout import key_name, parse_key
    from qk_attn.storage.manifest import read_manifest

    manifest = read_manifest(output) or {}
    keys = sorted(
        (parse_key(k) for k, names in manifest.get("shards", {}).items() if names),
        key=lambda k: (k[0], k[1], k[2] == "k"),
    )
    if not keys:  # nothing to load: do not suggest a config that does not exist
        return [f"No rows are committed in {output}: `qk-sniff inspect {output}` shows the plan and what is missing."]
    layer, head, kind = keys[0]
    name = key_name(layer, head, kind)
    return [
        "Load it:",
        "    import qk_attn",
        f"    table = qk_attn.load({output!r}, layer={layer}, head={head}, kind={kind!r})   # pyarrow Table",
        "    # or, with datasets:",
        f"    datasets.load_dataset({output!r}, {name!r}, split='train')",
        f"Check it:  qk-sniff verify {output}",
    ]


def _clipped(source: Any, limit: int = 40) -> str:
    """A dataset id as the summary shows it: its repr, cut to `limit` characters (ids may be whole texts)."""
    text = repr(source)
    return text if len(text) <= limit else text[: limit - 3] + "..."
