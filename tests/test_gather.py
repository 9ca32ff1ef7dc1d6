"""Selection dispatch on the torch path: `select_rows`, the inverse-RoPE reference, and the
kernel module's behaviour where it cannot run (no Triton, no GPU, top-level `kernels`).

The kernel itself is checked against the reference in tests/test_kernel_interpreter.py
(Triton's interpreter, its own process); here it is only compiled for a GPU target.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qk_attn.capture.gather import gather_rows, select_rows, uses_kernel
from qk_attn.kernels.select_gather import gather_rows_reference, inverse_rope_reference
from qk_attn.sampler import Sampler

REPO = Path(__file__).resolve().parents[1]


def call_args(strategy="log_uniform", dtype=torch.float32, out_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, H, T, D = 3, 4, 50, 80
    states = torch.randn(B, T + 6, H, D, generator=gen).to(dtype).transpose(1, 2)  # KV cache of 6 before
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :10] = False  # left padding
    valid[2, 40:] = False  # right padding
    positions = torch.arange(6, 6 + T).expand(B, T)
    return (states, torch.tensor(6), torch.tensor([0, 3]), positions, valid, torch.tensor([1, -2, 2**40]),
            Sampler(strategy, 2, 3.0, 11), 5, "k", B * T, out_dtype)


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("strategy", ["all", "uniform", "log_uniform"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_select_rows_on_cpu_is_gather_rows(no_interpreter, strategy, out_dtype):
    args = call_args(strategy, torch.bfloat16, out_dtype)
    assert not uses_kernel(args[0], out_dtype)
    for got, want in zip(select_rows(*args), gather_rows(*args)):
        assert torch.equal(got, want)


def test_reference_without_rope_is_gather_rows():
    args = call_args()
    for got, want in zip(gather_rows_reference(*args), gather_rows(*args)):
        assert torch.equal(got, want)


def test_unsupported_dtypes_stay_on_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even where the kernel could run on CPU
    assert not uses_kernel(torch.zeros(1, dtype=torch.float64), torch.float32)
    assert not uses_kernel(torch.zeros(1), torch.float64)
    assert not uses_kernel(torch.zeros(1, device="meta"), torch.float32)


def hf_rope(pre, positions, rotary_dim, interleaved, scaling):
    """Post-RoPE vectors by transformers' own code; returns (post, per-dim cos, per-dim sin)."""
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as glm_apply
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

    inv_freq = 1.0 / (500000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    emb = positions[..., None].float() * inv_freq
    emb = torch.cat((emb, emb), -1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    if interleaved:
        post, _ = glm_apply(pre, pre, cos, sin)
        return post, *(c[..., : rotary_dim // 2].repeat_interleave(2, -1) for c in (cos, sin))
    rot, rest = pre[..., :rotary_dim], pre[..., rotary_dim:]
    return torch.cat([llama_apply(rot, rot, cos, sin)[0], rest], -1), cos, sin


@pytest.mark.parametrize(
    "interleaved, rotary_dim, scaling, beta",
    [(False, 80, 1.0, None), (False, 40, 1.3, None), (True, 64, 1.0, None), (False, 80, 1.1, 0.1)],
)
def test_select_rows_inverse_rope_recovers_pre_rope_vectors(no_interpreter, interleaved, rotary_dim, scaling, beta):
    args = list(call_args("all"))
    states, cached = args[0].float(), int(args[1])
    every_position = torch.arange(states.shape[2]).expand(states.shape[0], -1)  # cache + new tokens
    post, cos, sin = hf_rope(states, every_position, rotary_dim, interleaved, scaling)
    scale = None
    if beta is not None:  # Ministral 3's query scale, applied after RoPE
        scale = 1 + beta * torch.log(1 + torch.floor(every_position / 8.0))
        post = post * scale[:, None, :, None]
        scale = scale[:, cached:]
    args[0] = post
    # cos/sin "gathered" for the new tokens: aligned with `positions`
    count, _, position, _, vectors = select_rows(*args, cos=cos[:, cached:], sin=sin[:, cached:],
                                                 interleaved=interleaved, query_scale=scale)
    n = int(count)
    _, _, _, _, expected = gather_rows(states, *args[1:])
    torch.testing.assert_close(vectors[:, :n], expected[:, :n], rtol=1e-5, atol=1e-5)
    assert torch.equal(position, gather_rows(*args)[2])


def test_inverse_rope_reference_layouts():
    # cos = 0, sin = 1: the forward was y = rotate_half(x) on the first 4 dims (partial rotary)
    ones, zeros = torch.ones(1, 4), torch.zeros(1, 4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    rh = torch.tensor([[-3.0, -4.0, 1.0, 2.0]])  # rotate_half of the first 4 dims
    assert torch.equal(inverse_rope_reference(torch.cat([rh, x[:, 4:]], -1), zeros, ones), x)
    ri = torch.tensor([[-2.0, 1.0, -4.0, 3.0]])  # interleaved rotate_half
    assert torch.equal(inverse_rope_reference(torch.cat([ri, x[:, 4:]], -1), zeros, ones, interleaved=True), x)


# ---- where the kernel cannot run -------------------------------------------------------


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_everything_works_without_triton(tmp_path):
    result = run_python(
        """
        import logging, sys, torch
        sys.modules["triton"] = None  # import triton -> ImportError, as if not installed
        logging.basicConfig(level=logging.WARNING)
        from qk_attn.capture.gather import select_rows, gather_rows, _triton_available
        from qk_attn.kernels.select_gather import HAS_TRITON, gather_rows_triton
        from qk_attn.sampler import Sampler
        assert not HAS_TRITON
        args = (torch.randn(1, 2, 9, 8), 0, torch.tensor([1]), torch.arange(9)[None],
                torch.ones(1, 9, dtype=torch.bool), torch.tensor([4]), Sampler("uniform", 1, 0.5), 0, "q", 9,
                torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(select_rows(*args), gather_rows(*args)))
        assert not _triton_available(warn=True)  # what a CUDA tensor would hit: a warning, then torch
        try:
            gather_rows_triton(*args)
        except RuntimeError as e:
            print("raised:", e)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "raised: gather_rows_triton needs Triton" in result.stdout
    assert "Triton is not installed" in result.stderr


@pytest.mark.parametrize("argv", [
    ["-c", "import transformers.integrations.hub_kernels, qk_attn"],
    ["-m", "qk_attn.cli", "--help"],
])
def test_python_started_in_the_clone_never_takes_kernels_dir_as_top_level_kernels(argv):
    # `python -c` and `python -m` put the repository root first on sys.path, where the
    # kernels/ folder sits; transformers >= 5.25 imports Hugging Face's `kernels` at import
    # time. The folder has no __init__.py, so an installed `kernels` always wins over it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_kernel_package_is_reachable_only_as_qk_attn_kernels():
    # Where Hugging Face's `kernels` is installed it is what `import kernels` gives; where it is
    # not, the folder is at most an empty namespace that transformers' probe reports unavailable.
    result = run_python(
        """
        import importlib.metadata, os, kernels
        from transformers.utils.import_utils import is_kernels_available
        import qk_attn.kernels.select_gather as ours
        try:
            importlib.metadata.version("kernels"); installed = True
        except importlib.metadata.PackageNotFoundError:
            installed = False
        found = os.path.realpath(os.path.dirname(getattr(kernels, "__file__", None) or "/"))
        print(found != os.path.realpath(os.path.dirname(ours.__file__)),
              installed or not is_kernels_available(), hasattr(ours, "gather_rows_triton"))
        """,
        REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True"]


@pytest.mark.parametrize(
    "strategy, dtype, out_dtype, rope, ones",
    [
        ("log_uniform", torch.bfloat16, torch.bfloat16, "half+scale", False),
        ("uniform", torch.float32, torch.float16, None, False),
        ("all", torch.float16, torch.float32, "interleaved", False),
        ("log_uniform", torch.bfloat16, torch.float32, "half", True),  # ints == 1 become constexprs
    ],
)
def test_kernel_compiles_for_sm90(no_interpreter, monkeypatch, strategy, dtype, out_dtype, rope, ones):
    """Compile (to a cubin, no GPU needed) what the launcher would launch on an H100/H200.

    The interpreter does not type-check like the compiler does; this catches compile-only
    errors. The hash must use logical shifts on its 32-bit words: no `shrsi` on i32.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiling needs the real triton.jit, not the interpreter")
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from qk_attn.kernels import select_gather

    launched = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.update(args=args, kwargs=kwargs)

    kernel = select_gather._select_gather_kernel
    monkeypatch.setattr(select_gather, "_select_gather_kernel", Recorder())
    args = list(call_args(strategy, dtype, out_dtype))
    if ones:  # decode step of one row, one head, capacity 1, offset 1: Triton specializes 1s
        args[0], args[1], args[2] = args[0][:1, :, :2], 1, args[2][:1]
        args[3:6] = args[3][:1, :1], args[4][:1, :1], args[5][:1]
        args[9] = 1
    B, T = args[3].shape
    extra = {}
    if rope:
        cos = torch.rand(B, T, 64, dtype=torch.bfloat16)
        extra = dict(cos=cos, sin=cos, interleaved=rope == "interleaved")
        if "scale" in rope:
            extra["query_scale"] = torch.rand(B, T)
    select_gather.gather_rows_triton(*args, **extra)

    names = list(inspect.signature(kernel.fn).parameters)
    signature, constexprs = {}, {}
    for name, value in zip(names, launched["args"]):
        signature[name] = mangle_type(value, True)  # as the JIT types a launch argument
        if signature[name] == "constexpr":
            constexprs[name] = value
    for name, value in launched["kwargs"].items():
        if name in names:
            signature[name], constexprs[name] = "constexpr", value
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, enable_fp_fusion=False))
    except FileNotFoundError as e:  # a Triton build without its bundled ptxas
        pytest.skip(f"no ptxas to finish the compile: {e}")
    assert compiled.asm["cubin"]
    signed_i32_shifts = [line for line in compiled.asm["ttir"].splitlines()
                         if "arith.shrsi" in line and ("xi32>" in line or line.rstrip().endswith(": i32"))]
    assert not signed_i32_shifts, signed_i32_shifts[:3]
