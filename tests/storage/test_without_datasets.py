"""A capture opens, records and closes (manifest, Parquet, card, chart) with `datasets` not importable,
as on the GPU image, which has no `datasets`: run in a subprocess where `import datasets` fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from huggingface_hub import DatasetCard

TESTS = Path(__file__).resolve().parents[1]  # where tests/support lives
ROOT = TESTS.parent

CAPTURE = """
import json, sys
sys.modules["datasets"] = None  # `import datasets` (and any submodule) now raises ImportError
import torch
import qk_attn
from support.models import build, padded_batch

model = build("llama3", "qk_sniff")
with torch.inference_mode(), qk_attn.session(output=sys.argv[1], sampler="all", example_ids=[0, 1]) as s:
    model(**padded_batch("left", lengths=(12, 7)))
print(json.dumps({"rows": s.rows_written, "datasets": [m for m in sys.modules if m.split(".")[0] == "datasets"]}))
"""


def test_capture_closes_with_the_card_when_datasets_cannot_be_imported(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, "-c", CAPTURE, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["datasets"] == ["datasets"]  # only the blocking None entry: nothing imported it

    rows = 3 * (4 + 2) * (12 + 7)  # 3 layers x (4 query + 2 key heads) x every valid token
    assert report["rows"] == rows
    shards = sorted(out.glob("l*h*/*.parquet"))
    assert sum(pq.read_metadata(p).num_rows for p in shards) == rows
    assert {p.parent.name for p in shards} == {
        f"l{layer:02d}h{h:02d}{k}" for layer in range(3) for k, heads in (("q", 4), ("k", 2)) for h in range(heads)
    }

    card = DatasetCard.load(out / "README.md")
    configs = {c["config_name"]: c["data_files"] for c in card.data.configs}
    assert [c["config_name"] for c in card.data.configs] == sorted(configs)
    assert configs["l01h03q"] == [{"split": "train", "path": "l01h03q/*.parquet"}]
    assert configs["layer02_k"] == [{"split": "train", "path": "l02h[0-9][0-9]k/*.parquet"}]
    assert configs["all_q"] == [{"split": "train", "path": "l[0-9][0-9]h[0-9][0-9]q/*.parquet"}]
    assert len(configs) == 18 + 6 + 2 + ("examples" in configs)
    assert (out / "buckets.png").stat().st_size > 0
