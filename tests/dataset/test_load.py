"""Loading a capture: qk_attn.dataset.load / load_vectors, and datasets.load_dataset through the card's configs."""

from __future__ import annotations

import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from datasets import List, Value

import qk_attn
from qk_attn.capture.schema import arrow_schema
from qk_attn.dataset.load import tokenizer_of, vectors_of
from support.storage import capture_model, folder_table, sort_rows

# The column types of docs/architecture.md, as `datasets` names them
FEATURES = {
    "example_id": Value("int64"),
    "position": Value("int32"),
    "bucket": Value("int32"),
    "layer": Value("int16"),
    "head": Value("int16"),
    "kind": Value("string"),
    "sliding_window": Value("int32"),
    "token_id": Value("int32"),
}


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "out"
    capture_model(out)  # sampler "all", every head, 3 layers, 4 examples
    return out


def _where(table, **equal):
    mask = None
    for column, value in equal.items():
        term = pc.equal(table[column], value)
        mask = term if mask is None else pc.and_(mask, term)
    return table.filter(mask)


def test_load_selects_exactly_one_head_a_layer_or_everything(captured):
    everything = folder_table(captured)
    one = qk_attn.load(captured, layer=0, head=0, kind="q")
    assert one.schema == arrow_schema(16, token_id=True)
    assert sort_rows(one).equals(sort_rows(_where(everything, layer=0, head=0, kind="q")))
    assert one.num_rows == 2 * (30 + 17)  # sampler "all": every valid token of both batches
    keys = qk_attn.load(captured, layer=1, kind="k")
    assert sort_rows(keys).equals(sort_rows(_where(everything, layer=1, kind="k")))
    assert sort_rows(qk_attn.load(captured)).equals(sort_rows(everything))
    with pytest.raises(
        LookupError, match="no committed rows for layer=0, head=3, kind=.k.: head=3 is not among the heads with rows"
    ):
        qk_attn.load(captured, layer=0, head=3, kind="k")  # only 2 KV heads
    with pytest.raises(ValueError, match="kind='v'"):
        qk_attn.load(captured, layer=0, kind="v")


def test_load_vectors_is_the_vector_column_as_a_tensor(captured):
    table = qk_attn.load(captured, layer=2, head=1, kind="q")
    vectors = qk_attn.load_vectors(captured, layer=2, head=1, kind="q")
    assert vectors.shape == (table.num_rows, 16) and vectors.dtype == torch.float32
    assert np.array_equal(vectors.numpy(), np.stack(table["vector"].to_numpy(zero_copy_only=False)))
    sliced = table.slice(5, 7)  # offsets inside the Arrow array are honoured
    assert torch.equal(vectors_of(sliced), vectors[5:12])


def test_float16_capture_loads_as_float16(tmp_path):
    out = tmp_path / "out"
    capture_model(out, vector_dtype="float16", layers="0", batches=((0, 1),))
    table = qk_attn.load(out, layer=0, head=0, kind="k")
    assert table.schema == arrow_schema(16, pa.float16(), token_id=True)
    assert qk_attn.load_vectors(out, layer=0, head=0, kind="k").dtype == torch.float16


@pytest.mark.parametrize(
    "name, equal",
    [
        ("l00h00q", dict(layer=0, head=0, kind="q")),
        ("layer00_k", dict(layer=0, kind="k")),
        ("all_q", dict(kind="q")),
    ],
)
def test_datasets_load_dataset_configs(captured, tmp_path, name, equal):
    ds = datasets.load_dataset(str(captured), name, split="train", cache_dir=str(tmp_path / "cache"))
    assert {k: v for k, v in ds.features.items() if k != "vector"} == FEATURES
    assert ds.features["vector"] == List(Value("float32"), length=16)
    want = _where(folder_table(captured), **equal)
    got = ds.data.table.cast(want.schema)  # datasets' Arrow table; the cast only normalises field names
    assert got.num_rows == want.num_rows
    assert sort_rows(got).equals(sort_rows(want))


def test_a_missing_folder_or_a_file_is_named_not_sent_to_the_hub(tmp_path):
    missing = tmp_path / "missing" / "dir"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist: expected a qk-sniff capture folder"):
        qk_attn.load(missing)
    (tmp_path / "file.parquet").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file, not a qk-sniff capture folder"):
        qk_attn.load(tmp_path / "file.parquet")


def test_a_capture_without_rows_is_a_lookup_error_not_an_arrow_one(tmp_path):
    """A session that committed nothing leaves a valid, empty capture: load() says so in one line."""

    out = tmp_path / "out"
    with qk_attn.session(output=out, sampler="all"):
        pass
    assert qk_attn.load_examples(out).num_rows == 0
    with pytest.raises(LookupError, match="has no committed rows"):
        qk_attn.load(out)


def _word_level(tokens: list[str]):
    """A tokenizer whose id i is tokens[i]."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tokens)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=tokens[0])))


def test_token_strings_come_from_the_capture_or_from_a_tokenizer_that_fits_it(tiny_model, tmp_path):
    """load(tokens=True) decoded token ids with whatever tokenizer it was given: one with fewer tokens gave
    null strings and one with another vocabulary other strings, silently. Those are refused now; a capture
    that stored its strings (session(vocabulary=...)) but names no tokenizer reads them back."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = LlamaForCausalLM.from_pretrained(tiny_model, attn_implementation="qk_sniff").eval()
    words = tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
    ids = torch.arange(len(words) - 8, len(words)).unsqueeze(0)  # the last ids: past a smaller vocabulary
    out = tmp_path / "out"
    with torch.no_grad(), qk_attn.session(output=str(out), sampler="all", layers="0", vocabulary=words):
        model(input_ids=ids)
    table = qk_attn.load(out, layer=0, head=0, kind="k", tokens=True)
    assert table["token"].to_pylist() == [words[i] for i in ids[0].tolist()] == table["token_str"].to_pylist()
    assert qk_attn.load(out, layer=0, head=0, kind="k", tokens=True, tokenizer=tokenizer)["token"] == table["token"]
    with pytest.raises(ValueError, match=rf"^tokens=True: token id {len(words) - 8} is past the end of the tok"):
        qk_attn.load(out, layer=0, tokens=True, tokenizer=_word_level(words[: len(words) - 8]))
    with pytest.raises(ValueError, match=r"^tokens=True: the tokenizer writes token id \d+ as '.*', but the capture"):
        qk_attn.load(out, layer=0, tokens=True, tokenizer=_word_level(words[::-1]))
    with pytest.raises(ValueError, match=r"^tokens='no' is invalid: expected True or False"):  # was read as true
        qk_attn.load(out, layer=0, tokens="no")


def test_load_refuses_hub_arguments_on_a_local_folder_and_a_tokenizer_without_tokens(captured):
    """token= on a local folder was ignored (revision= is refused), and so was tokenizer= without tokens=True:
    both refused now, in one line naming the argument; the token's value, a secret, is not repeated."""
    local = f"^token= only applies to Hub repos; {re.escape(str(captured))} is a local folder$"
    for read in (qk_attn.load, qk_attn.load_vectors, qk_attn.load_examples):
        with pytest.raises(ValueError, match=local) as refused:
            read(captured, token="hf_secret")
        assert "hf_secret" not in str(refused.value)
    for tokenizer in (5, "/nonexistent", _word_level(["a", "b"])):
        shown = (
            repr(tokenizer) if isinstance(tokenizer, (int, str)) else f"<{type(tokenizer).__name__}>"
        )  # not its repr
        needs = rf"^tokenizer={re.escape(shown)} needs tokens=True: it decodes token_id into the token column"
        with pytest.raises(ValueError, match=needs):
            qk_attn.load(captured, layer=0, tokenizer=tokenizer)
        with pytest.raises(ValueError, match=needs):
            qk_attn.load(captured, layer=0, tokenizer=tokenizer, tokens=False)
    with pytest.raises(ValueError, match=r"^tokens=True: tokenizer=5 is not a tokenizer; pass a tokenizer name"):
        qk_attn.load(captured, layer=0, tokens=True, tokenizer=5)  # was len(5): a TypeError


def test_a_recorded_tokenizer_that_cannot_be_loaded_is_named_with_the_way_round_it(tmp_path):
    """A capture whose source names a tokenizer that is not there (moved, or another machine's path) made
    load(tokens=True) raise huggingface_hub's "Repo id must be in the form ..."; one that is not a name at
    all, a TypeError. Now one line names the recorded tokenizer and says to pass one: tokenizer=..."""
    from support.models import VOCAB, build

    gone = tmp_path / "gone" / "tok"
    out = tmp_path / "out"
    model = build("llama3", "qk_sniff")
    with torch.no_grad(), qk_attn.session(output=str(out), sampler="all", layers="0", source={"tokenizer": str(gone)}):
        model(input_ids=torch.tensor([[1, 5, 6]]))
    cannot = (
        rf'^tokens=True: the tokenizer this capture records \(source\["tokenizer"\] = {re.escape(repr(str(gone)))}\) '
        r"cannot be loaded \(no such folder, and not a Hub repo id\); pass the capture's tokenizer: tokenizer=<"
    )
    with pytest.raises(ValueError, match=cannot) as refused:
        qk_attn.load(out, layer=0, tokens=True)
    assert "\n" not in str(refused.value)
    words = [f"t{i}" for i in range(VOCAB)]
    table = qk_attn.load(out, layer=0, head=0, kind="q", tokens=True, tokenizer=_word_level(words))
    assert table["token"].to_pylist() == ["t1", "t5", "t6"]  # the way round it the message gives
    # A manifest whose source names no string (written by hand, or before session() checked it).
    with pytest.raises(
        ValueError, match=r'^tokens=True: the tokenizer this capture records \(source\["tokenizer"\] = 5\) is'
    ):
        tokenizer_of({"source": {"tokenizer": 5}})
    with pytest.raises(
        ValueError, match=r"\(source\[\"tokenizer\"\] = '/nonexistent/tok'\) cannot be loaded \(no such"
    ):
        tokenizer_of({"source": {"tokenizer": "/nonexistent/tok"}})


def test_a_tokenizer_with_other_files_than_the_recorded_one_is_refused(tiny_model, tmp_path):
    """A capture recorded with a local tokenizer holds its files' fingerprint: another tokenizer at least as
    large (a shuffled vocabulary, saved to a folder) decoded every id, silently, where no token_str was stored
    to compare with. Refused, by path or by object; the recorded one, copied elsewhere, is accepted."""
    import shutil

    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = LlamaForCausalLM.from_pretrained(tiny_model, attn_implementation="qk_sniff").eval()
    out = tmp_path / "out"
    with (
        torch.no_grad(),
        qk_attn.session(output=str(out), sampler="all", layers="0", source={"tokenizer": str(tiny_model)}),
    ):
        model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    words = tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
    other = tmp_path / "other"
    _word_level(words[::-1]).save_pretrained(other)
    for given in (str(other), AutoTokenizer.from_pretrained(other)):
        with pytest.raises(
            ValueError, match=r"^tokens=True: tokenizer=.* has other files \(.*other, sha256 \w+\.\.\.\) "
        ):
            qk_attn.load(out, layer=0, head=0, kind="k", tokens=True, tokenizer=given)
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    got = qk_attn.load(out, layer=0, head=0, kind="k", tokens=True, tokenizer=str(copy))["token"].to_pylist()
    assert got == [words[i] for i in (1, 5, 6, 7)]
