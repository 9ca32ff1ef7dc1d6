"""Reading a capture folder for checks: the `Dataset` view and each committed shard's integrity.

    Dataset.open(OUT)          the manifest, the (layer, head, kind) folders, their committed shards
                               and index columns (vectors are never loaded)
    check_shard(...)           one shard's integrity problem (missing, size, sha256, page checksums),
                               or None (qk_attn.dataset.load and qk_attn.dataset.hub use it)
    check_integrity(data)      every committed shard and the examples table (a bar: one step a shard)

Each integrity problem is one line: the file, what is wrong, the examples it holds (from the
manifest, so also for a shard that cannot be read). See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qk_attn.storage.examples import check_examples_file
from qk_attn.storage.layout import CHART, MANIFEST, parse_key
from qk_attn.storage.manifest import read_manifest, sha256_file
from qk_attn.storage.records import shard_examples

INDEX_COLUMNS = ["example_id", "position", "bucket", "layer", "head", "kind"]


def not_a_folder(root: Path) -> str | None:
    """Why `root` can hold no dataset before its manifest is looked for: it does not exist, or is a file."""
    if not root.exists():
        return f"{root} does not exist"
    return None if root.is_dir() else f"{root} is a file, not a folder"


@dataclass
class Dataset:
    """A capture output folder as `inspect` and `verify` read it (vectors are never loaded).

    Only shards the manifest lists are committed (qk_attn.storage.commit); `folders` holds every
    (layer, head, kind) that the manifest or the disk knows of.
    """

    root: Path
    manifest: dict
    folders: dict[tuple[int, int, str], Path]  # (layer, head, kind) -> folder
    bad: set[Path] = None  # shards that failed the integrity check: never read for content

    def __post_init__(self) -> None:
        self.bad = set() if self.bad is None else self.bad

    @classmethod
    def open(cls, root: str | Path) -> Dataset:
        root = Path(root)
        if (why := not_a_folder(root)) is not None:
            raise FileNotFoundError(f"{why}; expected a qk-sniff dataset folder")
        manifest = read_manifest(root)
        if manifest is None:
            raise FileNotFoundError(f"{root} is not a qk-sniff dataset: {MANIFEST} is missing")
        names = set(manifest.get("shards", {}))
        names |= {p.name for p in root.iterdir() if p.is_dir() and parse_key(p.name)}
        folders = {parse_key(name): root / name for name in sorted(names)}
        return cls(root, manifest, folders)

    def sampler(self):
        from qk_attn.sampler import Sampler

        s = self.manifest["sampler"]
        return Sampler(s["sampler"], int(s["min_bucket_size"]), float(s["base_rate"]), int(s["seed"]))

    def committed(self) -> dict[int, int]:
        """example_id -> valid length (tokens) of every committed example."""
        return {int(k): int(v) for k, v in self.manifest.get("examples", {}).items()}

    def first_positions(self) -> dict[int, int]:
        """example_id -> the position of its first token (0 unless a left-padded batch ran without
        position_ids: `position` is what RoPE used); 0 where the manifest predates the record."""
        info = self.manifest.get("example_info", {})
        return {int(k): int((info.get(k) or {}).get("first_position") or 0) for k in self.manifest.get("examples", {})}

    def unseen_queries(self, layer: int) -> dict[int, list]:
        """example_id -> [[start, stop], ...] of the query positions `layer` did not get (given only the
        last queries of a forward: Gemma 4's KV-shared layers); examples it got every query of are absent."""
        info = self.manifest.get("example_info", {})
        return {
            int(e): spans[str(layer)] for e, i in info.items() if str(layer) in (spans := i.get("unseen_queries") or {})
        }

    def row_counts(self) -> dict[str, int]:
        """Folder name (e.g. "l00h00q") -> committed rows, as the manifest records them."""
        return {str(k): int(v) for k, v in self.manifest.get("row_counts", {}).items()}

    def plan(self) -> dict[tuple[int, str], tuple[int, ...]] | None:
        """(layer, kind) -> heads the capture was asked to record (None before any call ran)."""
        plan = self.manifest.get("plan")
        if not plan:
            return None
        out = {}
        for kind, key in (("q", "query_heads"), ("k", "key_heads")):
            for layer, heads in plan.get(key, {}).items():
                if heads:
                    out[(int(layer), kind)] = tuple(int(h) for h in heads)
        return out

    def files(self, key: tuple[int, int, str]) -> list[Path]:
        """The committed shards of one folder (listed in the manifest)."""
        folder = self.folders[key]
        return [folder / name for name in self.manifest.get("shards", {}).get(folder.name, [])]

    def stray_files(self, key: tuple[int, int, str]) -> list[Path]:
        """Parquet files in a folder that the manifest does not list (a glob reader would read them)."""
        listed = set(self.files(key))
        folder = self.folders[key]
        return sorted(p for p in folder.glob("*.parquet") if p not in listed) if folder.is_dir() else []

    def index(self, key: tuple[int, int, str]):
        """The non-vector columns of one folder's committed shards, as one Arrow table (or None)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for f in self.files(key):
            if not f.is_file():
                self.bad.add(f)
            if f in self.bad:
                continue
            try:
                has_tokens = "token_id" in pq.read_schema(f).names
                tables.append(pq.read_table(f, columns=INDEX_COLUMNS + ["token_id"] * has_tokens))
            except Exception:  # noqa: BLE001 - damaged: `verify` names it; readers skip it
                self.bad.add(f)
        return pa.concat_tables(tables) if tables else None

    def plot_paths(self) -> list[Path]:
        return [self.root / CHART] if (self.root / CHART).is_file() else []


def check_shard(root: Path, manifest: dict, key: str, name: str, read: bool = True) -> str | None:
    """What is wrong with one committed shard (missing, size, sha256, unreadable or a page
    checksum), or None. Shards without a recorded digest (older datasets) are only read."""
    import pyarrow.parquet as pq

    path = Path(root) / key / name
    info = manifest.get("shard_info", {}).get(f"{key}/{name}")
    if not path.is_file():
        return "missing"
    if info is not None:
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"size {size} bytes, the manifest records {info['bytes']} (truncated or replaced)"
        if sha256_file(path) != info["sha256"]:
            return "sha256 differs from the manifest (the bytes changed after it was written)"
    if read or info is None:
        try:
            pq.read_table(path, page_checksum_verification=True)
        except Exception as error:  # noqa: BLE001 - any reader error means the shard is unusable
            return f"unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return None


def shard_problem_line(root: Path, manifest: dict, key: str, name: str, problem: str) -> str:
    examples = shard_examples(manifest, key, name)
    held = ids_text(examples) if examples else "unknown (no per-example record in this older manifest)"
    return f"{key}/{name}: {problem}; holds examples {held}"


def ids_text(ids: list[int], limit: int = 20) -> str:
    """`[1, 2, ... 5 more]`: at most `limit` example ids, for one line of a report."""
    return "[" + ", ".join(map(str, ids[:limit])) + (f", ... {len(ids) - limit} more" if len(ids) > limit else "") + "]"


def check_integrity(data: Dataset, bar=None, examples: bool = True) -> tuple[list[str], set[Path], int]:
    """(one line per bad shard, the bad shard paths, how many shards had no digest to check);
    `bar` (qk_attn.dataset.progress.bar) moves one step per shard checked. `examples`: check the
    examples table too (not while a capture writes it: it lags the manifest by design then)."""
    lines, bad, no_digest = [], set(), 0
    info = data.manifest.get("shard_info", {})
    for key, names in sorted(data.manifest.get("shards", {}).items()):
        for name in names:
            no_digest += f"{key}/{name}" not in info
            problem = check_shard(data.root, data.manifest, key, name)
            if problem:
                lines.append(shard_problem_line(data.root, data.manifest, key, name, problem))
                bad.add(data.root / key / name)
            if bar is not None:
                bar.update(1)
    problem = check_examples_file(data.root, data.manifest) if examples else None
    if problem:
        lines.append(problem)
    return lines, bad, no_digest
