"""A saver segment: rows of the examples that arrived between two seals (qk_attn.storage.saver),
their per-(layer, kind) buffers, spilled `.tmp` shards and call counts, and dropping examples
that were never committed from it."""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from qk_attn.storage.shards import CallBuffer, Written, write_table

NO_POSITION = np.iinfo(np.int64).max


@dataclass
class Segment:
    """The rows of the examples that arrived between two seals, and what is known of their calls."""

    number: int
    buffers: dict[tuple, CallBuffer] = field(default_factory=dict)  # (layer, kind, heads) -> rows
    parts: list = field(default_factory=list)  # Futures of Written: spilled .tmp shards
    next_part: int = 0
    examples: set[int] = field(default_factory=set)  # every example seen in this segment
    valid: dict[int, Counter] = field(
        default_factory=lambda: defaultdict(Counter)
    )  # example -> (layer, kind) -> tokens
    first: dict[int, int] = field(default_factory=dict)  # example -> smallest first position
    calls: Counter = field(default_factory=Counter)  # (layer, kind, heads) -> attention calls seen
    # the same, per forward's examples: a forward whose examples are all dropped takes its calls with it
    calls_of: dict[tuple, Counter] = field(default_factory=lambda: defaultdict(Counter))
    cross_attention_layers: set[int] = field(default_factory=set)  # layers whose keys are vision tokens
    # example -> layer -> [[start, stop], ...]: query positions a layer did not get (given only a suffix)
    unseen: dict[int, dict[int, list]] = field(default_factory=lambda: defaultdict(dict))

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def count_calls(self, calls: list, valid: dict, first: dict) -> None:
        """Attention calls ran (each with .layer, .kind, .heads, .cross_attention), all with these
        per-row counts: their examples, first positions and valid tokens, and one call of each head."""
        self.examples.update(valid)
        for example, position in first.items():
            self.first[example] = min(self.first.get(example, NO_POSITION), position)
        counted = Counter((call.layer, call.kind, call.heads) for call in calls)
        self.calls.update(counted)
        self.calls_of[tuple(sorted(valid))].update(counted)
        text = dict.fromkeys((call.layer, call.kind) for call in calls if not call.cross_attention)
        # Cross-attention keys are image tokens, not text length.
        self.cross_attention_layers.update(call.layer for call in calls if call.cross_attention)
        for example, count in valid.items():
            self.valid[example].update(dict.fromkeys(text, count))

    def drop(self, incomplete: set[int], output: Path, fsync: bool) -> None:
        """Remove uncommitted examples' rows (buffers and .tmp shards under `output`). Buffers may hold
        rows of examples not counted yet (a forward refused part-way through its calls)."""
        ids = np.array(sorted(incomplete), np.int64)
        for examples in [e for e in self.calls_of if e and incomplete.issuperset(e)]:
            self.calls.subtract(self.calls_of.pop(examples))
        self.calls = +self.calls  # (no zero counts: a call of no kept example was not seen)
        for key, buffer in list(self.buffers.items()):
            buffer.drop(ids)
            if not buffer.rows:
                del self.buffers[key]
        incomplete = incomplete & self.examples
        if not incomplete:
            return  # spilled shards hold rows of counted examples only
        kept = []
        for future in self.parts:
            written: Written = future.result()
            path = output / written.key / f".{written.name}.tmp"
            table = pq.read_table(path)
            kept_rows = ~np.isin(table.column("example_id").to_numpy(), ids)
            if kept_rows.all():
                kept.append(future)
                continue
            table = table.filter(kept_rows)
            if not table.num_rows:
                path.unlink()
                continue
            size, digest = write_table(table, path, fsync)
            buckets = Counter(
                {int(b): int(n) for b, n in enumerate(np.bincount(table.column("bucket").to_numpy())) if n}
            )
            rewritten: Future = Future()  # in place of the spill's: done, as the commit expects of every part
            rewritten.set_result(
                Written(written.key, written.name, table.num_rows, size, digest, buckets, written.segments)
            )
            kept.append(rewritten)
        self.parts = kept
        for example in incomplete:
            self.valid.pop(example, None)
            self.first.pop(example, None)
            self.unseen.pop(example, None)
        self.examples -= incomplete


def unseen_queries(sealed: list[Segment]) -> dict[int, dict[str, list]]:
    """example -> layer (a manifest key) -> its unseen query ranges [[start, stop], ...] in position
    order, over the segments an example's forwards went to."""
    out: dict[int, dict[str, list]] = {}
    for seg in sealed:
        for example, layers in seg.unseen.items():
            for layer, spans in layers.items():
                out.setdefault(example, {}).setdefault(str(layer), []).extend(spans)
    for layers in out.values():
        for spans in layers.values():
            spans.sort()
    return out
