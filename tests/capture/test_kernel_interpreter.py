"""The fused Triton kernel, run by Triton's interpreter on CPU, against the torch reference.

Run in its own process (`TRITON_INTERPRET=1 pytest -m interpreter`): the interpreter is
chosen when `triton.jit` decorates the kernel, so the variable must be set before Triton
is imported. Shapes are small and the kernel's block sizes are shrunk (`_scan`, `_block`,
`_programs`) so that every case runs many programs, chunk boundaries and partial blocks.
"""

from __future__ import annotations

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import qk_attn

pytestmark = pytest.mark.interpreter

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip(
        "Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported: "
        "run `TRITON_INTERPRET=1 pytest -m interpreter` in its own process (make test does)",
        allow_module_level=True,
    )
pytest.importorskip("triton", reason="Triton is not installed (pip install 'qk-attn[triton]')")

from qk_attn.capture.batch import CaptureBatch  # noqa: E402
from qk_attn.capture.gather import SelectionSpec, gather_rows, select_rows, uses_kernel  # noqa: E402
from qk_attn.errors import CaptureOverflow  # noqa: E402
from qk_attn.kernels.select_gather import gather_rows_triton  # noqa: E402
from qk_attn.sampler import Sampler  # noqa: E402
from support.kernel_reference import gather_rows_reference  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_BLOCKS = dict(_scan=16, _block=8, _programs=3)


def assert_same_selection(got, want, capacity):
    """count equal; rows, positions, buckets, vectors equal on the stored rows; filler as documented."""
    count, row, position, bucket, vectors = got
    assert int(count) == int(want[0]), f"count {int(count)} != reference {int(want[0])}"
    n = min(int(count), capacity)
    for name, a, b in (("row", row, want[1]), ("position", position, want[2]), ("bucket", bucket, want[3])):
        assert a.dtype == b.dtype, f"{name} dtype {a.dtype} != {b.dtype}"
        mismatch = (a[:n] != b[:n]).nonzero()
        assert mismatch.numel() == 0, f"{name} differs first at {mismatch[0].item()}: {a[:n]} vs {b[:n]}"
    assert vectors.dtype == want[4].dtype and vectors.shape == want[4].shape
    assert_bits_equal(vectors[:, :n], want[4][:, :n])
    assert (row[n:] == -1).all() and (position[n:] == 0).all() and (bucket[n:] == 0).all()
    assert (vectors[:, n:] == 0).all()


def assert_bits_equal(a, b):
    """Bit-identical floats, printing the first mismatches. Any NaN equals any NaN: torch's
    own NaN payload differs between its CPU (0xFFFF) and CUDA (0x7FFF) bf16 casts."""
    int_type = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    both_nan = a.isnan() & b.isnan()
    bad = ((a.contiguous().view(int_type) != b.contiguous().view(int_type)) & ~both_nan).nonzero()
    if bad.numel():
        first = [tuple(i) for i in bad[:5].tolist()]
        raise AssertionError(
            f"{bad.shape[0]} elements differ, first at {first}: "
            f"{[a[i].item() for i in first]} vs {[b[i].item() for i in first]}"
        )


def random_case(seed: int):
    """A random attention call: shapes, layout, padding, ids, positions, sampler, dtypes."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B, T = rng.randint(1, 3), rng.choice([1, 5, 16, 33, 70])
    H, D = rng.choice([1, 2, 4]), rng.choice([16, 64, 80, 96])
    cached = rng.choice([0, 0, 7])  # keys: new tokens sit after a KV cache
    dtype, out_dtype = rng.choice(DTYPES), rng.choice(DTYPES)
    # HF layout: (B, K, H, D) projected, then transposed -> non-contiguous (B, H, K, D).
    states = torch.randn(B, cached + T, H, D, generator=gen).mul(3).to(dtype).transpose(1, 2)
    if rng.random() < 0.3:  # a strided view along D and K as well
        states = torch.randn(B, H, 2 * (cached + T), 2 * D, generator=gen).to(dtype)[:, :, ::2, ::2]
    padding = rng.choice(["none", "left", "right", "random"])
    valid = torch.ones(B, T, dtype=torch.bool)
    lengths = [rng.randint(0, T) for _ in range(B)]
    for b, n in enumerate(lengths):
        if padding == "left":
            valid[b, : T - n] = False
        elif padding == "right":
            valid[b, n:] = False
    if padding == "random":
        valid = torch.rand(B, T, generator=gen) < 0.7
    start = rng.choice([0, 0, 0, 5, 100, 2**31 - 40])  # the last: int64 buckets, 32-bit hash input
    positions = start + cached + torch.arange(T).expand(B, T)  # expanded: stride 0 on B
    if padding == "left":  # HF-style left padding: positions count from the first real token
        positions = (valid.cumsum(1) - 1).clamp(min=0) + start
    first_id = rng.choice([0, 7, -3, 2**40 + 5, -(2**63), 2**63 - B])  # both int64 halves matter
    ids = [first_id + i for i in range(B)]
    strategy = rng.choice(["all", "uniform", "log_uniform"])
    sampler = Sampler(strategy, rng.choice([1, 2, 4, 8, 16]), rng.choice([0.5, 2.0, 8.0]), rng.randint(0, 2**32 - 1))
    kind, layer = rng.choice(["q", "k"]), rng.randint(0, 80)
    heads = torch.tensor(sorted(rng.sample(range(H), rng.randint(1, H))), dtype=torch.int64)
    offset = cached if rng.random() < 0.5 else torch.tensor(cached)  # device-scalar offset too
    full = sampler.keep(torch.tensor(ids), layer, kind, positions) & valid
    capacity = rng.choice([int(full.sum()), int(full.sum()) + 5, max(0, int(full.sum()) - 2), B * T])
    return SelectionSpec(
        states, offset, heads, positions, valid, torch.tensor(ids), sampler, layer, kind, capacity, out_dtype
    )


@pytest.mark.parametrize("seed", range(32))
def test_selection_and_vectors_match_reference(seed):
    spec = random_case(seed)
    got = gather_rows_triton(spec, **SMALL_BLOCKS)
    assert_same_selection(got, gather_rows_reference(spec), capacity=spec.capacity)
    assert_same_selection(got, gather_rows(spec), capacity=spec.capacity)  # the package's torch path


@pytest.mark.parametrize("strategy", ["all", "uniform", "log_uniform"])
def test_default_launch_settings(strategy):
    """The launcher's own block sizes (one program per chunk, the default scan width)."""
    B, H, T, D = 2, 3, 150, 96
    states = torch.randn(B, H, T, D, dtype=torch.bfloat16)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :40] = False
    positions = torch.arange(T).expand(B, T)
    spec = SelectionSpec(
        states,
        0,
        torch.tensor([2, 0]),
        positions,
        valid,
        torch.tensor([11, 12]),
        Sampler(strategy, 4, 2.0, 5),
        7,
        "q",
        200,
        torch.bfloat16,
    )
    assert_same_selection(gather_rows_triton(spec), gather_rows(spec), capacity=200)


def test_bf16_output_rounds_to_nearest_even_like_torch():
    # fp32 bit patterns around every bf16 rounding edge: ties to even and odd, just above
    # and below a tie, overflow to inf, subnormals, signed zero, inf and NaN.
    bits = [
        0x3F808000,
        0x3F818000,
        0x3F808001,
        0x3F807FFF,
        0x3F80FFFF,
        0x7F7FFFFF,
        0x7F7F8000,
        0xFF7F8000,
        0x00008000,
        0x00018000,
        0x00000001,
        0x807FFFFF,
        0x80000000,
        0x7F800000,
        0x7FC00001,
        0xFFFFFFFF,
        0x7F800001,
        0x4049_0FDB,
        0xC2F6_E979,
        0x3400_8000,
    ]
    values = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    T = len(bits)
    states = values.reshape(1, 1, T, 1).expand(1, 1, T, 3).contiguous()
    spec = SelectionSpec(
        states,
        0,
        torch.tensor([0]),
        torch.arange(T)[None],
        torch.ones(1, T, dtype=torch.bool),
        torch.tensor([1]),
        Sampler("all", 1),
        0,
        "k",
        T,
        torch.bfloat16,
    )
    got = gather_rows_triton(spec, **SMALL_BLOCKS)[4]
    assert_bits_equal(got, values.to(torch.bfloat16).reshape(1, T, 1).expand(1, T, 3))


def test_overflow_is_counted_and_flagged_not_dropped():
    B, H, T, D = 2, 2, 64, 16
    states = torch.randn(B, H, T, D)
    spec = SelectionSpec(
        states,
        0,
        torch.tensor([0, 1]),
        torch.arange(T).expand(B, T),
        torch.ones(B, T, dtype=torch.bool),
        torch.tensor([3, 4]),
        Sampler("all", 8),
        1,
        "q",
        50,
        torch.float32,
    )
    got = gather_rows_triton(spec, **SMALL_BLOCKS)
    assert int(got[0]) == B * T > 50
    assert_same_selection(got, gather_rows(spec), capacity=50)
    batch = CaptureBatch(1, "q", (0, 1), (3, 4), None, False, *got, valid=torch.tensor([T, T]))
    with pytest.raises(CaptureOverflow, match="128 tokens selected but the staging buffer holds 50"):
        batch.host_rows()


def test_degenerate_shapes():
    sampler = Sampler("all", 4)
    states = torch.randn(2, 2, 4, 8)
    positions, valid = torch.arange(4).expand(2, 4), torch.ones(2, 4, dtype=torch.bool)
    spec = SelectionSpec(
        states, 0, torch.tensor([0]), positions, valid, torch.tensor([1, 2]), sampler, 0, "q", 0, torch.float32
    )
    # capacity 0: everything overflows, nothing is written
    count, row, _, _, vectors = gather_rows_triton(spec)
    assert int(count) == 8 and row.numel() == 0 and vectors.shape == (1, 0, 8)
    # no heads: rows and positions still come back
    no_heads = spec._replace(heads=torch.tensor([], dtype=torch.int64), capacity=10)
    assert_same_selection(gather_rows_triton(no_heads), gather_rows(no_heads), 10)
    # no new tokens, and all padding: count 0, all filler
    for pos, val in ((positions[:, :0], valid[:, :0]), (positions, torch.zeros_like(valid))):
        empty = spec._replace(
            heads=torch.tensor([1]), positions=pos, valid=val, kind="k", capacity=3, out_dtype=torch.float16
        )
        count, row, _, _, vectors = gather_rows_triton(empty)
        assert int(count) == 0 and (row == -1).all() and (vectors == 0).all()
    # decode step: one new token after a cache, int32 positions
    decode = spec._replace(
        token_offset=torch.tensor(3),
        heads=torch.tensor([1]),
        positions=torch.tensor([[3], [3]], dtype=torch.int32),
        valid=valid[:, :1],
        kind="k",
        capacity=2,
    )
    assert_same_selection(
        gather_rows_triton(decode), gather_rows(decode._replace(positions=torch.tensor([[3], [3]]))), 2
    )


# ---- dispatch and the rows that reach the dataset --------------------------------------


def test_select_rows_runs_the_kernel_under_the_interpreter():
    spec = random_case(3)
    assert uses_kernel(spec.states, spec.out_dtype)
    torch.manual_seed(0)
    a = select_rows(spec)
    b = gather_rows_triton(spec)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_kernel_and_torch_paths_write_identical_parquet_rows(tmp_path):
    spec = random_case(5)
    # no overflow here; the saver's vector types: float32 / float16
    spec = spec._replace(capacity=spec.positions.numel(), out_dtype=torch.float32)
    tables = []
    for name, result in (("kernel", gather_rows_triton(spec, **SMALL_BLOCKS)), ("torch", gather_rows(spec))):
        batch = CaptureBatch(
            spec.layer,
            spec.kind,
            tuple(spec.heads.tolist()),
            tuple(spec.example_ids.tolist()),
            None,
            False,
            *result,
            valid=spec.valid.sum(1),
        )
        rows = batch.host_rows()
        table = pa.concat_tables([rows.table(i) for i in range(len(spec.heads))])
        pq.write_table(table, tmp_path / f"{name}.parquet")
        tables.append(pq.read_table(tmp_path / f"{name}.parquet"))
    assert tables[0].num_rows > 0
    assert tables[0].equals(tables[1])


@pytest.mark.parametrize("rope", ["post", "pre"])
def test_session_capture_is_identical_through_kernel_and_torch_paths(tmp_path, monkeypatch, rope):
    """A whole capture (tiny Llama, left padding, q and k; token ids, and with rope="pre" the
    layer's cos/sin gathered by the same selection) written by the kernel path and by the
    torch path: the same Parquet rows in the same shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import qk_attn
    from qk_attn.capture import gather
    from qk_attn.kernels import select_gather

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=97,
        attn_implementation="qk_sniff",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 97, (2, 40))
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[1, :9] = 0  # left padding

    launches = []
    original = select_gather.gather_rows_triton
    monkeypatch.setattr(select_gather, "gather_rows_triton", lambda *a, **k: launches.append(1) or original(*a, **k))

    def capture(out, kernel: bool):
        with monkeypatch.context() as patch:
            if not kernel:
                patch.setattr(gather, "uses_kernel", lambda *a: False)
            with qk_attn.session(
                output=str(out),
                sampler="log_uniform",
                min_bucket_size=2,
                base_rate=3.0,
                example_ids=[10, 11],
                rope=rope,
            ):
                with torch.inference_mode():
                    model(input_ids=input_ids, attention_mask=attention_mask)
        shards = {}
        for path in sorted(out.glob("l*h*/*.parquet")):  # the shards (not OUT/examples.parquet)
            shards.setdefault(path.parent.name, []).append(pq.read_table(path))
        return {
            name: pa.concat_tables(t).sort_by([("example_id", "ascending"), ("position", "ascending")])
            for name, t in shards.items()
        }

    kernel_rows = capture(tmp_path / "kernel", kernel=True)
    assert launches, "the session never launched the kernel"
    if rope == "post":  # one launch per (layer, kind), token ids included (issue 20)
        assert len(launches) == config.num_hidden_layers * 2
    torch_rows = capture(tmp_path / "torch", kernel=False)
    assert kernel_rows.keys() == torch_rows.keys() and len(kernel_rows) > 0
    for name in kernel_rows:
        assert kernel_rows[name].num_rows > 0
        assert kernel_rows[name].equals(torch_rows[name]), name


@pytest.mark.parametrize("arrives", ["at_once", "at_layer_2"])
def test_gpu_decode_steps_through_the_kernel_write_what_the_host_path_writes(tmp_path, monkeypatch, arrives):
    """The GPU path's decode decisions (support/device_path.py) with the kernel writing into the staging
    buffer: calls made before the positions reach the host launch it, later ones launch only where
    the sampler keeps something, and steps that stage nothing are handed off without a copy (the
    buffer is reused). The dataset equals the host path's, which also runs the kernel here."""
    from qk_attn.capture.staging import StagingBuffer
    from qk_attn.kernels import select_gather
    from support.device_path import arrived, generate_counting_launches
    from support.models import build, padded_batch
    from support.run import assert_same_datasets

    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(12, 9))
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
    launches, forgotten = [], []
    original, forget = select_gather.gather_rows_triton, StagingBuffer.forget
    monkeypatch.setattr(select_gather, "gather_rows_triton", lambda *a, **k: launches.append(1) or original(*a, **k))
    monkeypatch.setattr(StagingBuffer, "forget", lambda self: forgotten.append(1) or forget(self))
    on_host = generate_counting_launches(model, prompt, tmp_path / "cpu", monkeypatch, None, 24, min_new_tokens=24)
    assert len(launches) == sum(on_host.values())  # one kernel launch per launched call
    launches.clear(), forgotten.clear()
    on_device = generate_counting_launches(model, prompt, tmp_path / "gpu", monkeypatch, arrives, 24, min_new_tokens=24)
    assert_same_datasets(tmp_path / "gpu", tmp_path / "cpu")
    assert len(launches) == sum(on_device.values())
    decode = [(f, layer) for f in range(2, 25) for layer in range(model.config.num_hidden_layers)]
    assert 0 in [on_host[key] for key in decode]
    for f, layer in decode:
        assert on_device[(f, layer)] == (on_host[(f, layer)] if arrived(arrives, layer + 1) else 2), (f, layer)
    # On the CPU the sink keeps a staged forward's tensors, so its buffer is let go; a forward that
    # staged nothing returns it for the next one.
    staged = {f for (f, _), n in on_device.items() if n}
    assert len(forgotten) == len(staged)
    if arrives == "at_once":
        assert len(staged) < 24, "every decode step staged something: the empty hand-off was not exercised"


def test_two_models_in_one_session_stage_into_buffers_of_their_own():
    """Model A's forward stays staged until A's next forward or the session reads it (its end is not
    reported in a model's first forward). Model B's forward runs meanwhile: its kernel must not write
    into A's staging buffer. A's rows equal those of a session with A alone."""
    from support.models import build, padded_batch
    from support.oracle import rows_by_key
    from support.run import assert_same_rows

    batch = padded_batch("left", lengths=(12, 9))

    def rows(names):
        models = {name: build("llama3", "qk_sniff", seed=seed) for name, seed in (("A", 0), ("B", 1))}
        with torch.inference_mode(), qk_attn.session(sampler="all") as s:
            for example, name in enumerate(names):
                s.begin([2 * example, 2 * example + 1])
                models[name](**batch)
            return rows_by_key(s.table())

    alone, both = rows(["A"]), rows(["A", "B"])
    assert_same_rows({key: v for key, v in both.items() if key[0] < 2}, alone)


def test_a_dropped_models_staging_buffer_goes_with_it(monkeypatch):
    """A session outliving its models (a sweep in one in-memory session) keeps none of their staging
    buffers, device memory on a GPU: a model's buffer goes when the model does."""
    import gc
    import weakref

    from qk_attn.capture.staging import StagingBuffer
    from support.models import build, padded_batch

    made, init = [], StagingBuffer.__init__
    monkeypatch.setattr(
        StagingBuffer, "__init__", lambda self, device: made.append(weakref.ref(self)) or init(self, device)
    )
    batch = padded_batch("left", lengths=(12, 9))
    with torch.inference_mode(), qk_attn.session(sampler="all") as s:
        for example in range(2):
            model = build("llama3", "qk_sniff", seed=example)
            s.begin([2 * example, 2 * example + 1])
            model(**batch)
            s.commit()
            assert made and made[-1]() is not None
            del model
            gc.collect()
            assert [ref() for ref in made] == [None] * len(made), "a dropped model's staging buffer is kept"
        assert s.table().num_rows > 0
