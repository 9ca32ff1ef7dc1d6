"""The Arrow schema of every shard, and a table in it from host rows (`token_str` from a vocabulary).

`arrow_schema` is the one definition of the columns; `columns_table` builds a table in it
from numpy chunks, copying only the small ones.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def columns_table(
    example_id,
    position,
    bucket,
    vectors,
    token_id,
    layer: int,
    head: int,
    kind: str,
    sliding_window: int | None,
    head_dim: int,
    vector_type: pa.DataType,
    token_ids: bool,
    vocabulary: TokenStrings | None = None,
) -> pa.Table:
    """A table in the dataset schema from lists of numpy chunks (one chunk per piece): numeric
    numpy arrays become Arrow arrays zero-copy, runs of small chunks are joined first
    (`_join_small_chunks`); the constant columns are made once. `vectors` chunks are flat
    (rows * head_dim,); `token_id` chunks may be None (nulls)."""
    example_id, position, bucket, vectors, token_id = _join_small_chunks(
        example_id, position, bucket, vectors, token_id
    )
    n = sum(len(c) for c in position)
    chunked = lambda chunks, t: pa.chunked_array([pa.array(c, t) for c in chunks], t)  # noqa: E731
    columns = [
        chunked(example_id, pa.int64()),
        chunked(position, pa.int32()),
        chunked(bucket, pa.int32()),
        pa.array(np.full(n, layer, np.int16)),
        pa.array(np.full(n, head, np.int16)),
        pa.repeat(pa.scalar(kind, pa.string()), n),
        pa.nulls(n, pa.int32()) if sliding_window is None else pa.array(np.full(n, sliding_window, np.int32)),
        pa.chunked_array(
            [pa.FixedSizeListArray.from_arrays(pa.array(c, vector_type), head_dim) for c in vectors],
            pa.list_(vector_type, head_dim),
        ),
    ]
    if token_ids:
        tokens = [
            pa.nulls(len(p), pa.int32()) if t is None else pa.array(t, pa.int32()) for t, p in zip(token_id, position)
        ]
        columns.append(pa.chunked_array(tokens, pa.int32()))
        if vocabulary is not None:
            columns.append(
                pa.chunked_array([_token_str(t, vocabulary) for t in tokens], pa.dictionary(pa.int32(), pa.string()))
            )
    schema = arrow_schema(head_dim, vector_type, token_ids, vocabulary is not None)
    return pa.Table.from_arrays(columns, schema=schema)


SMALL_CHUNK_ROWS = 1024


def _join_small_chunks(example_id, position, bucket, vectors, token_id) -> tuple[list, ...]:
    """The chunk lists with each run of chunks under SMALL_CHUNK_ROWS rows joined into one. A
    decode step brings one row per call, and every chunk costs Arrow about 20 us per column to
    convert and Parquet as much again to write: 64 one-row chunks took 10x one chunk of 64 rows.
    Large chunks stay zero-copy. A run also ends where `token_id` turns from None to an array."""
    runs: list[list[int]] = []
    for i, chunk in enumerate(position):
        last = runs[-1] if runs else None
        if (
            last is not None
            and len(chunk) < SMALL_CHUNK_ROWS
            and len(position[last[-1]]) < SMALL_CHUNK_ROWS
            and (token_id[i] is None) == (token_id[last[-1]] is None)
        ):
            last.append(i)
        else:
            runs.append([i])
    if len(runs) == len(position):
        return example_id, position, bucket, vectors, token_id

    def joined(chunks: list) -> list:
        return [
            chunks[run[0]] if len(run) == 1 or chunks[run[0]] is None else np.concatenate([chunks[i] for i in run])
            for run in runs
        ]

    return tuple(joined(chunks) for chunks in (example_id, position, bucket, vectors, token_id))


class TokenStrings:
    """A vocabulary as `token_str`'s dictionary: the strings by id, none null (Parquet cannot write a null in a
    dictionary), and the ids that have none (None in the list given), whose token_str is null."""

    __slots__ = ("strings", "missing")

    def __init__(self, vocabulary: list) -> None:
        strings = pa.array(vocabulary, pa.string())
        self.missing = np.asarray(strings.is_null()) if strings.null_count else None
        self.strings = strings.fill_null("") if strings.null_count else strings

    def __len__(self) -> int:
        return len(self.strings)


def _token_str(token_id: pa.Array, vocabulary: TokenStrings) -> pa.DictionaryArray:
    # Ids outside the vocabulary (added tokens the list lacks) become nulls, not an error mid-run.
    ids = token_id.to_numpy(zero_copy_only=False)
    bad = np.isnan(ids) if ids.dtype.kind == "f" else np.zeros(len(ids), bool)
    ids = np.where(bad, 0, ids).astype(np.int64)
    bad |= (ids < 0) | (ids >= len(vocabulary))
    ids = np.where(bad, 0, ids).astype(np.int32)
    if vocabulary.missing is not None:
        bad |= vocabulary.missing[ids]
    return pa.DictionaryArray.from_arrays(pa.array(ids, mask=bad), vocabulary.strings)


def arrow_schema(
    head_dim: int, vector_type: pa.DataType = pa.float32(), token_id: bool = False, token_str: bool = False
) -> pa.Schema:
    """Columns of every shard (docs/architecture.md); `token_id` (int32, nullable) and `token_str`
    (dictionary-encoded string) are present for the whole dataset or absent."""
    fields = [
        ("example_id", pa.int64()),
        ("position", pa.int32()),
        ("bucket", pa.int32()),
        ("layer", pa.int16()),
        ("head", pa.int16()),
        ("kind", pa.string()),
        ("sliding_window", pa.int32()),
        ("vector", pa.list_(vector_type, head_dim)),
    ]
    if token_id:
        fields.append(("token_id", pa.int32()))
        if token_str:
            fields.append(("token_str", pa.dictionary(pa.int32(), pa.string())))
    return pa.schema(fields)


def concat_rows(tables: list[pa.Table]) -> pa.Table:
    """Row tables as one. Where layers differ in head size (Gemma 4's global layers), `vector` becomes
    list<float32> (each row keeps its own length) instead of a fixed-size list that fits none."""
    if len({table.schema.field("vector").type for table in tables}) > 1:
        column = tables[0].schema.get_field_index("vector")
        vector = pa.list_(tables[0].schema.field("vector").type.value_type)
        tables = [table.set_column(column, "vector", table["vector"].cast(vector)) for table in tables]
    return pa.concat_tables(tables)
