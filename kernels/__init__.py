"""Triton kernels of qk-attn, installed as `qk_attn.kernels` (never as a top-level `kernels`:
that name belongs to Hugging Face's `kernels` package, which transformers imports).

Importing this package never requires Triton; `HAS_TRITON` says whether the kernels can run.
`qk_attn.gather.select_rows` chooses between the kernel and the torch reference.
"""

if __name__ == "qk_attn.kernels":
    from .select_gather import HAS_TRITON, gather_rows_reference, gather_rows_triton, inverse_rope_reference

    __all__ = ["HAS_TRITON", "gather_rows_reference", "gather_rows_triton", "inverse_rope_reference"]

# Otherwise this directory was found as a top-level `kernels` (the repository root on
# sys.path while transformers probes for Hugging Face's `kernels`): stay an empty module
# without a version, so the probe reports the package as unavailable and moves on.
