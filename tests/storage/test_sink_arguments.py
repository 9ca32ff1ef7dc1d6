"""ParquetSink's arguments, checked before the folder is touched; the refusal to resume other
settings (one line); token ids past the end of a `vocabulary` (warned once, named)."""

from __future__ import annotations

import logging

import pytest
import torch

import qk_attn
from qk_attn.config import SniffConfig
from qk_attn.errors import ConfigError
from qk_attn.storage.sink import ParquetSink
from support.models import VOCAB, build
from support.storage import open_sink, run_examples


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "argument, value, says",
    [
        ("overwrite", "no", "overwrite='no' is invalid: expected True or False"),
        ("overwrite", 1, "overwrite=1 is invalid: expected True or False"),
        ("overwrite", None, "overwrite=None is invalid: expected True or False"),
        ("fsync", "no", "fsync='no' is invalid: expected True or False"),
        ("token_ids", "yes", "token_ids='yes' is invalid: expected True or False"),
        ("source", "toy", "source='toy' is invalid: expected a dict of str keys to JSON values"),
        ("vocabulary", "abc", "vocabulary='abc' is invalid: expected a list of token strings"),
    ],
)
def test_arguments_are_checked_before_the_folder_is_touched(tmp_path, argument, value, says):
    """`overwrite="no"` deleted the capture (its truth value is True); the others were taken by their
    truth value or failed inside the folder's opening."""
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0, 1])
    sink.close()
    before = _files(out)
    config = SniffConfig(output=str(out), sampler="all", min_bucket_size=4)
    with pytest.raises(ConfigError) as error:
        ParquetSink(out, config, **{"fsync": False, argument: value})
    assert str(error.value).startswith(says) and "\n" not in str(error.value)
    assert _files(out) == before
    with pytest.raises(ConfigError, match="^overwrite='no' is invalid"):
        ParquetSink(tmp_path / "new", config, overwrite="no")
    assert not (tmp_path / "new").exists()


def test_other_settings_are_refused_in_one_line_naming_each(tmp_path):
    """The refusal was three lines (`...:\\n  sampler: ...\\nRe-run ...`); errors are one line."""
    out = tmp_path / "out"
    sink = open_sink(out)
    run_examples(sink, [0])
    sink.close()
    other = SniffConfig(output=str(out), sampler="uniform", min_bucket_size=4, seed=3)
    with pytest.raises(ValueError) as error:
        ParquetSink(out, other, fsync=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"{out} already holds a qk-sniff capture with different settings "
        "(sampler: 'all' there, 'uniform' now; seed: 0 there, 3 now); re-run with the same settings to resume it"
    )
    assert message.endswith(
        "or pass overwrite=True (run config: output.overwrite: true) to delete the existing capture and start over"
    )
    with pytest.raises(ValueError, match=r"different settings \(seed: 0 there, 3 now\); re-run"):
        with qk_attn.session(output=out, sampler="all", min_bucket_size=4, seed=3):
            pass


def test_token_ids_past_the_end_of_the_vocabulary_are_warned_once_naming_the_sizes(tmp_path, caplog):
    """A vocabulary shorter than the ids that occur gave token_str null for every id past its end,
    silently. The model's vocab_size is no bound to check it against up front (a tokenizer's whole
    vocabulary can be shorter: Qwen's embedding has rows no id reaches), so the ids that occur are."""
    model = build("llama3", "qk_sniff")
    ids = torch.tensor([[2, 5, 9, 10, 40, 95, 3]])
    settings = dict(sampler="all", layers="0", heads="0", capture="q")
    short = [f"t{i}" for i in range(10)]
    with caplog.at_level(logging.WARNING, logger="qk_attn"):
        with qk_attn.session(output=tmp_path / "short", vocabulary=short, **settings):
            model(input_ids=ids)
            model(input_ids=ids)
    warned = [r.getMessage() for r in caplog.records if "past the end of the vocabulary" in r.getMessage()]
    assert warned == [
        "qk-sniff: token id 95 is past the end of the vocabulary given (10 strings, ids 0-9): rows of ids past its "
        "end get token_str null (their token_id is kept); pass a vocabulary of every id, e.g. "
        "tokenizer.convert_ids_to_tokens(range(len(tokenizer)))"
    ]
    table = qk_attn.load(tmp_path / "short", layer=0, head=0, kind="q")
    assert table["token_id"].to_pylist()[:7] == [2, 5, 9, 10, 40, 95, 3]
    assert table["token_str"].to_pylist()[:7] == ["t2", "t5", "t9", None, None, None, "t3"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qk_attn"):
        whole = [f"t{i}" for i in range(VOCAB)]
        with qk_attn.session(output=tmp_path / "whole", vocabulary=whole, **settings):
            model(input_ids=ids)
        low = [f"t{i}" for i in range(10)]  # shorter than the model's vocab_size, but no id reaches its end
        with qk_attn.session(output=tmp_path / "low", vocabulary=low, **settings):
            model(input_ids=torch.tensor([[2, 5, 9, 3]]))
    assert "past the end of the vocabulary" not in caplog.text
    assert qk_attn.load(tmp_path / "whole", layer=0, head=0, kind="q")["token_str"].to_pylist()[5] == "t95"


def test_ids_without_a_string_in_the_vocabulary_get_token_str_null(tmp_path):
    """`None` entries (ids without a token, as a tokenizer with holes gives convert_ids_to_tokens) are
    allowed: they failed every commit in pyarrow (a null in a dictionary cannot be written), with advice to
    resume that failed the same way. Their rows get token_str null, every other id its string."""
    import datasets

    model = build("llama3", "qk_sniff")
    vocabulary = [None if i in (7, 40) else f"t{i}" for i in range(VOCAB)]
    with qk_attn.session(output=tmp_path, vocabulary=vocabulary, sampler="all", layers="0", heads="0", capture="q"):
        model(input_ids=torch.tensor([[2, 7, 9, 40, 3]]))
    table = qk_attn.load(tmp_path, layer=0, head=0, kind="q")
    assert table["token_id"].to_pylist() == [2, 7, 9, 40, 3]
    assert table["token_str"].to_pylist() == ["t2", None, "t9", None, "t3"]
    loaded = datasets.load_dataset(str(tmp_path), "l00h00q", split="train")
    assert loaded["token_str"] == ["t2", None, "t9", None, "t3"]
