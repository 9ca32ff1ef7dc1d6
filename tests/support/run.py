"""Tiny saved models, documents and run configs the run tests share, and row comparisons."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import yaml

from qk_attn.capture.sinks import MemorySink
from qk_attn.run import runner
from qk_attn.run.config import RunConfig
from qk_attn.storage.manifest import read_manifest

WORDS = [f"w{i}" for i in range(60)]


LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 8


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_config(model_dir, documents, out, **sections) -> RunConfig:
    data = {
        "dataset": {"path": str(documents), "text_column": "body", "id_column": "doc"},
        "model": {"name": str(model_dir), "dtype": "float32", "device": "cpu"},
        "capture": {"sampler": "all"},
        "output": {"data_root": str(out)},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return RunConfig.from_dict(data)


def run_in_memory(config: RunConfig):
    sink = MemorySink()
    summary = runner.run(config, sink=sink, progress=False)
    return summary, sink.table(), sink


def positions_by_example(table, kind="k", layer=0, head=0):
    out = {}
    t = table.to_pydict()
    for e, lay, h, k, p in zip(t["example_id"], t["layer"], t["head"], t["kind"], t["position"]):
        if (lay, h, k) == (layer, head, kind):
            out.setdefault(e, []).append(p)
    return {e: sorted(p) for e, p in out.items()}


def write_config(tmp_path, model_dir, documents, out, **sections) -> str:
    data = make_config(model_dir, documents, out, **sections).to_dict()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def all_rows(out) -> dict[tuple, np.ndarray]:
    """{(example, layer, head, kind, position, bucket): vector} of every committed row; asserts uniqueness."""
    from qk_attn.dataset.load import load

    t = load(out).to_pydict()
    keys = ("example_id", "layer", "head", "kind", "position", "bucket")
    rows = {tuple(t[k][i] for k in keys): np.asarray(t["vector"][i]) for i in range(len(t["example_id"]))}
    assert len(rows) == len(t["example_id"]), "duplicate rows"
    return rows


def assert_same_rows(got: dict, want: dict, exact: bool = True) -> None:
    assert got.keys() == want.keys()
    for key, vector in want.items():
        if exact:
            np.testing.assert_array_equal(got[key], vector, err_msg=str(key))
        else:  # another batch composition: same tokens, float rounding of padded matmuls may differ
            np.testing.assert_allclose(got[key], vector, rtol=1e-5, atol=1e-6, err_msg=str(key))


def assert_same_datasets(got, want) -> None:
    """The same rows, per-example counts and examples table in two capture folders."""
    assert_same_rows(all_rows(got), all_rows(want))
    manifests = [read_manifest(path) for path in (got, want)]
    for field in ("examples", "calls", "row_counts"):
        assert manifests[0][field] == manifests[1][field], field
    assert pq.read_table(got / "examples.parquet").equals(pq.read_table(want / "examples.parquet"))


SPARSE = {"sampler": {"type": "log_uniform", "base_rate": 2}, "min_bucket_size": 2}
