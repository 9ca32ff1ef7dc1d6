"""The fused select+gather kernel and its launcher: sampler mask -> compaction -> gather, one launch.

The kernel does on the GPU what `qk_attn.capture.gather.gather_rows` does in torch, bit for bit
(the sampler's rule and the contracts: docs/architecture.md):

    keep[b, t]   = sampler keep decision (integer hashing only) & valid[b, t]
    j            = rank of (b, t) among the kept tokens in token-major (b, t) order
    row[j]       = b;  position[j] = positions[b, t];  bucket[j] = bucket_of(positions[b, t])
    vectors[i, j] = states[b, heads[i], token_offset + t, :]
    count        = number of kept tokens (may exceed capacity: overflow, flagged downstream)

Order without atomics. Program p owns a contiguous chunk of one batch row and writes its
kept tokens at `offset_p + local rank`. Every program finds `offset_p` (and the total
count) by re-evaluating the keep bit of all B*T tokens itself: that costs one integer
hash per token per program (N/1024 vector steps of the scan) and buys a deterministic
order, a single launch, no zeroed workspace and no host sync.
Rows in [count, capacity) are filled with row = -1, position = bucket = 0, zero vectors.

Layout of this file: kernel (`_gather_block`, then `_select_gather_kernel`) -> launcher
(`gather_rows_triton`). Its jit helpers have modules of their own: the sampler's keep rule
(`keep_rule`), the storage kinds moved (`storage_kinds`), and Triton or its stand-in
(`triton_support`). The torch reference lives with the tests (tests/support/kernel_reference.py).
These modules import nothing of the package but the sampler's constants: the torch path
(`qk_attn.capture.gather`) imports them, never the reverse.

Interpreter caveats (TRITON_INTERPRET=1, used by the CPU tests): all math is fp32; bf16
is moved as raw 16-bit patterns (the interpreter truncates fp32->bf16 casts, so the
round-to-nearest-even is done by hand on the bits, which is also exact on the GPU);
block widths are powers of two with masked tails.
"""

from __future__ import annotations

import functools

import torch

from qk_attn.kernels.keep_rule import STRATEGY_CODE, bucket_of, keep_bits, row_hash, threshold_table
from qk_attn.kernels.storage_kinds import STORAGE, as_storage, load_f32, store_f32
from qk_attn.kernels.triton_support import HAS_TRITON, tl, triton
from qk_attn.sampler import KIND_CODE, layer_kind_hash

# ======================================================================================
# kernel
# ======================================================================================


@triton.jit
def _gather_block(
    states_ptr, s_b, s_h, s_k, s_d, token_offset, heads_ptr, s_heads, num_heads,
    pos_ptr, s_pb, s_pt, valid_ptr, s_vb, s_vt, thr_ptr, threshold, shift,
    row_ptr, out_pos_ptr, out_bucket_ptr, vec_ptr, tok_ptr, s_tb, s_tt, out_tok_ptr,
    rb, t0, T, D, cap, row_h, base,
    STRATEGY: tl.constexpr, IN_KIND: tl.constexpr, OUT_KIND: tl.constexpr, HAS_TOKENS: tl.constexpr,
    SCAN: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Write the kept tokens of tokens [t0, t0 + SCAN) of row `rb` at rows base, base+1, ..."""
    d = tl.arange(0, BLOCK_D)
    d_in = d < D
    for sub in range(0, SCAN // BLOCK_G):
        t = t0 + sub * BLOCK_G + tl.arange(0, BLOCK_G)
        keep, pos = keep_bits(pos_ptr, s_pb, s_pt, valid_ptr, s_vb, s_vt, rb, t, T, row_h, thr_ptr, threshold,
                              shift, STRATEGY)
        n = tl.sum(keep.to(tl.int32), 0)
        if n > 0:
            dest = base + tl.cumsum(keep.to(tl.int32), 0) - 1
            write = keep & (dest < cap)  # past capacity: counted, not written (overflow)
            dest64 = dest.to(tl.int64)
            tl.store(row_ptr + dest64, tl.zeros_like(dest64) + rb, mask=write)
            tl.store(out_pos_ptr + dest64, pos.to(tl.int32), mask=write)
            tl.store(out_bucket_ptr + dest64, bucket_of(pos, shift, STRATEGY).to(tl.int32), mask=write)
            rb64 = tl.cast(rb, tl.int64)
            if HAS_TOKENS:  # the token id of each kept token, by the same selection (exact: ids < 2**24)
                token_id = tl.load(tok_ptr + rb64 * s_tb + t.to(tl.int64) * s_tt, mask=write, other=0)
                tl.store(out_tok_ptr + dest64, token_id.to(tl.int32), mask=write)

            tok = (token_offset + t).to(tl.int64)
            tile = write[:, None] & d_in[None, :]
            src_row = states_ptr + rb64 * s_b + tok[:, None] * s_k  # (BLOCK_G, 1)
            dst = vec_ptr + dest64[:, None] * D + d[None, :]  # (BLOCK_G, BLOCK_D), head 0
            for i in range(0, num_heads):
                head = tl.load(heads_ptr + i * s_heads).to(tl.int64)
                y = load_f32(src_row + head * s_h + d[None, :] * s_d, tile, IN_KIND)
                store_f32(dst + tl.cast(i * cap, tl.int64) * D, y, tile, OUT_KIND)
        base += n


# Sizes, strides and offsets that change from call to call (a decode step's key stride and offset
# grow by one token) are not specialised on, so a decode step never compiles a new variant.
_VARYING = ("s_b", "s_h", "token_offset", "s_pb", "s_vb", "s_tb", "threshold", "layer_kind", "B", "T", "cap",
            "chunks_per_row", "blocks_per_chunk")


@triton.jit(do_not_specialize=_VARYING)
def _select_gather_kernel(
    # inputs (any strides)
    states_ptr, s_b, s_h, s_k, s_d,
    offset_ptr, token_offset,
    heads_ptr, s_heads, num_heads,
    pos_ptr, s_pb, s_pt,
    valid_ptr, s_vb, s_vt,
    eid_ptr, s_e,
    thr_ptr, threshold, shift, layer_kind,
    tok_ptr, s_tb, s_tt,
    # outputs (contiguous)
    count_ptr, row_ptr, out_pos_ptr, out_bucket_ptr, vec_ptr, out_tok_ptr,
    # sizes
    B, T, D, cap, chunks_per_row, blocks_per_chunk,
    STRATEGY: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr, IN_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
    HAS_TOKENS: tl.constexpr, SCAN: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Grid: (B * chunks_per_row,). Program p owns scan blocks [c*k, (c+1)*k) of row b."""
    pid = tl.program_id(0)
    my_row = pid // chunks_per_row
    first = (pid % chunks_per_row) * blocks_per_chunk
    if OFFSET_FROM_PTR:
        token_offset = tl.load(offset_ptr).to(tl.int64)

    # One pass over every token in (b, t) order: `running` is the number of kept tokens
    # before the current block, i.e. the output row of its first kept token.
    running = tl.zeros((), dtype=tl.int32)
    for rb in range(0, B):
        row_h = row_hash(eid_ptr, rb, s_e, layer_kind)
        for blk in range(0, tl.cdiv(T, SCAN)):
            t = blk * SCAN + tl.arange(0, SCAN)
            keep, _ = keep_bits(pos_ptr, s_pb, s_pt, valid_ptr, s_vb, s_vt, rb, t, T, row_h, thr_ptr, threshold,
                                shift, STRATEGY)
            n = tl.sum(keep.to(tl.int32), 0)
            if (rb == my_row) & (blk >= first) & (blk < first + blocks_per_chunk) & (n > 0):
                _gather_block(
                    states_ptr, s_b, s_h, s_k, s_d, token_offset, heads_ptr, s_heads, num_heads,
                    pos_ptr, s_pb, s_pt, valid_ptr, s_vb, s_vt, thr_ptr, threshold, shift,
                    row_ptr, out_pos_ptr, out_bucket_ptr, vec_ptr, tok_ptr, s_tb, s_tt, out_tok_ptr,
                    rb, blk * SCAN, T, D, cap, row_h, running,
                    STRATEGY, IN_KIND, OUT_KIND, HAS_TOKENS, SCAN, BLOCK_G, BLOCK_D,
                )
            running += n

    # Every program now knows the total: program 0 writes it, all share the filler rows.
    if pid == 0:
        tl.store(count_ptr, running.to(tl.int64))
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_D)
    step = tl.num_programs(0) * BLOCK_F
    for j0 in range(running + pid * BLOCK_F, cap, step):
        j = j0 + f
        inside = j < cap
        j64 = j.to(tl.int64)
        tl.store(row_ptr + j64, tl.full((BLOCK_F,), -1, tl.int64), mask=inside)
        tl.store(out_pos_ptr + j64, tl.zeros((BLOCK_F,), tl.int32), mask=inside)
        tl.store(out_bucket_ptr + j64, tl.zeros((BLOCK_F,), tl.int32), mask=inside)
        if HAS_TOKENS:
            tl.store(out_tok_ptr + j64, tl.zeros((BLOCK_F,), tl.int32), mask=inside)
        tile = inside[:, None] & (d < D)[None, :]
        zeros = tl.zeros((BLOCK_F, BLOCK_D), tl.float32)
        for i in range(0, num_heads):
            store_f32(vec_ptr + (tl.cast(i * cap, tl.int64) + j64[:, None]) * D + d[None, :], zeros, tile, OUT_KIND)


# ======================================================================================
# launcher
# ======================================================================================

_NUM_WARPS = 4
_SCAN_MAX = 1024  # tokens hashed per vector step of the scan
_TILE = 4096  # elements of one (tokens x head_dim) gather tile


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Programs to aim for: two per SM on a GPU, a few under the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def gather_rows_triton(
    spec, *, out: tuple | None = None, token_ids: torch.Tensor | None = None, token_out: torch.Tensor | None = None,
    _scan: int | None = None, _block: int | None = None, _programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qk_attn.capture.gather.gather_rows` as one Triton launch.

    `spec` is a `qk_attn.capture.gather.SelectionSpec` (read by attribute: this module does not
    import the package's torch path). As there:
        states:       (B, H, K, D) float32/float16/bfloat16, any strides; D need not be a power of two.
        token_offset: index along K of the first new token: int or device scalar tensor.
        heads:        (Hs,) integer head ids to gather, on the device of `states`.
        positions:    (B, T) integer RoPE positions of the T new tokens.
        valid:        (B, T) bool, False for padding (never selected).
        example_ids:  (B,) int64.
        capacity:     rows reserved; `count` may exceed it (overflow; rows past it are not written).
        out_dtype:    float32, float16 or bfloat16 (bf16: round to nearest even, as torch).
    `spec.keep` is not read: the kernel makes the sampler's decision itself (the same one).

    Returns (count () int64, row (cap,) int64, position (cap,) int32, bucket (cap,) int32,
    vectors (Hs, cap, D) out_dtype), kept tokens in token-major (b, t) order, exactly the
    rows `gather_rows` selects. Rows past `count` are filler: row -1, position 0, bucket 0,
    zero vectors (the torch path repeats token (0, 0) there instead).

    `out`: the five result tensors to write into (views of a forward's staging buffer), else new
    ones. `token_ids` (B, 1, T, 1) or (B, T), any strides and dtype: the same launch writes the
    token id of each kept token into `token_out` (cap,) int32 (filler: 0).

    The `_scan`, `_block`, `_programs` overrides exist for tests that need many programs
    and blocks on small inputs.
    """
    if not HAS_TRITON:
        raise RuntimeError("gather_rows_triton needs Triton (pip install 'qk-attn[triton]'); "
                           "qk_attn.capture.gather.select_rows falls back to the torch path on its own")
    states, token_offset, heads, positions, valid = (spec.states, spec.token_offset, spec.heads, spec.positions,
                                                      spec.valid)
    example_ids, sampler, capacity, out_dtype = spec.example_ids, spec.sampler, spec.capacity, spec.out_dtype
    if states.dim() != 4:
        raise ValueError(f"states must be (B, H, K, D); got shape {tuple(states.shape)}")
    if positions.dim() != 2 or valid.shape != positions.shape or valid.dtype != torch.bool:
        raise ValueError(f"positions and valid must both be (B, T), valid bool; got {tuple(positions.shape)}, "
                         f"{tuple(valid.shape)} {valid.dtype}")
    if spec.kind not in KIND_CODE:
        raise ValueError(f"kind={spec.kind!r} is invalid: expected 'q' or 'k'")
    if out_dtype not in STORAGE:
        raise ValueError(f"out_dtype={out_dtype} is invalid: expected float32, float16 or bfloat16")

    device = states.device
    for name, tensor in (("heads", heads), ("positions", positions), ("valid", valid), ("example_ids", example_ids)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but states are on {device}: move it once, outside "
                             f"the attention call (a per-call copy would synchronise)")
    if isinstance(token_offset, torch.Tensor) and token_offset.device != device:
        if token_offset.device.type != "cpu":
            raise ValueError(f"token_offset is on {token_offset.device} but states are on {device}")
        token_offset = int(token_offset)  # a host scalar: reading it costs no device sync
    B, _, _, D = states.shape
    T = positions.shape[1]
    Hs = heads.shape[0]
    states_k, in_kind = as_storage(states, "states")

    if out is None:
        out = (
            torch.empty((), dtype=torch.int64, device=device),
            torch.empty(capacity, dtype=torch.int64, device=device),
            torch.empty(capacity, dtype=torch.int32, device=device),
            torch.empty(capacity, dtype=torch.int32, device=device),
            torch.empty((Hs, capacity, D), dtype=out_dtype, device=device),
        )
    count, row, position, bucket, vectors = out
    has_tokens = token_ids is not None
    if has_tokens:
        if token_out is None or token_out.dtype != torch.int32 or token_out.shape != (capacity,):
            raise ValueError(f"token_ids needs token_out: a ({capacity},) int32 tensor")
        token_ids = token_ids[:, 0, :, 0] if token_ids.dim() == 4 else token_ids  # (B, T), a view
        tok_strides = token_ids.stride()[:2]
    else:
        token_ids, token_out, tok_strides = positions, row, (0, 0)  # unused pointers
    vectors_k = vectors.view(torch.int16) if out_dtype == torch.bfloat16 else vectors

    strategy = STRATEGY_CODE[sampler.strategy]
    thresholds = sampler.thresholds()
    table = threshold_table(sampler, device) if strategy == 2 else positions  # unused pointer otherwise
    lk = layer_kind_hash(sampler.seed, spec.layer, spec.kind)
    lk = lk - (1 << 32) if lk >= 1 << 31 else lk  # same 32 bits, always typed int32

    offset_from_ptr = isinstance(token_offset, torch.Tensor)
    offset_t = token_offset.reshape(()) if offset_from_ptr else positions
    offset_i = 0 if offset_from_ptr else int(token_offset)

    block_d = _next_pow2(D)
    scan = _scan or min(_SCAN_MAX, max(64, _next_pow2(T)))
    block_g = _block or max(16, min(64, _TILE // block_d, scan))
    if scan % block_g:
        raise ValueError(f"scan block {scan} must be a multiple of the gather block {block_g}")
    blocks_per_row = triton.cdiv(T, scan) if T else 0
    programs = _programs or _target_programs(device)
    blocks_per_chunk = max(1, triton.cdiv(B * blocks_per_row, programs))
    chunks_per_row = max(1, triton.cdiv(blocks_per_row, blocks_per_chunk))
    grid = (max(1, B * chunks_per_row),)

    _select_gather_kernel[grid](
        states_k, *states.stride(),
        offset_t, offset_i,
        heads, heads.stride(0), Hs,
        positions, *positions.stride(),
        valid.view(torch.uint8), *valid.stride(),
        example_ids, example_ids.stride(0),
        table, thresholds[0], sampler.shift, lk,
        token_ids, *tok_strides,
        count, row, position, bucket, vectors_k, token_out,
        B, T, D, capacity, chunks_per_row, blocks_per_chunk,
        STRATEGY=strategy, OFFSET_FROM_PTR=offset_from_ptr, IN_KIND=in_kind, OUT_KIND=STORAGE[out_dtype],
        HAS_TOKENS=has_tokens, SCAN=scan, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_F=block_g,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # no FMA contraction: values are only moved and cast
    )
    return count, row, position, bucket, vectors


__all__ = ["HAS_TRITON", "gather_rows_triton"]
