"""The dataset card's configs load with `datasets` exactly as the files hold them, also where layers
differ in head size; a README.md the capture did not write is never replaced or deleted."""

from __future__ import annotations

import re

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import DatasetCard

import qk_attn
from qk_attn.capture.schema import concat_rows
from qk_attn.config import SniffConfig
from qk_attn.dataset.verify import verify_dataset
from qk_attn.run import distributed
from qk_attn.storage.card import write_card
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.sink import ParquetSink
from support.models import COMMON, build, gemma4, padded_batch
from support.storage import sort_rows

SETTINGS = {"sampler": "all", "min_bucket_size": 4}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "out"
    vocabulary = [f"t{i}" for i in range(COMMON["vocab_size"])]
    model = gemma4(global_head_dim=32, num_kv_shared_layers=0)  # global layers of head size 32
    model.set_attn_implementation("qk_sniff")
    with (
        torch.inference_mode(),
        qk_attn.session(output=out, vector_dtype="float16", vocabulary=vocabulary, **SETTINGS) as s,
    ):
        for ids in ((0, 1), (2, 3)):
            s.begin(list(ids))
            model(**padded_batch("left", lengths=(12, 7), seed=ids[0]))
            s.commit()
    return out


def _files(out, pattern):
    manifest = read_manifest(out)
    listed = sorted(out / key / name for key, names in manifest["shards"].items() for name in names)
    return [p for p in listed if p.match(str(out / pattern))]


def test_every_config_loads_with_datasets_where_layers_differ_in_head_size(mixed, tmp_path):
    card = DatasetCard.load(mixed / "README.md")
    dims = {
        pq.read_schema(p).field("vector").type.list_size for p in _files(mixed, "l*h*q/*.parquet")
    }  # the capture really mixes head sizes
    assert dims == {16, 32}
    assert "[16] in layers 0, 2; [32] in layers 1, 3" in card.text
    for config in card.data.configs:
        name = config["config_name"]
        ds = datasets.load_dataset(str(mixed), name, split="train", cache_dir=str(tmp_path / "cache"))
        if name == "examples":
            assert ds.num_rows == 4
            continue
        want = concat_rows([pq.read_table(p) for p in _files(mixed, config["data_files"][0]["path"])])
        got = ds.data.table
        assert got.num_rows == want.num_rows > 0, name
        keys = [(c, "ascending") for c in ("layer", "kind", "head", "example_id", "position")]
        got, want = got.sort_by(keys), want.sort_by(keys)
        assert got["vector"].to_pylist() == want["vector"].to_pylist(), name
        assert got["token_str"].to_pylist() == want["token_str"].to_pylist(), name
        assert got.drop_columns(["vector", "token_str"]).equals(want.drop_columns(["vector", "token_str"])), name
    layer = qk_attn.load(mixed, layer=1, kind="q")  # one head size: (N, 32) vectors
    assert qk_attn.load_vectors(mixed, layer=1, kind="q").shape == (layer.num_rows, 32)
    with pytest.raises(ValueError, match=r"different head sizes \(16, 32\).*pass layer="):
        qk_attn.load_vectors(mixed, kind="q")


def test_the_cards_configs_read_the_key_folders_only_not_copies_beside_them(mixed, tmp_path):
    """`all_k` (`l*h*k/*.parquet`) also read a backup `l00h00q.bak` (whose name ends in k) or `logs_check/`:
    query rows in the key config, while verify, which reads key folders only, passed."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(mixed, out)
    for folder, copy in (("l00h00q", "l00h00q.bak"), ("l00h00k", "l00h00k.bak"), ("l01h00k", "logs_check")):
        shutil.copytree(out / folder, out / copy)
    card = DatasetCard.load(out / "README.md")
    for name in ("all_k", "all_q", "layer00_k", "layer01_k"):
        (config,) = [c for c in card.data.configs if c["config_name"] == name]
        got = datasets.load_dataset(str(out), name, split="train", cache_dir=str(tmp_path / "cache")).data.table
        kind, layer = name[-1], None if name.startswith("all") else int(name[5:7])
        want = qk_attn.load(out, kind=kind, **({} if layer is None else {"layer": layer}))
        keys = [(c, "ascending") for c in ("layer", "head", "example_id", "position")]
        assert got.num_rows == want.num_rows > 0, name
        assert (
            got.select(["layer", "head", "kind", "example_id", "position"])
            .sort_by(keys)
            .equals(want.select(["layer", "head", "kind", "example_id", "position"]).sort_by(keys))
        ), name


def test_load_filters_refuse_wrong_values_naming_the_argument(mixed):
    everything = qk_attn.load(mixed)
    for layer, head, kind in ((1, 0, "k"), (0, None, "q"), (None, 3, None)):
        mask = pa.array([True] * everything.num_rows)
        for column, value in (("layer", layer), ("head", head), ("kind", kind)):
            if value is not None:
                mask = pc.and_(mask, pc.equal(everything[column], value))
        got = qk_attn.load(mixed, layer=layer, head=head, kind=kind)
        vector = got.schema.get_field_index("vector")  # a list where the head sizes differ
        got = got.set_column(vector, "vector", got["vector"].cast(everything.schema.field("vector").type))
        assert sort_rows(got).equals(sort_rows(everything.filter(mask)))
    for argument, value in (("layer", True), ("layer", "1"), ("head", 1.0), ("head", -1), ("layer", [0, 1])):
        with pytest.raises(
            ValueError, match=rf"^{argument}={re.escape(repr(value))} is invalid: expected a {argument} index"
        ):
            qk_attn.load(mixed, **{argument: value})
    with pytest.raises(LookupError, match=r"head=3 is not among the heads with rows \(0, 1\)$"):
        qk_attn.load(mixed, layer=0, head=3, kind="k")  # 2 KV heads
    with pytest.raises(LookupError, match=r"layer=4 is not among the layers with rows \(0, 1, 2, 3\)$"):
        qk_attn.load(mixed, layer=4)
    with pytest.raises(ValueError, match=r"^columns: 'vectr' not in this capture; its columns: example_id, "):
        qk_attn.load(mixed, layer=0, columns=["vectr"])  # a typo, not a damaged shard
    for columns in ("vector", [], {"vector"}):
        with pytest.raises(ValueError, match=r"^columns=.* is invalid: expected a non-empty list"):
            qk_attn.load(mixed, columns=columns)
    with pytest.raises(ValueError, match=r"^columns=\['vector', 'vector'\] names a column twice$"):
        qk_attn.load(mixed, columns=["vector", "vector"])  # was a bare KeyError from Arrow
    # a tuple is a list of names (it was reported as a damaged shard, with repair advised)
    assert qk_attn.load(mixed, layer=0, columns=("position",)).equals(
        qk_attn.load(mixed, layer=0, columns=["position"])
    )


def _capture(out, **kwargs):
    model = build("llama3", "qk_sniff")
    with torch.inference_mode(), qk_attn.session(output=out, example_ids=[0, 1], **SETTINGS, **kwargs):
        model(**padded_batch("left", lengths=(6, 4)))


def test_a_readme_of_the_users_own_is_never_replaced_or_deleted(tmp_path):
    own = "# My notes on this capture\n"
    out = tmp_path / "out"
    _capture(out)
    (out / "README.md").write_text(own)
    assert write_card(out) is None  # every writer of the card: close, repair, merge, push
    _capture(out, overwrite=True)  # overwriting the capture deletes what it wrote, nothing else
    assert (out / "README.md").read_text() == own and read_manifest(out)["examples"]

    ranks = tmp_path / "ranks"
    model = build("llama3", "qk_sniff")
    for rank in (0, 1):
        sink = ParquetSink(ranks, SniffConfig(output=str(ranks), **SETTINGS), rank=(rank, 2), fsync=False)
        sink.complete = True
        with torch.inference_mode(), qk_attn.session(sink=sink, example_ids=[rank], **SETTINGS):
            model(**padded_batch("left", lengths=(5,)))
    (ranks / "README.md").write_text(own)
    distributed.merge(ranks)
    assert (ranks / "README.md").read_text() == own
    assert qk_attn.load(ranks).num_rows == 2 * 3 * (4 + 2) * 5


def test_overwriting_a_capture_keeps_the_users_own_files_in_its_folders(tmp_path):
    """overwrite=True deleted every (layer, head, kind) folder whole, a note the user kept there with it;
    it deletes the shards it wrote (and a folder left empty), as it keeps a README of the user's own."""
    out = tmp_path / "out"
    _capture(out)
    (out / "l00h00q" / "notes.txt").write_text("mine")
    first = qk_attn.load(out)
    _capture(out, overwrite=True)
    assert (out / "l00h00q" / "notes.txt").read_text() == "mine"
    assert qk_attn.load(out).equals(first)  # the rows of the new capture only, not twice
    assert verify_dataset(out, log=lambda *_: None) == []


def test_overwriting_a_capture_refuses_a_parquet_file_of_the_users_own_in_its_folders(tmp_path):
    """A Parquet file of the user's own (a copy of an old shard) in a (layer, head, kind) folder was kept,
    and `load_dataset` read its rows as part of the new capture (the card's configs glob *.parquet there),
    while verify failed. Refused before anything is deleted, naming the file."""
    import datasets

    from qk_attn.errors import NotACapture

    out = tmp_path / "out"
    _capture(out)
    shard = next((out / "l00h00q").glob("*.parquet"))
    (out / "l00h00q" / "mine.parquet").write_bytes(shard.read_bytes())
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(NotACapture, match=r"l00h00q/mine\.parquet is no shard qk-attn wrote, .*move it out"):
        _capture(out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (out / "l00h00q" / "mine.parquet").unlink()
    _capture(out, overwrite=True)
    loaded = datasets.load_dataset(str(out), "l00h00q", split="train")
    assert loaded.num_rows == qk_attn.load(out, layer=0, head=0, kind="q").num_rows


def test_a_card_the_user_edited_is_kept_and_an_untouched_one_is_rewritten(tmp_path):
    """The card's last line signs the text above it. An untouched card (or one written before cards
    were signed) is qk-sniff's to rewrite; once the user edits it, it is theirs: resuming the capture
    does not overwrite it, and deleting it has the card written again."""
    out = tmp_path / "out"
    _capture(out)
    card = out / "README.md"
    written = card.read_text()
    assert written.splitlines()[-1].startswith("<!-- qk-sniff wrote this card; sha256")
    unsigned = written[: written.rstrip("\n").rfind("\n") + 1]  # as cards were before the signature
    card.write_text(unsigned)
    assert write_card(out) == card and card.read_text() == written

    edited = written.replace("## Loading", "My notes: layer 0 looks odd.\n\n## Loading")
    card.write_text(edited)
    with torch.inference_mode(), qk_attn.session(output=out, example_ids=[2], **SETTINGS):  # resumed
        build("llama3", "qk_sniff")(**padded_batch("left", lengths=(5,)))
    assert card.read_text() == edited and "2" in read_manifest(out)["examples"]
    card.write_text(written + "More notes after the signature.\n")
    assert write_card(out) is None
    card.unlink()
    assert write_card(out) == card and "My notes" not in card.read_text()


def test_a_shard_merged_away_while_load_read_the_folder_is_read_from_the_new_manifest(tmp_path, monkeypatch):
    """A capture compacting the folder deletes the parts after its new manifest lists the merged shard:
    a load that read the old manifest found a part missing and advised repair on a healthy folder."""
    from qk_attn.dataset import load as load_module
    from qk_attn.errors import CorruptShard

    out = tmp_path / "out"
    _capture(out)
    want = qk_attn.load(out, layer=0)
    opened = load_module._open

    def stale(*args):
        root, manifest, remote = opened(*args)
        gone = {**manifest, "shards": {k: [n.replace("-p", "-q") for n in v] for k, v in manifest["shards"].items()}}
        monkeypatch.setattr(load_module, "_open", opened)  # the next read sees the folder as it is
        return root, gone, remote

    monkeypatch.setattr(load_module, "_open", stale)
    assert qk_attn.load(out, layer=0).equals(want)
    (out / "l00h00q" / read_manifest(out)["shards"]["l00h00q"][0]).unlink()  # really missing: still refused
    with pytest.raises(CorruptShard, match="qk-sniff repair"):
        qk_attn.load(out, layer=0)


def test_datasets_reads_each_capture_not_its_cache_of_another_with_the_same_folder_name(tmp_path):
    """`datasets` keys its cache of a local folder on the card's YAML: a second capture in a folder of the
    same name (`out`, as the README names it), the same folder after a resume, or after an overwrite with
    other example ids (files of the same sizes), was read from the first one's cache, silently. Each config's
    bytes and shard digest in the card's `dataset_info` tell them apart."""
    model = build("llama3", "qk_sniff")
    cache = str(tmp_path / "cache")

    def capture(out, ids, length, overwrite=False):
        with torch.inference_mode(), qk_attn.session(output=out, overwrite=overwrite, **SETTINGS) as s:
            for n, example in enumerate(ids):
                s.begin([example])
                model(input_ids=torch.randint(2, 90, (1, length), generator=torch.Generator().manual_seed(n)))
                s.commit()

    def read(out):
        rows = datasets.load_dataset(str(out), "l00h00q", split="train", cache_dir=cache)
        return sorted(set(rows["example_id"])), rows.num_rows

    first, second = tmp_path / "a" / "out", tmp_path / "b" / "out"
    capture(first, [1, 2], 10)
    capture(second, [100, 200, 300], 7)
    assert read(first) == ([1, 2], 20)
    assert read(second) == ([100, 200, 300], 21)
    capture(first, [3], 5)  # resumed with one more example
    assert read(first) == ([1, 2, 3], 25)
    capture(second, [105, 205, 305], 7, overwrite=True)  # the same tokens under other ids
    assert read(second) == ([105, 205, 305], 21)
