"""Every file name inside an output folder: what each name is, and who writes it.

    OUT/qk_sniff.json                        manifest: the only record of what is committed
    OUT/.qk_sniff.json.prev                  the previous manifest (hard link): `repair` restores it
    OUT/.qk_sniff.lock                       flock'd while a sink writes here (one writer per folder)
    OUT/examples.parquet                     one row per committed example (export of the manifest)
    OUT/README.md, OUT/buckets.png           the dataset card and its bucket chart
    OUT/l{LL}h{HH}{q|k}/sNNNNNN-pNNNN.parquet committed shards (listed in the manifest)
    OUT/l{LL}h{HH}{q|k}/.sNNNNNN-pNNNN.parquet.tmp  shards not committed yet
    OUT/.qk_sniff.quarantine/                where `repair` moves Parquet files no manifest lists

Ranks (qk_attn.run.distributed) write their own names next to these (`Files(rank, n)`):
`qk_sniff.rankRRR.json`, `.qk_sniff.rankRRR.lock`, `examples.rankRRR.parquet` and shards
prefixed `rRRR-`. The commit protocol that ties the names together is in docs/architecture.md.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "qk_sniff.json"
LOCK = ".qk_sniff.lock"
EXAMPLES = "examples.parquet"
CARD = "README.md"
CARD_SIGNATURE = "<!-- qk-sniff manifest sha256 {} -->"  # the manifest a card was written from
CHART = "buckets.png"
CARD_FILES = (CARD, CHART)
QUARANTINE = ".qk_sniff.quarantine"  # where repair moves Parquet files no manifest lists

KEY_RE = re.compile(r"l(\d+)h(\d+)([qk])")
SHARD_RE = re.compile(r"s(\d+)-p(\d+)\.parquet")
PART_RE = re.compile(r"qk_sniff\.rank(\d+)\.json")
PART_FILES_RE = re.compile(r"\.?qk_sniff\.rank(\d+)\.json(\.prev)?")  # a part, or its previous version
PART_EXAMPLES_RE = re.compile(r"examples\.rank\d+\.parquet")  # a rank's examples table


def previous_name(manifest_name: str) -> str:
    """Where a manifest's last good version is kept; one per manifest file, so that ranks
    writing their parts into one folder never touch each other's."""
    return f".{manifest_name}.prev"


PREVIOUS = previous_name(MANIFEST)


def key_name(layer: int, head: int, kind: str) -> str:
    """Folder and config name of one (layer, head, kind): `l03h01k`."""
    return f"l{layer:02d}h{head:02d}{kind}"


@functools.lru_cache(maxsize=1 << 14)
def key_names(layer: int, heads: tuple[int, ...], kind: str) -> tuple[str, ...]:
    """The folder names of one call's heads, formatted once per (layer, heads, kind)."""
    return tuple(key_name(layer, head, kind) for head in heads)


def parse_key(name: str) -> tuple[int, int, str] | None:
    """`l03h01k` -> (3, 1, "k"); None for any other name."""
    match = KEY_RE.fullmatch(name)
    return (int(match[1]), int(match[2]), match[3]) if match else None


def shard_segment(name: str) -> int | None:
    """The segment in a shard's name (`sNNNNNN-pNNNN.parquet`, or a rank's `rRRR-s...`)."""
    match = SHARD_RE.fullmatch(name.split("-", 1)[1] if name.startswith("r") else name)
    return int(match[1]) if match else None


@dataclass(frozen=True)
class Files:
    """The names one writer owns in OUT: the single writer's (rank None) or rank r's of n."""

    rank: int | None = None
    world_size: int = 1

    @property
    def prefix(self) -> str:  # of its shard names
        return "" if self.rank is None else f"r{self.rank:03d}-"

    @property
    def manifest(self) -> str:
        return MANIFEST if self.rank is None else f"qk_sniff.rank{self.rank:03d}.json"

    @property
    def lock(self) -> str:
        return LOCK if self.rank is None else f".qk_sniff.rank{self.rank:03d}.lock"

    @property
    def examples(self) -> str:
        return EXAMPLES if self.rank is None else f"examples.rank{self.rank:03d}.parquet"

    def shard(self, segment: int, part: int) -> str:
        return f"{self.prefix}s{segment:06d}-p{part:04d}.parquet"

    def owns(self, name: str) -> bool:
        """A shard (or its temporary file) this writer wrote."""
        name = name[1:-4] if name.startswith(".") and name.endswith(".parquet.tmp") else name
        return name.startswith(self.prefix) and SHARD_RE.fullmatch(name[len(self.prefix) :]) is not None


def part_ranks(output: str | Path) -> list[int]:
    """The ranks that have written into OUT: a manifest part, or only its previous version left."""
    output = Path(output)
    found = (PART_FILES_RE.fullmatch(p.name) for p in output.iterdir()) if output.is_dir() else ()
    return sorted({int(m[1]) for m in found if m})


def part_files(output: str | Path) -> dict[int, Path]:
    """rank -> manifest part of every rank that has written into OUT."""
    output = Path(output)
    found = (PART_RE.fullmatch(p.name) for p in output.iterdir()) if output.is_dir() else ()
    return {int(m[1]): output / m[0] for m in found if m}
