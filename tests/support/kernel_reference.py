"""The select+gather kernel's torch reference, written for reading, not speed (as Liger-Kernel keeps its
references with its tests).

Independent of `qk_attn.capture.gather` (the package's torch path): the sampler's own `keep` and
`bucket_of` decide, `nonzero` (a host sync, fine here) orders the kept tokens, and rows past the
count are the kernel's filler exactly (row -1, position 0, bucket 0, zero vectors), so a kernel
result can be compared with this one in full.
"""

from __future__ import annotations

import torch


def gather_rows_reference(spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, row, position, bucket, vectors) of a `qk_attn.capture.gather.SelectionSpec`, as the kernel returns them."""
    keep = spec.sampler.keep(spec.example_ids, spec.layer, spec.kind, spec.positions) & spec.valid
    batch, token = keep.nonzero(as_tuple=True)  # row-major: token-major (b, t) order
    count = batch.numel()
    n = min(count, spec.capacity)
    batch, token = batch[:n], token[:n]
    device = spec.states.device
    row = torch.full((spec.capacity,), -1, dtype=torch.int64, device=device)
    position = torch.zeros(spec.capacity, dtype=torch.int32, device=device)
    bucket = torch.zeros(spec.capacity, dtype=torch.int32, device=device)
    num_heads, head_dim = spec.heads.numel(), spec.states.shape[-1]
    vectors = torch.zeros(num_heads, spec.capacity, head_dim, dtype=spec.out_dtype, device=device)
    positions = spec.positions[batch, token].to(torch.int64)
    row[:n] = batch
    position[:n] = positions.to(torch.int32)
    bucket[:n] = spec.sampler.bucket_of(positions).to(torch.int32)
    offset = int(spec.token_offset)
    for i, head in enumerate(spec.heads.tolist()):
        vectors[i, :n] = spec.states[batch, head, token + offset].to(spec.out_dtype)
    return torch.tensor(count, dtype=torch.int64, device=device), row, position, bucket, vectors
