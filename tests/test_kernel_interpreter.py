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

pytestmark = pytest.mark.interpreter

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip(
        "Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported: "
        "run `TRITON_INTERPRET=1 pytest -m interpreter` in its own process (make test does)",
        allow_module_level=True,
    )
pytest.importorskip("triton", reason="Triton is not installed (pip install 'qk-attn[triton]')")

from qk_attn.capture.gather import gather_rows, select_rows, uses_kernel  # noqa: E402
from qk_attn.kernels.select_gather import (  # noqa: E402
    gather_rows_reference,
    gather_rows_triton,
    inverse_rope_reference,
)
from qk_attn.capture.batch import CaptureBatch  # noqa: E402
from qk_attn.errors import CaptureOverflow
from qk_attn.sampler import Sampler  # noqa: E402

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
        raise AssertionError(f"{bad.shape[0]} elements differ, first at {first}: "
                             f"{[a[i].item() for i in first]} vs {[b[i].item() for i in first]}")


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
    return (states, offset, heads, positions, valid, torch.tensor(ids), sampler, layer, kind, capacity, out_dtype)


@pytest.mark.parametrize("seed", range(32))
def test_selection_and_post_rope_vectors_match_reference(seed):
    args = random_case(seed)
    got = gather_rows_triton(*args, **SMALL_BLOCKS)
    assert_same_selection(got, gather_rows(*args), capacity=args[9])


@pytest.mark.parametrize("strategy", ["all", "uniform", "log_uniform"])
def test_default_launch_settings(strategy):
    """The launcher's own block sizes (one program per chunk, the default scan width)."""
    B, H, T, D = 2, 3, 150, 96
    states = torch.randn(B, H, T, D, dtype=torch.bfloat16)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :40] = False
    positions = torch.arange(T).expand(B, T)
    args = (states, 0, torch.tensor([2, 0]), positions, valid, torch.tensor([11, 12]), Sampler(strategy, 4, 2.0, 5),
            7, "q", 200, torch.bfloat16)
    assert_same_selection(gather_rows_triton(*args), gather_rows(*args), capacity=200)


def test_bf16_output_rounds_to_nearest_even_like_torch():
    # fp32 bit patterns around every bf16 rounding edge: ties to even and odd, just above
    # and below a tie, overflow to inf, subnormals, signed zero, inf and NaN.
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0xFF7F8000,
            0x00008000, 0x00018000, 0x00000001, 0x807FFFFF, 0x80000000, 0x7F800000, 0x7FC00001, 0xFFFFFFFF,
            0x7F800001, 0x4049_0FDB, 0xC2F6_E979, 0x3400_8000]
    values = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    T = len(bits)
    states = values.reshape(1, 1, T, 1).expand(1, 1, T, 3).contiguous()
    args = (states, 0, torch.tensor([0]), torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool),
            torch.tensor([1]), Sampler("all", 1), 0, "k", T, torch.bfloat16)
    got = gather_rows_triton(*args, **SMALL_BLOCKS)[4]
    assert_bits_equal(got, values.to(torch.bfloat16).reshape(1, T, 1).expand(1, T, 3))


def test_overflow_is_counted_and_flagged_not_dropped():
    B, H, T, D = 2, 2, 64, 16
    states = torch.randn(B, H, T, D)
    args = (states, 0, torch.tensor([0, 1]), torch.arange(T).expand(B, T), torch.ones(B, T, dtype=torch.bool),
            torch.tensor([3, 4]), Sampler("all", 8), 1, "q", 50, torch.float32)
    got = gather_rows_triton(*args, **SMALL_BLOCKS)
    assert int(got[0]) == B * T > 50
    assert_same_selection(got, gather_rows(*args), capacity=50)
    batch = CaptureBatch(1, "q", (0, 1), (3, 4), None, False, *got, valid=torch.tensor([T, T]))
    with pytest.raises(CaptureOverflow, match="128 tokens selected but the staging buffer holds 50"):
        batch.host_rows()


def test_degenerate_shapes():
    sampler = Sampler("all", 4)
    states = torch.randn(2, 2, 4, 8)
    positions, valid = torch.arange(4).expand(2, 4), torch.ones(2, 4, dtype=torch.bool)
    ids = torch.tensor([1, 2])
    # capacity 0: everything overflows, nothing is written
    count, row, _, _, vectors = gather_rows_triton(states, 0, torch.tensor([0]), positions, valid, ids, sampler,
                                                   0, "q", 0, torch.float32)
    assert int(count) == 8 and row.numel() == 0 and vectors.shape == (1, 0, 8)
    # no heads: rows and positions still come back
    got = gather_rows_triton(states, 0, torch.tensor([], dtype=torch.int64), positions, valid, ids, sampler, 0, "q",
                             10, torch.float32)
    assert_same_selection(got, gather_rows(states, 0, torch.tensor([], dtype=torch.int64), positions, valid, ids,
                                           sampler, 0, "q", 10, torch.float32), 10)
    # no new tokens, and all padding: count 0, all filler
    for pos, val in ((positions[:, :0], valid[:, :0]), (positions, torch.zeros_like(valid))):
        count, row, _, _, vectors = gather_rows_triton(states, 0, torch.tensor([1]), pos, val, ids, sampler, 0, "k",
                                                       3, torch.float16)
        assert int(count) == 0 and (row == -1).all() and (vectors == 0).all()
    # decode step: one new token after a cache, int32 positions
    got = gather_rows_triton(states, torch.tensor(3), torch.tensor([1]), torch.tensor([[3], [3]], dtype=torch.int32),
                             valid[:, :1], ids, sampler, 0, "k", 2, torch.float32)
    assert_same_selection(got, gather_rows(states, torch.tensor(3), torch.tensor([1]), torch.tensor([[3], [3]]),
                                           valid[:, :1], ids, sampler, 0, "k", 2, torch.float32), 2)


# ---- inverse RoPE ---------------------------------------------------------------------


def rope_case(seed: int, interleaved: bool, rotary_dim: int, head_dim: int, scaling: float, with_scale: bool,
              dtype=torch.float32, cs_dtype=torch.float32):
    """Post-RoPE states made from random pre-RoPE ones by transformers' own rotary code."""
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as glm_apply
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

    gen = torch.Generator().manual_seed(seed)
    B, H, T = 2, 3, 37
    positions = torch.arange(T).expand(B, T) + torch.tensor([[0], [900]])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling  # (B, T, R), HF layout, attention scaling folded in
    pre = torch.randn(B, H, T, head_dim, generator=gen)
    if interleaved:
        post, _ = glm_apply(pre, pre, cos, sin)
        # what the GLM forward multiplied each dim by:
        cos, sin = (c[..., : rotary_dim // 2].repeat_interleave(2, -1) for c in (cos, sin))
    else:
        rot, keep = pre[..., :rotary_dim], pre[..., rotary_dim:]
        post = torch.cat([llama_apply(rot, rot, cos, sin)[0], keep], -1)
    scale = None
    if with_scale:  # Ministral 3: queries * (1 + beta * log(1 + floor(pos / orig_max)))
        scale = 1 + 0.1 * torch.log(1 + torch.floor(positions / 16.0))
        post = post * scale[:, None, :, None]
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :4] = False
    args = (post.to(dtype), 0, torch.tensor([0, 2]), positions, valid, torch.tensor([5, 6]),
            Sampler("log_uniform", 2, 2.0, seed), 4, "q", B * T, torch.float32)
    rope = dict(cos=cos.to(cs_dtype), sin=sin.to(cs_dtype), interleaved=interleaved, query_scale=scale)
    return args, rope, pre


@pytest.mark.parametrize(
    "interleaved, rotary_dim, head_dim, scaling, with_scale",
    [
        (False, 64, 64, 1.0, False),  # Llama
        (False, 32, 80, 1.0, False),  # partial rotary, head_dim not a power of two
        (False, 96, 96, 1.2, True),  # yarn-style attention scaling, Ministral 3 query scale
        (True, 64, 128, 1.0, False),  # GLM: interleaved partial rotary
        (True, 48, 96, 0.9, True),
    ],
)
def test_inverse_rope_matches_fp32_reference(interleaved, rotary_dim, head_dim, scaling, with_scale):
    args, rope, pre = rope_case(1, interleaved, rotary_dim, head_dim, scaling, with_scale)
    got = gather_rows_triton(*args, **rope, **SMALL_BLOCKS)
    want = gather_rows_reference(*args, **rope)
    n = int(want[0])
    assert int(got[0]) == n and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[4][:, :n], want[4][:, :n], rtol=1e-6, atol=1e-6 * want[4].abs().max().item())
    # and it is the inverse: the pre-RoPE vectors come back (fp32 rounding of the forward only)
    rows, tokens = want[1][:n], (want[2][:n, None] == args[3][want[1][:n]]).int().argmax(1)
    expected = pre[rows, :, tokens][:, args[2]].transpose(0, 1)
    torch.testing.assert_close(got[4][:, :n], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_inverse_rope_bf16_inputs_and_outputs(out_dtype):
    """bf16 states and bf16 cos/sin (what models hand over), cast after the fp32 math."""
    args, rope, _ = rope_case(2, False, 64, 80, 1.1, True, dtype=torch.bfloat16, cs_dtype=torch.bfloat16)
    args = args[:-1] + (out_dtype,)
    got = gather_rows_triton(*args, **rope, **SMALL_BLOCKS)
    want = gather_rows_reference(*args[:-1], torch.float32, **rope)
    n = int(want[0])
    assert_bits_equal(got[4][:, :n], want[4][:, :n].to(out_dtype))


def test_inverse_rope_reference_inverts_the_forward():
    x = torch.randn(5, 40)
    theta = torch.rand(5, 16) * 6
    cos, sin = torch.cat([theta.cos()] * 2, -1) * 1.3, torch.cat([theta.sin()] * 2, -1) * 1.3
    y = torch.cat([x[:, :32] * cos + torch.cat([-x[:, 16:32], x[:, :16]], -1) * sin, x[:, 32:] * 1.69], -1) * 2
    back = inverse_rope_reference(y, cos, sin, query_scale=torch.full((5,), 2.0))
    torch.testing.assert_close(back[:, :32], x[:, :32])


# ---- dispatch and the rows that reach the dataset --------------------------------------


def test_select_rows_runs_the_kernel_under_the_interpreter():
    args = random_case(3)
    assert uses_kernel(args[0], args[-1])
    torch.manual_seed(0)
    a = select_rows(*args)
    b = gather_rows_triton(*args)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_kernel_and_torch_paths_write_identical_parquet_rows(tmp_path):
    args = random_case(5)
    _, _, heads, positions, valid, ids, _, layer, kind, _, _ = args
    capacity = positions.numel()  # no overflow here
    args = args[:9] + (capacity, torch.float32)  # the saver's vector types: float32 / float16
    tables = []
    for name, result in (("kernel", gather_rows_triton(*args, **SMALL_BLOCKS)), ("torch", gather_rows(*args))):
        batch = CaptureBatch(layer, kind, tuple(heads.tolist()), tuple(ids.tolist()), None, False, *result,
                             valid=valid.sum(1))
        rows = batch.host_rows()
        table = pa.concat_tables([rows.table(i) for i in range(len(heads))])
        pq.write_table(table, tmp_path / f"{name}.parquet")
        tables.append(pq.read_table(tmp_path / f"{name}.parquet"))
    assert tables[0].num_rows > 0
    assert tables[0].equals(tables[1])


@pytest.mark.parametrize("rope", ["post", "pre"])
def test_session_capture_is_identical_through_kernel_and_torch_paths(tmp_path, monkeypatch, rope):
    """A whole capture (tiny Llama, left padding, q and k; token ids, and with rope="pre" the
    layer's cos/sin gathered by the same selection) written by the kernel path and by the
    torch path: the same Parquet rows in the same shards."""
    import qk_attn
    from qk_attn.capture import gather
    from qk_attn.kernels import select_gather
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=97, attn_implementation="qk_sniff")
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
            with qk_attn.session(output=str(out), sampler="log_uniform", min_bucket_size=2, base_rate=3.0,
                                 example_ids=[10, 11], rope=rope):
                with torch.inference_mode():
                    model(input_ids=input_ids, attention_mask=attention_mask)
        shards = {}
        for path in sorted(out.glob("l*h*/*.parquet")):  # the shards (not OUT/examples.parquet)
            shards.setdefault(path.parent.name, []).append(pq.read_table(path))
        return {name: pa.concat_tables(t).sort_by([("example_id", "ascending"), ("position", "ascending")])
                for name, t in shards.items()}

    kernel_rows = capture(tmp_path / "kernel", kernel=True)
    assert launches, "the session never launched the kernel"
    torch_rows = capture(tmp_path / "torch", kernel=False)
    assert kernel_rows.keys() == torch_rows.keys() and len(kernel_rows) > 0
    for name in kernel_rows:
        assert kernel_rows[name].num_rows > 0
        assert kernel_rows[name].equals(torch_rows[name]), name
