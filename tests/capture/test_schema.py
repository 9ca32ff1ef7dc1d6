"""columns_table: a table in the dataset schema from numpy chunks, whatever their sizes."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qk_attn.capture.schema import SMALL_CHUNK_ROWS, arrow_schema, columns_table

HEAD_DIM = 4


def _chunks(sizes, token_ids):
    """One chunk per size, as a capture brings them: a prefill's large chunk, decode steps' one-row
    chunks; `token_ids[i]` False gives chunk i no token ids (inputs_embeds)."""
    rng = np.random.default_rng(0)
    start, chunks = 0, []
    for size, has_ids in zip(sizes, token_ids):
        positions = np.arange(start, start + size, dtype=np.int64)
        chunks.append(
            (
                np.full(size, 7, np.int64),
                positions,
                np.minimum(positions, 5),
                rng.standard_normal(size * HEAD_DIM).astype(np.float32),
                positions.astype(np.float32) + 100 if has_ids else None,
            )
        )
        start += size
    return chunks


@pytest.mark.parametrize(
    "sizes, token_ids",
    [
        ([SMALL_CHUNK_ROWS + 5] + [1] * 40, [True] * 41),  # prefill, then decode steps
        ([1] * 30 + [SMALL_CHUNK_ROWS] + [2] * 9, [True] * 40),  # a large chunk between small runs
        ([1] * 10 + [3] * 10 + [1] * 10, [True] * 10 + [False] * 10 + [True] * 10),  # ids, embeds, ids
        ([0, 1, 0, 2], [True, False, False, True]),  # calls that kept no row
    ],
)
def test_rows_equal_the_chunks_in_order(sizes, token_ids):
    chunks = _chunks(sizes, token_ids)
    example_id, position, bucket, vectors, token_id = (list(column) for column in zip(*chunks))
    table = columns_table(
        example_id, position, bucket, vectors, token_id, 3, 2, "k", None, HEAD_DIM, pa.float32(), True
    )
    assert table.schema == arrow_schema(HEAD_DIM, pa.float32(), True)
    n = sum(sizes)
    assert table.num_rows == n
    # Ground truth from the chunks themselves, one value per row.
    assert table["example_id"].to_pylist() == [7] * n
    assert table["position"].to_pylist() == list(range(n))
    assert table["bucket"].to_pylist() == [min(p, 5) for p in range(n)]
    assert table["layer"].to_pylist() == [3] * n and table["head"].to_pylist() == [2] * n
    assert table["kind"].to_pylist() == ["k"] * n and table["sliding_window"].null_count == n
    expected_vectors = np.concatenate(vectors).reshape(n, HEAD_DIM)
    np.testing.assert_array_equal(np.array(table["vector"].to_pylist(), np.float32), expected_vectors)
    expected_ids = [p + 100 if ids else None for size, ids, p in _row_flags(sizes, token_ids)]
    assert table["token_id"].to_pylist() == expected_ids
    # And the same rows after a Parquet round trip.
    out = io.BytesIO()
    pq.write_table(table, out)
    assert pq.read_table(io.BytesIO(out.getvalue())).equals(table)


def test_many_one_row_chunks_become_few():
    sizes = [SMALL_CHUNK_ROWS * 2] + [1] * 100 + [SMALL_CHUNK_ROWS] + [1] * 50
    chunks = _chunks(sizes, [True] * len(sizes))
    table = columns_table(*(list(c) for c in zip(*chunks)), 0, 0, "q", 16, HEAD_DIM, pa.float32(), True)
    assert table["position"].num_chunks == 4  # large, joined run, large, joined run
    assert table["position"].to_pylist() == list(range(sum(sizes)))


def _row_flags(sizes, token_ids):
    position = 0
    for size, ids in zip(sizes, token_ids):
        for _ in range(size):
            yield size, ids, position
            position += 1


def test_an_in_memory_table_stores_float16_vectors_as_a_folder_does(tmp_path):
    """vector_dtype="float16": the memory table's vectors were float32 (the float16 values, widened),
    while a folder's are float16; the same capture now gives the same type and values either way."""
    import torch

    import qk_attn
    from support.models import build

    model = build("llama3", "qk_sniff")
    ids = torch.arange(3, 11)[None]
    with qk_attn.session(sampler="all", vector_dtype="float16") as s:
        model(input_ids=ids)
    with qk_attn.session(output=tmp_path / "out", sampler="all", vector_dtype="float16"):
        model(input_ids=ids)
    folder = qk_attn.load(tmp_path / "out")
    memory = s.table()
    assert (
        memory.schema.field("vector").type.value_type == pa.float16() == folder.schema.field("vector").type.value_type
    )
    order = [(c, "ascending") for c in ("example_id", "layer", "kind", "head", "position")]
    assert memory.sort_by(order).column("vector").to_pylist() == folder.sort_by(order).column("vector").to_pylist()
