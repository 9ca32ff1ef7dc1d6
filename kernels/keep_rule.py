"""The sampler's keep rule as the kernel evaluates it: `sampler.fmix32`, `row_hash`, `bucket_of` and the
thresholds in Triton, with integer hashing only, so that the GPU, the interpreter and torch agree bit
for bit (docs/architecture.md, the sampler), and the threshold table the launcher uploads once.
"""

from __future__ import annotations

import torch

from qk_attn.kernels.triton_support import tl, triton
from qk_attn.sampler import MAX_BUCKETS, R_BITS

# Sampler strategies, as kernel constants (STRATEGY_CODE: the launcher's argument for them).
_ALL = tl.constexpr(0)
_UNIFORM = tl.constexpr(1)
_LOG_UNIFORM = tl.constexpr(2)
STRATEGY_CODE = {"all": 0, "uniform": 1, "log_uniform": 2}

# The sampler's constants, as the kernel sees them.
_R_SHIFT = tl.constexpr(32 - R_BITS)  # uniform24 = fmix32(...) >> 8
_LAST_BUCKET = tl.constexpr(MAX_BUCKETS - 1)  # threshold table index clamp


@triton.jit
def fmix32(h):
    """murmur3 fmix32 on uint32 (wrapping multiply, logical shifts) == sampler.fmix32."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def row_hash(eid_ptr, rb, s_e, layer_kind):
    """sampler.row_hash for batch row `rb`: both 32-bit halves of the int64 example id."""
    eid = tl.load(eid_ptr + rb * s_e).to(tl.int64)
    h = fmix32(eid.to(tl.uint32) ^ layer_kind)  # low half (int64 -> uint32 truncates)
    return fmix32(h ^ (eid >> 32).to(tl.uint32))  # high half


@triton.jit
def bucket_of(pos, shift, STRATEGY: tl.constexpr):
    """sampler.bucket_of on int64 positions (bit_length by the same binary search)."""
    q = pos >> shift
    if STRATEGY == _LOG_UNIFORM:
        bits = tl.zeros_like(q)
        big = (q >> 32) > 0
        q = tl.where(big, q >> 32, q)
        bits += tl.where(big, 32, 0)
        big = (q >> 16) > 0
        q = tl.where(big, q >> 16, q)
        bits += tl.where(big, 16, 0)
        big = (q >> 8) > 0
        q = tl.where(big, q >> 8, q)
        bits += tl.where(big, 8, 0)
        big = (q >> 4) > 0
        q = tl.where(big, q >> 4, q)
        bits += tl.where(big, 4, 0)
        big = (q >> 2) > 0
        q = tl.where(big, q >> 2, q)
        bits += tl.where(big, 2, 0)
        big = (q >> 1) > 0
        q = tl.where(big, q >> 1, q)
        bits += tl.where(big, 1, 0)
        q = bits + tl.where(q > 0, 1, 0)
    return q


@triton.jit
def keep_bits(pos_ptr, s_pb, s_pt, valid_ptr, s_vb, s_vt, rb, t, T, row_h, thr_ptr, threshold, shift,
              STRATEGY: tl.constexpr):
    """Keep bits and int64 positions of tokens `t` (a block) of batch row `rb`."""
    in_row = t < T
    rb64 = tl.cast(rb, tl.int64)
    t64 = t.to(tl.int64)
    pos = tl.load(pos_ptr + rb64 * s_pb + t64 * s_pt, mask=in_row, other=0).to(tl.int64)
    keep = tl.load(valid_ptr + rb64 * s_vb + t64 * s_vt, mask=in_row, other=0) != 0
    if STRATEGY != _ALL:
        r = (fmix32(row_h ^ pos.to(tl.uint32)) >> _R_SHIFT).to(tl.int32)  # uniform24
        if STRATEGY == _UNIFORM:
            keep = keep & (r < threshold)
        else:
            bucket = tl.minimum(bucket_of(pos, shift, STRATEGY), _LAST_BUCKET)
            thr = tl.load(thr_ptr + bucket, mask=keep, other=0)
            keep = keep & (r < thr)
    return keep, pos


_THRESHOLDS: dict = {}


def threshold_table(sampler, device: torch.device) -> torch.Tensor:
    """The log-uniform threshold table on `device`, uploaded once per (sampler, device).

    The upload is asynchronous from pinned memory (no host sync); the pinned
    source stays referenced in the cache so the copy can never read freed memory.
    """
    key = (sampler.strategy, sampler.min_bucket_size, sampler.base_rate, str(device))
    if key not in _THRESHOLDS:
        host = torch.tensor(sampler.thresholds(), dtype=torch.int32)
        if device.type == "cuda":
            host = host.pin_memory()
        _THRESHOLDS[key] = (host, host.to(device, non_blocking=True))
    return _THRESHOLDS[key][1]
