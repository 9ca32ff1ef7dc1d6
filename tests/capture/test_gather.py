"""Selection dispatch on the torch path (`select_rows`, `gather_rows`, the tests' reference), and the
kernel module's behaviour where it cannot run (no Triton, no GPU, top-level `kernels`).

The kernel itself is checked against the reference in tests/test_kernel_interpreter.py
(Triton's interpreter, its own process); here it is only compiled for a GPU target.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qk_attn.capture.gather import SelectionSpec, gather_rows, select_rows, uses_kernel
from qk_attn.sampler import Sampler
from support.kernel_reference import gather_rows_reference

REPO = Path(__file__).resolve().parents[2]


def call_spec(strategy="log_uniform", dtype=torch.float32, out_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, H, T, D = 3, 4, 50, 80
    states = torch.randn(B, T + 6, H, D, generator=gen).to(dtype).transpose(1, 2)  # KV cache of 6 before
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :10] = False  # left padding
    valid[2, 40:] = False  # right padding
    positions = torch.arange(6, 6 + T).expand(B, T)
    return SelectionSpec(
        states,
        torch.tensor(6),
        torch.tensor([0, 3]),
        positions,
        valid,
        torch.tensor([1, -2, 2**40]),
        Sampler(strategy, 2, 3.0, 11),
        5,
        "k",
        B * T,
        out_dtype,
    )


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("strategy", ["all", "uniform", "log_uniform"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_select_rows_on_cpu_is_gather_rows(no_interpreter, strategy, out_dtype):
    spec = call_spec(strategy, torch.bfloat16, out_dtype)
    assert not uses_kernel(spec.states, out_dtype)
    for got, want in zip(select_rows(spec), gather_rows(spec)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("strategy", ["all", "uniform", "log_uniform"])
def test_torch_path_is_the_reference_on_the_stored_rows(strategy):
    spec = call_spec(strategy, torch.bfloat16, torch.float16)
    got, want = gather_rows(spec), gather_rows_reference(spec)
    n = min(int(want[0]), spec.capacity)
    assert int(got[0]) == int(want[0]) > 0
    for a, b in zip(got[1:4], want[1:4]):
        assert a.dtype == b.dtype and torch.equal(a[:n], b[:n])
    assert got[4].dtype == want[4].dtype and torch.equal(got[4][:, :n], want[4][:, :n])


def test_a_decision_already_made_is_used():
    spec = call_spec("uniform")
    keep = torch.zeros_like(spec.valid)
    keep[1, 3] = True
    count, row, position, _, _ = gather_rows(spec._replace(keep=keep))
    assert int(count) == 1 and int(row[0]) == 1 and int(position[0]) == int(spec.positions[1, 3])


def test_unsupported_dtypes_stay_on_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even where the kernel could run on CPU
    assert not uses_kernel(torch.zeros(1, dtype=torch.float64), torch.float32)
    assert not uses_kernel(torch.zeros(1), torch.float64)
    assert not uses_kernel(torch.zeros(1, device="meta"), torch.float32)


# ---- where the kernel cannot run -------------------------------------------------------


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_everything_works_without_triton(tmp_path):
    result = run_python(
        """
        import logging, sys, torch
        sys.modules["triton"] = None  # import triton -> ImportError, as if not installed
        logging.basicConfig(level=logging.WARNING)
        from qk_attn.capture.gather import SelectionSpec, select_rows, gather_rows, _triton_available
        from qk_attn.kernels.select_gather import HAS_TRITON, gather_rows_triton
        from qk_attn.sampler import Sampler
        assert not HAS_TRITON
        spec = SelectionSpec(torch.randn(1, 2, 9, 8), 0, torch.tensor([1]), torch.arange(9)[None],
                             torch.ones(1, 9, dtype=torch.bool), torch.tensor([4]), Sampler("uniform", 1, 0.5), 0, "q",
                             9, torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(select_rows(spec), gather_rows(spec)))
        assert not _triton_available(warn=True)  # what a CUDA tensor would hit: a warning, then torch
        try:
            gather_rows_triton(spec)
        except RuntimeError as e:
            print("raised:", e)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "raised: gather_rows_triton needs Triton" in result.stdout
    assert "Triton is not installed" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "import transformers.integrations.hub_kernels, qk_attn"],
        ["-m", "qk_attn.cli", "--help"],
    ],
)
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


def test_kernel_modules_import_only_the_sampler_from_the_package():
    """The kernel is below the torch path: its modules import each other and the sampler, never
    `qk_attn.capture` (no import circle)."""
    outside = set()
    for path in sorted((REPO / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        outside |= {name for name in imported if name.startswith("qk_attn") and not name.startswith("qk_attn.kernels.")}
    assert outside == {"qk_attn.sampler"}


@pytest.mark.parametrize(
    "strategy, dtype, out_dtype, ones",
    [
        ("log_uniform", torch.bfloat16, torch.bfloat16, False),
        ("uniform", torch.float32, torch.float16, False),
        ("all", torch.float16, torch.float32, False),
        ("log_uniform", torch.bfloat16, torch.float32, True),  # ints == 1 become constexprs
    ],
)
def test_kernel_compiles_for_sm90(no_interpreter, monkeypatch, strategy, dtype, out_dtype, ones):
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
    spec = call_spec(strategy, dtype, out_dtype)
    if ones:  # decode step of one row, one head, capacity 1, offset 1: Triton specializes 1s
        spec = spec._replace(
            states=spec.states[:1, :, :2],
            token_offset=1,
            heads=spec.heads[:1],
            positions=spec.positions[:1, :1],
            valid=spec.valid[:1, :1],
            example_ids=spec.example_ids[:1],
            capacity=1,
        )
    select_gather.gather_rows_triton(spec)

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
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=4, enable_fp_fusion=False),
        )
    except FileNotFoundError as e:  # a Triton build without its bundled ptxas
        pytest.skip(f"no ptxas to finish the compile: {e}")
    assert compiled.asm["cubin"]
    signed_i32_shifts = [
        line
        for line in compiled.asm["ttir"].splitlines()
        if "arith.shrsi" in line and ("xi32>" in line or line.rstrip().endswith(": i32"))
    ]
    assert not signed_i32_shifts, signed_i32_shifts[:3]
