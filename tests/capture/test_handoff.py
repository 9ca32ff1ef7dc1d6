"""The work of one decode step, counted (issue 20): the structural guarantee that holds on a GPU too.

Per step of a decode over a dynamic cache, into a Parquet session: at most one gather per recorded
(layer, kind) and none for a call the sampler keeps nothing of, one hand-off of the whole forward
(`Transfer.send_forward`: on CUDA its one device-to-host copy), no per-call transfer, and one piece
on the saver's queue. The rows written are still every row of the decode (checked against the
model's own states).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from transformers import DynamicCache, StoppingCriteriaList

import qk_attn
from qk_attn.capture import call_rows
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.shards import CallBuffer
from qk_attn.storage.transfer import ForwardPiece, Piece, Transfer
from support.device_path import ARRIVES, arrived, generate_counting_launches
from support.models import StopRow, build, cache_kw, padded_batch
from support.run import all_rows, assert_same_datasets, assert_same_rows

PROMPT, STEPS = 8, 5
LAYERS, KINDS = 3, 2  # the tiny llama: every layer records q and k


class Counts:
    """Calls counted per decode step (`step` is set by the test before each forward)."""

    def __init__(self) -> None:
        self.step = -1
        self.per_step: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def count(self, what: str, n: int = 1) -> None:
        self.per_step[self.step][what] += n

    def wrap(self, monkeypatch, owner, name: str, what: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.count(what)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


class _CountingQueue:
    """The saver's queue, counting the forward pieces put on it (they come held together, in lists)."""

    def __init__(self, inner, counts: Counts) -> None:
        self.inner, self.counts, self.get = inner, counts, inner.get

    def put(self, item) -> None:
        for piece in item if isinstance(item, list) else [item]:
            if isinstance(piece, (ForwardPiece, Piece)):
                self.counts.count("pieces")
        self.inner.put(item)


def _decode(tmp_path, monkeypatch, sampler: str, **settings) -> tuple[Counts, object]:
    model = build("llama3", "qk_sniff")
    counts = Counts()
    counts.wrap(monkeypatch, call_rows, "gather_selected", "gathers")  # the torch path's one gather per call
    counts.wrap(monkeypatch, call_rows, "select_tokens", "selections")
    counts.wrap(monkeypatch, Transfer, "send_forward", "hand-offs")
    counts.wrap(monkeypatch, Transfer, "send", "per-call transfers")
    counts.wrap(monkeypatch, Transfer, "_copy", "device-to-host copies")
    counts.wrap(monkeypatch, CallBuffer, "add", "saver chunks")  # on the saver thread: totals only
    torch.manual_seed(5)
    ids = torch.randint(2, 90, (1, PROMPT + STEPS))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), qk_attn.session(output=str(tmp_path / "out"), sampler=sampler, **settings) as s:
        s.sink._queue = _CountingQueue(s.sink._queue, counts)  # the saver reads the attribute at each get
        s.begin([0])
        model(input_ids=ids[:, :PROMPT], **cache_kw(cache))
        for step in range(STEPS):
            counts.step = step
            model(input_ids=ids[:, PROMPT + step : PROMPT + step + 1], **cache_kw(cache))
        counts.step = STEPS
        s.commit()
    return counts, read_manifest(tmp_path / "out")


@pytest.mark.parametrize("sampler", ["all", "uniform"])
def test_one_hand_off_and_one_piece_per_decode_step(tmp_path, monkeypatch, sampler):
    settings = {"min_bucket_size": 4, "base_rate": 0.5} if sampler == "uniform" else {}
    counts, _ = _decode(tmp_path, monkeypatch, sampler, **settings)
    # Step 0 also hands off the prompt's forward (the first forward's end is known at the next mask).
    # The sink holds pieces back and queues them together (at the commit here): one piece per forward.
    for step in range(1, STEPS):
        work = counts.per_step[step]
        assert work["hand-offs"] == 1, (step, work)
        assert work["per-call transfers"] == 0 and work["device-to-host copies"] == 0, (step, work)  # CPU: none
        assert work["gathers"] <= LAYERS * KINDS, (step, work)
        if sampler == "all":  # every call keeps its one token; the selection is made once per forward
            assert work["gathers"] == LAYERS * KINDS and work["selections"] == 1, (step, work)
    assert counts.per_step[0]["hand-offs"] == 2
    assert sum(work["pieces"] for work in counts.per_step.values()) == 1 + STEPS


def test_calls_that_keep_nothing_cost_no_gather(tmp_path, monkeypatch):
    """base_rate 0 past the first bucket: decode positions are never kept, so no step gathers anything,
    yet each step's calls are handed off (the heads ran, with 0 rows)."""
    counts, manifest = _decode(tmp_path, monkeypatch, "log_uniform", min_bucket_size=4, base_rate=1e-9)
    for step in range(1, STEPS):
        work = counts.per_step[step]
        assert work["gathers"] == 0 and work["selections"] == 0 and work["hand-offs"] == 1, (step, work)
    assert manifest["examples"] == {"0": PROMPT + STEPS}  # every token counted, none kept
    assert set(manifest["calls"].values()) == {1 + STEPS}  # every head of every call ran: prompt + steps
    assert not any(manifest["row_counts"].values())


def test_every_decoded_row_arrives(tmp_path, monkeypatch):
    """The hand-off loses nothing: under "all" every layer, kind and head has every position. The saver
    keeps one chunk per call (its heads together), not one per head."""
    counts, _ = _decode(tmp_path, monkeypatch, "all")
    assert sum(work["saver chunks"] for work in counts.per_step.values()) == (1 + STEPS) * LAYERS * KINDS
    table = qk_attn.load(str(tmp_path / "out"))
    model = build("llama3", "qk_sniff")
    heads = {"q": model.config.num_attention_heads, "k": model.config.num_key_value_heads}
    keys = collections.Counter(zip(table["layer"].to_pylist(), table["kind"].to_pylist(), table["head"].to_pylist()))
    assert set(keys) == {(layer, kind, h) for layer in range(LAYERS) for kind in heads for h in range(heads[kind])}
    assert set(keys.values()) == {PROMPT + STEPS}
    assert sorted(set(table["position"].to_pylist())) == list(range(PROMPT + STEPS))


@pytest.mark.parametrize("output", [False, True])
def test_a_static_cache_offset_the_host_derived_is_checked_with_the_rows(tmp_path, output):
    """Decode steps over a static cache take their offset from the sequence (no device read per
    forward); a cache emptied behind the session's back (its layers reset) makes that offset wrong, and the rows of that
    forward are refused loudly, in memory and in Parquet, never recorded at the wrong slot. The steps
    give their position_ids, so that the positions go on as the sequence's would (without them the
    reset cache's positions restart, which the forward itself refuses: test_positions.py)."""
    from transformers import StaticCache

    from qk_attn.errors import CaptureError

    model = build("llama3", "qk_sniff")
    ids = torch.randint(2, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    cache = StaticCache(config=model.config, max_cache_len=16)
    settings = {"output": str(tmp_path / "out")} if output else {}
    with pytest.raises(CaptureError, match="the cache was at position 0, not 7"):
        with torch.inference_mode(), qk_attn.session(sampler="all", **settings) as s:
            model(input_ids=ids[:, :5], **cache_kw(cache))
            for t in range(5, 7):  # derived offsets 5 and 6: both right
                model(input_ids=ids[:, t : t + 1], position_ids=torch.tensor([[t]]), **cache_kw(cache))
            for layer in cache.layers:  # emptied behind the session's back (Cache.reset() is seen: a new sequence)
                layer.reset()
            model(input_ids=ids[:, 7:8], position_ids=torch.tensor([[7]]), **cache_kw(cache))
            s.flush()
    if output:
        assert read_manifest(tmp_path / "out")["examples"] == {}  # nothing of the refused sequence


def test_a_forward_too_large_to_stage_streams_call_by_call_and_loses_nothing(tmp_path, monkeypatch, caplog):
    """pinned_mb=1 stages at most 0.5 MiB per forward; a left-padded batch of 4 x 200 tokens under
    "all" is about 1 MiB, so its calls stream to the sink one by one (with a warning), and the rows
    equal those of an in-memory session, which stages the same forward whole."""
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(200, 150, 90, 200), seed=4)
    counts = Counts()
    counts.wrap(monkeypatch, Transfer, "send", "per-call transfers")
    counts.wrap(monkeypatch, Transfer, "send_forward", "hand-offs")
    with torch.inference_mode(), caplog.at_level("WARNING"):
        with qk_attn.session(output=str(tmp_path / "out"), sampler="all", pinned_mb=1, example_ids=[1, 2, 3, 4]):
            model(**batch)
        with qk_attn.session(sampler="all", example_ids=[1, 2, 3, 4]) as memory:
            model(**batch)
    assert counts.per_step[-1]["per-call transfers"] == LAYERS * KINDS
    assert counts.per_step[-1]["hand-offs"] == 0  # nothing else was staged (no empty calls, no checks)
    assert sum("exceed the staging limit" in r.message for r in caplog.records) == 1
    want = {key: np.asarray(vector) for key, vector in _keyed(memory.table()).items()}
    assert_same_rows(all_rows(tmp_path / "out"), want)


def _keyed(table) -> dict:
    t = table.to_pydict()
    keys = ("example_id", "layer", "head", "kind", "position", "bucket")
    return {tuple(t[k][i] for k in keys): t["vector"][i] for i in range(table.num_rows)}


@pytest.mark.parametrize("row_ends", [False, True])
@pytest.mark.parametrize("arrives", ARRIVES)
def test_a_gpu_decode_step_skips_what_it_keeps_nothing_of_once_its_positions_reach_the_host(
    tmp_path, monkeypatch, arrives, row_ends
):
    """The GPU path's decisions, run on CPU tensors (support/device_path.py): the copy of a decode
    step's positions lands at its first call, at its third (layer 2), or never. Each way, 70 steps
    of a left-padded generate() write the very dataset the CPU path writes, rows and per-example
    counts alike, also when a row ends (its EOS) after 30 steps and is fed padding from then on;
    the calls launched are exactly the ones made before the copy landed, and after it the ones
    that keep something."""
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(12, 9))
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
    stop = {"stopping_criteria": StoppingCriteriaList([StopRow(0, 12 + 30)])} if row_ends else {}
    runs = {}
    for name, way in (("cpu", None), ("gpu", arrives)):
        runs[name] = generate_counting_launches(
            model, prompt, tmp_path / name, monkeypatch, way, steps=70, min_new_tokens=70, **stop
        )
    on_host, on_device = runs["cpu"], runs["gpu"]
    assert_same_datasets(tmp_path / "gpu", tmp_path / "cpu")
    if row_ends:
        lengths = qk_attn.load_examples(tmp_path / "gpu").select(["example_id", "valid_length"]).to_pydict()
        assert lengths == {"example_id": [0, 1], "valid_length": [12 + 30, 9 + 69]}
    # Forward 1 is the prompt; the 70th token is never fed back: 69 decode steps.
    decode = [(f, layer) for f in range(2, 71) for layer in range(LAYERS)]
    kept = [on_host[key] for key in decode]  # the CPU path launches the kinds that keep something
    assert 0 in kept and any(kept), "no decode call kept nothing, or none kept something"
    for f, layer in decode:
        copied = arrived(arrives, layer + 1)
        assert on_device[(f, layer)] == (on_host[(f, layer)] if copied else KINDS), (f, layer)


def test_a_dense_decode_in_memory_keeps_few_pieces_of_rows():
    """An in-memory session merges its rows per (layer, kind) as they come (a binary counter): a dense
    decode kept a few tiny arrays per attention call, which fragmented the heap (memory grew with the
    square of the steps). The rows are the same, in every call's order within a layer and kind."""
    from qk_attn.capture import sinks

    model = build("llama3", "qk_sniff")
    tables = []
    for merge_at in (sinks.MERGE_AT, 10**9):  # merged as it comes; never merged
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sinks, "MERGE_AT", merge_at)
            with qk_attn.session(sampler="all") as s:
                cache = DynamicCache(config=model.config)
                model(input_ids=torch.arange(3, 11)[None], **cache_kw(cache))
                for step in range(200):
                    model(input_ids=torch.tensor([[11 + step % 50]]), **cache_kw(cache))
                held = len(s._sink.rows) if hasattr(s, "_sink") else len(s.sink.rows)
            tables.append((s.table().sort_by([(c, "ascending") for c in ("layer", "kind", "head", "position")]), held))
    (merged, held_merged), (unmerged, held_unmerged) = tables
    assert merged.equals(unmerged)
    assert held_unmerged == 201 * LAYERS * KINDS
    assert held_merged <= 2 * sinks.MERGE_AT + LAYERS * KINDS * 10  # O(log rows) pieces per layer and kind


def test_merged_rows_of_two_models_with_other_head_sizes_stay_apart():
    """Two models in one in-memory session share layer numbers: rows of another head size are merged
    apart (np.concatenate raised inside a forward, and every later forward and table() with it)."""
    import transformers as tf

    from qk_attn.capture import sinks
    from support.models import COMMON

    small = build("llama3", "qk_sniff")
    large = tf.LlamaForCausalLM(tf.LlamaConfig(**{**COMMON, "head_dim": 32})).eval()
    large.set_attn_implementation("qk_sniff")
    with qk_attn.session(sampler="all") as s:
        for step in range(sinks.MERGE_AT):
            (small if step % 2 else large)(input_ids=torch.arange(3, 9)[None])
    sizes = {len(v) for v in s.table().column("vector").to_pylist()}
    assert sizes == {16, 32} and s.table().num_rows == sinks.MERGE_AT * 6 * (4 + 2) * LAYERS  # tokens x heads
