"""Capture batches, sinks and folders the storage tests share, with the rows they must hold."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from qk_attn.capture.batch import CaptureBatch
from qk_attn.capture.gather import SelectionSpec, gather_rows
from qk_attn.capture.plan import HeadPlan, ModelShape
from qk_attn.capture.sinks import MemorySink
from qk_attn.config import SniffConfig
from qk_attn.sampler import Sampler
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.sink import ParquetSink


class TinyConfig:
    _name_or_path = "tiny/llama"
    _commit_hash = "abc123"
    dtype = torch.bfloat16
    model_type = "llama"


NUM_HEADS, NUM_KV, DIM = 4, 2, 8


def states_for(example_ids, layer: int, kind: str, length: int, num_heads: int, dim: int) -> torch.Tensor:
    """(B, H, T, D) states that depend only on (example, layer, kind, head, position): a resumed
    run, a different batching or another process gives bit-identical vectors."""
    ex = torch.tensor(example_ids, dtype=torch.float64)[:, None, None, None]
    h = torch.arange(num_heads, dtype=torch.float64)[None, :, None, None]
    t = torch.arange(length, dtype=torch.float64)[None, None, :, None]
    d = torch.arange(dim, dtype=torch.float64)[None, None, None, :]
    return torch.sin(ex * 1.37 + layer * 0.71 + (kind == "k") * 0.5 + h * 0.31 + t * 0.013 + d * 0.17).float()


def make_batch(
    layer,
    kind,
    example_ids,
    lengths,
    heads=(0, 1),
    sampler=None,
    dtype=torch.float32,
    num_heads=NUM_HEADS,
    dim=DIM,
    capacity=None,
    sliding_window=None,
) -> CaptureBatch:
    """One attention call's batch for `kind`: right-padded rows of `lengths` valid tokens."""
    sampler = sampler or Sampler("all", 4)
    length = max(lengths)
    positions = torch.arange(length, dtype=torch.int64).expand(len(example_ids), -1)
    valid = positions < torch.tensor(lengths)[:, None]
    states = states_for(example_ids, layer, kind, length, num_heads, dim)
    capacity = len(example_ids) * sampler.capacity(length) if capacity is None else capacity
    count, row, position, bucket, vectors = gather_rows(
        SelectionSpec(
            states,
            0,
            torch.tensor(heads),
            positions,
            valid,
            torch.tensor(example_ids),
            sampler,
            layer,
            kind,
            capacity,
            dtype,
        )
    )
    return CaptureBatch(
        layer,
        kind,
        tuple(heads),
        tuple(example_ids),
        sliding_window,
        False,
        count,
        row,
        position,
        bucket,
        vectors,
        valid.sum(1),
    )


def sort_rows(table: pa.Table) -> pa.Table:
    return table.sort_by([(c, "ascending") for c in ("layer", "kind", "head", "example_id", "position")])


def folder_table(out: Path) -> pa.Table:
    """Every committed row of OUT, read straight from the shards the manifest lists."""
    manifest = read_manifest(out)
    files = [out / key / name for key, names in manifest["shards"].items() for name in names]
    return pa.concat_tables(pq.read_table(f) for f in files)


def reference(batches, vector_type=pa.float32(), token_ids=True) -> pa.Table:
    """What rows.py's own host path makes of the same batches (new captures have `token_id`)."""
    sink = MemorySink()
    for batch in batches:
        sink.put(batch)
    return pa.concat_tables(
        rows.table(i, vector_type, token_ids=token_ids) for rows in sink.rows for i in range(len(rows.heads))
    )


def plan_for(config, num_layers=3):
    return HeadPlan.build(config, ModelShape(num_layers, NUM_HEADS, NUM_KV, DIM))


def open_sink(out, config=None, **kwargs) -> ParquetSink:
    config = config or SniffConfig(output=str(out), sampler="all", min_bucket_size=4)
    kwargs.setdefault("fsync", False)
    kwargs.setdefault("commit_every_s", 0)
    sink = ParquetSink(out, config, **kwargs)
    sink.bind_model(TinyConfig(), plan_for(config))
    return sink


def run_examples(sink, example_ids, layers=(0, 1), lengths=None, commit=True):
    batches = []
    for i, example in enumerate(example_ids):
        length = lengths[i] if lengths else 5 + example % 7
        for layer in layers:
            for kind, heads in (("q", (0, 1)), ("k", (0,))):
                batch = make_batch(layer, kind, [example], [length], heads, sampler=Sampler("all", 4))
                batches.append(batch)
                sink.put(batch)
        if commit:
            sink.commit([example])
    return batches


def capture_model(out: Path, *, drop_layer: bool = False, batches=((0, 1), (2, 3)), **settings) -> dict:
    """A real capture: tiny random Llama (3 layers, 4 query / 2 KV heads, head_dim 16) through
    qk_attn.session into OUT, left-padded batches of two. `drop_layer`: the model's last decoder layer
    hands its input on without running, so layer 2 (its attention module in place) is planned but never
    calls attention."""
    import qk_attn
    from support.models import build, padded_batch

    model = build("llama3", "qk_sniff")
    if drop_layer:
        model.model.layers[2].forward = lambda hidden_states, *args, **kwargs: hidden_states
    settings = {"sampler": "all", "min_bucket_size": 4, **settings}
    source = {"dataset": "toy/random-tokens", "split": "train", "max_length": 30}
    sink = ParquetSink(out, SniffConfig(output=str(out), **settings), source=source, commit_every_s=0, fsync=False)
    with torch.inference_mode(), qk_attn.session(sink=sink, **settings) as s:
        for ids in batches:
            s.begin(list(ids))
            model(**padded_batch("left", lengths=(30, 17), seed=ids[0]))
            s.commit()
    return read_manifest(out)
