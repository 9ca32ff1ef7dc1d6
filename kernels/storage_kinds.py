"""The storage kinds the kernel moves: float32, float16 and bfloat16, loaded as fp32 and stored back.

bf16 travels as raw int16 bits (`as_storage`): the interpreter truncates fp32->bf16 casts, so the
round to nearest even is done by hand on the bits, which is also exact on the GPU.
"""

from __future__ import annotations

import torch

from qk_attn.kernels.triton_support import tl, triton

# Storage kinds, as kernel constants (STORAGE: the launcher's argument for each dtype).
_F32 = tl.constexpr(0)
_F16 = tl.constexpr(1)
_BF16 = tl.constexpr(2)  # passed as an int16 view: raw bits
STORAGE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def load_f32(ptrs, mask, KIND: tl.constexpr):
    """Load any storage kind as fp32 (bf16 arrives as int16 bits: widen exactly)."""
    raw = tl.load(ptrs, mask=mask, other=0)
    if KIND == _BF16:
        bits = raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        value = bits.to(tl.float32, bitcast=True)
    else:
        value = raw.to(tl.float32)
    return value


@triton.jit
def store_f32(ptrs, value, mask, KIND: tl.constexpr):
    """Store fp32 as the output kind; bf16: round to nearest even on the bits (torch's rule)."""
    if KIND == _BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(value != value, 0x7FC0, bits)  # NaN -> canonical quiet NaN, as c10
        tl.store(ptrs, bits.to(tl.int16), mask=mask)
    elif KIND == _F16:
        tl.store(ptrs, value.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs, value, mask=mask)


def as_storage(t: torch.Tensor, what: str) -> tuple[torch.Tensor, int]:
    """(tensor as the kernel reads it, storage kind): bf16 travels as int16 bits."""
    if t.dtype not in STORAGE:
        raise ValueError(f"{what} has dtype {t.dtype}; the kernel takes float32, float16 or bfloat16")
    kind = STORAGE[t.dtype]
    return (t.view(torch.int16) if kind == 2 else t), kind
