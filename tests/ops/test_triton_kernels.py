"""The Triton kernels in Triton's interpreter (TRITON_INTERPRET=1), on the CPU, at small sizes."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from ipu_app import ops  # noqa: E402
from ipu_app.sparse.init import random_pattern  # noqa: E402

from .kernel_check import check_backend  # noqa: E402


@pytest.fixture(scope="module")
def tk():
    """``ipu_app.ops.triton``, able to run here: on a GPU, or in the interpreter (tests/conftest.py)."""
    module = importlib.import_module("ipu_app.ops.triton")
    if not module.available():
        pytest.skip("no GPU and TRITON_INTERPRET is off")
    return module


def _on(tk):
    return "cpu" if tk.interpreting() else "cuda"


@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(tk, b, dtype):
    check_backend(tk.linear, b, dtype, 37, shape=(32, 48), seed=b, device=_on(tk))


@pytest.mark.parametrize("b", [16, 32])
def test_empty_block_rows_and_columns(tk, b):
    check_backend(tk.linear, b, torch.float32, 21, gaps=True, sparsity=0.8, shape=(48, 64), seed=7, device=_on(tk))


def test_value_gradient_over_several_token_splits(tk):
    # 300 tokens, no bias, several token tiles per program; one row/column tile each
    check_backend(tk.linear, 16, torch.float32, 300, bias=False, shape=(32, 32), sparsity=0.5, device=_on(tk))
    assert tk._sddmm_splits(n_tiles=1, tokens=100_000, sms=132) > 1
    assert tk._sddmm_splits(n_tiles=10_000, tokens=4096, sms=132) == 1


def test_covers_and_fallbacks(tk):
    assert tk.covers(_on(tk), torch.float32, 16)
    assert not tk.covers("cpu", torch.float32, 8)
    assert not tk.covers("cpu", torch.float32, 16, frozen=True)
    pattern = random_pattern(32, 32, 8, 0.5, torch.Generator().manual_seed(0))
    values, x = torch.randn(pattern.nnz, 8, 8), torch.randn(3, 32)
    torch.testing.assert_close(tk.linear(x, values, pattern), ops.reference.linear(x, values, pattern),
                               rtol=0, atol=0)


def test_metadata_cached_per_pattern(tk):
    dev = _on(tk)
    p = random_pattern(32, 64, 16, 0.5, torch.Generator().manual_seed(0))
    pattern = type(p)(32, 64, 16, p.rows.to(dev), p.cols.to(dev))
    values = torch.randn(pattern.nnz, 16, 16, device=dev)
    x = torch.randn(5, 64, device=dev)
    tk.linear(x, values, pattern)
    builds = tk._meta.builds
    tk.linear(x, values, pattern)
    assert tk._meta.builds == builds
    new = random_pattern(32, 64, 16, 0.5, torch.Generator().manual_seed(9))
    pattern.rows.copy_(new.rows)
    pattern.cols.copy_(new.cols)
    torch.testing.assert_close(tk.linear(x, values, pattern).cpu(), ops.reference.linear(x.cpu(), values.cpu(), new))
    assert tk._meta.builds == builds + 1


def test_without_gpu_or_interpreter_the_backend_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    code = ("import torch; from ipu_app import ops; from ipu_app.ops import triton as t; "
            "assert not t.available() and not t.covers('cpu', torch.float32, 16); "
            "print(ops.describe('triton', torch.device('cpu'), torch.float32, 16, 0.9))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "reference op" in proc.stdout and "triton does not cover this" in proc.stdout


def test_kernels_compile_for_a100_and_h100_without_a_gpu():
    """Lowering to PTX and cubin (Triton ships ptxas) catches what the interpreter cannot: shapes and
    types that have no GPU code, and shared memory beyond what an A100 / H100 block may use."""
    script = Path(__file__).with_name("triton_aot.py")
    proc = subprocess.run([sys.executable, str(script), "80", "90"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 * 3 * 3 * 2
    limits = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    for line in lines:
        arch, shared = line.split()[0], int(line.rsplit("shared=", 1)[1])
        assert 0 < shared <= limits[arch], line
