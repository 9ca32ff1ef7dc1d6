"""The source documents of a finished capture, encoded again as its manifest records them.

`encode_source` is what `qk-sniff verify` and `repair` hand to qk_attn.dataset.verify for its
token check: the dataset layer checks, the run layer knows how documents are loaded and encoded.
See docs/architecture.md.
"""

from __future__ import annotations


def encode_source(manifest: dict, source: dict) -> dict[int, list[int]]:
    """example_id -> the token ids of its source document (via the examples table's row index).

    `source` is the manifest's `source` record (dataset, split, revision, columns, tokenizer and
    its settings); raises whatever loading the dataset or the tokenizer raises.
    """
    from transformers import AutoTokenizer

    from qk_attn.demo import resolve_model
    from qk_attn.run.documents import load_rows, text_folder
    from qk_attn.run.sections import DatasetSection

    cfg = DatasetSection(
        path=source["dataset"],
        name=source.get("dataset_name"),
        split=source.get("split") or "train",
        revision=source.get("dataset_revision"),
        data_files=source.get("data_files"),
        text_column=source.get("text_column") or "text",
        id_column=source.get("id_column"),
        sample_by=source.get("sample_by") or "document",
    )
    if text_folder(cfg) and not source.get("text_folder"):  # captured before sample_by applied to folders
        cfg.sample_by = "line"  # what datasets' text builder did then, whatever sample_by said
    rows = load_rows(cfg)
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(source["tokenizer"], verbose=False), revision=source.get("tokenizer_revision")
    )
    out = {}
    for key, info in manifest.get("example_info", {}).items():
        if info.get("source_index") is None:
            continue
        text = rows[int(info["source_index"])][cfg.text_column] or ""
        out[int(key)] = tokenizer(
            text,
            truncation=True,
            max_length=source.get("max_length"),
            add_special_tokens=source.get("add_special_tokens", True),
        )["input_ids"]
    return out
