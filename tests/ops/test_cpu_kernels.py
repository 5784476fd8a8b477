import subprocess
import sys

import pytest
import torch

from ipu_app import ops
from ipu_app.model.sparse_linear import SparseLinear
from ipu_app.ops import cpu, cpu_build, meta, reference
from ipu_app.sparse.init import random_pattern
from ipu_app.sparse.pattern import BlockPattern

from .kernel_check import check_backend

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels do not build here")
needs_amx = pytest.mark.skipif(not cpu.amx_available(), reason="no AMX-BF16 on this CPU")


@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_fp32_matches_reference(b, tokens):
    check_backend(cpu.linear, b, torch.float32, tokens, seed=b + tokens)


@pytest.mark.parametrize("b", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_bf16_matches_reference(b, tokens):
    # every kernel path that covers bf16 here: AMX or AVX-512 BF16 tiles (b >= 16) and token panels
    # (b = 4, 8) where the CPU has them, the fp32 kernels on widened operands always
    assert cpu.covers("cpu", torch.bfloat16, b)
    for path in cpu.paths("cpu", torch.bfloat16, b):
        check_backend(lambda *a, **k: cpu.linear(*a, **k, kernels=path), b, torch.bfloat16, tokens, seed=b + tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tokens(dtype):
    pattern = random_pattern(32, 48, 16, 0.5, torch.Generator().manual_seed(0))
    values = torch.randn(pattern.nnz, 16, 16).to(dtype).requires_grad_()
    x = torch.randn(0, 48).to(dtype).requires_grad_()
    y = cpu.linear(x, values, pattern)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert torch.count_nonzero(values.grad) == 0 and x.grad.shape == (0, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [4, 16, 32])
def test_empty_block_rows_and_columns(dtype, b):
    check_backend(cpu.linear, b, dtype, 45, gaps=True, sparsity=0.9, seed=3)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_any_density_without_bias(sparsity):
    check_backend(cpu.linear, 16, torch.float32, 64, sparsity=sparsity, bias=False, shape=(160, 192))


def test_long_token_run_crosses_value_gradient_chunks():
    """bf16 values gradients go over tokens in chunks of ~1 MiB; 1,500 tokens at in=out=512 is several."""
    if not cpu.amx_available():
        pytest.skip("no AMX-BF16 on this CPU")
    chunk = cpu.library().bsmm_amx_sddmm_chunk(512, 512)
    assert chunk < 1500
    check_backend(cpu.linear, 16, torch.bfloat16, 1500, shape=(512, 512), sparsity=0.9)


@pytest.mark.parametrize("b", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_small_blocks_run_on_token_panels(b, tokens):
    assert cpu.path("cpu", torch.float32, b) == "panels"
    check_backend(cpu.linear, b, torch.float32, tokens, seed=b + tokens)


@pytest.mark.parametrize("b", [1, 4, 8])
def test_token_panels_with_empty_rows_and_columns_any_density_and_long_runs(b):
    check_backend(cpu.linear, b, torch.float32, 45, gaps=True, sparsity=0.9, seed=3)
    check_backend(cpu.linear, b, torch.float32, 64, sparsity=0.0, bias=False, seed=4)
    check_backend(cpu.linear, b, torch.float32, 29, sparsity=0.99, shape=(192, 160), seed=5)
    # the values gradient goes over tokens in chunks of 32 panels (512 tokens): 1,100 is three
    check_backend(cpu.linear, b, torch.float32, 1100, sparsity=0.9, seed=6)


def test_token_panels_pack_and_unpack_exactly():
    x = torch.randn(37, 24)
    packed, panels = cpu._pack(x, "test")
    assert panels == 3
    view = packed.view(panels, 24, cpu.PANEL)
    torch.testing.assert_close(view.permute(0, 2, 1).reshape(48, 24)[:37], x, rtol=0, atol=0)
    assert torch.count_nonzero(view.permute(0, 2, 1).reshape(48, 24)[37:]) == 0  # padded tokens are zero
    y = torch.empty(37, 24)
    cpu.library().bsmm_unpack(packed.data_ptr(), 37, 24, False, y.data_ptr(), 2)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_bf16_is_widened_exactly_and_rounded_to_nearest_even():
    """bf16 operands of the fp32 kernels: packing widens them exactly, unpacking and bsmm_convert round
    as PyTorch does (to nearest even; ties, infinities, NaN and subnormals included)."""
    lib = cpu.library()
    x = torch.randn(37, 24) * torch.logspace(-40, 38, 24)
    x[0, :6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-45])
    x[1, :4] = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 1.0 + 2 ** -8 + 2 ** -20])  # ties
    xb = x.bfloat16()
    packed, panels = cpu._pack(xb, "test")
    widened = packed.view(panels, 24, cpu.PANEL).permute(0, 2, 1).reshape(48, 24)[:37]
    assert torch.equal(widened.view(torch.int32), xb.float().view(torch.int32))  # bit for bit
    rounded = torch.empty(37, 24, dtype=torch.bfloat16)
    cpu.library().bsmm_unpack(cpu._pack(x, "test")[0].data_ptr(), 37, 24, True, rounded.data_ptr(), 2)
    nan = x.isnan()
    for ours in (rounded, cpu._convert(x, torch.bfloat16)):
        assert torch.equal(ours.isnan(), nan)  # a NaN stays a NaN (its payload bits may differ)
        assert torch.equal(ours.view(torch.int16)[~nan], xb.view(torch.int16)[~nan])
    assert torch.equal(cpu._convert(xb, torch.float32).view(torch.int32), xb.float().view(torch.int32))
    assert lib.bsmm_native_bf16() in (0, 1)


def test_bf16_without_amx_races_dense_bf16(monkeypatch):
    """``auto``'s limit for bf16 on the fp32 kernels: fp32's where bf16 is emulated, half of it with
    AVX-512 BF16 (dense bf16 twice as fast), and none below b = 16 on AMX (its dense GEMMs are faster);
    b = 16 runs bf16 natively on AMX and on the AVX-512 BF16 tiles, each with its own limit."""
    x = torch.randn(2, 64).bfloat16()
    for amx, native in ((False, False), (False, True), (True, True)):
        monkeypatch.setattr(cpu, "_amx", amx)
        monkeypatch.setattr(cpu, "_native_bf16", native)
        monkeypatch.setattr(cpu, "_bf16_pairs", native and not amx)
        for b in (1, 4, 16):
            fp32 = ops.auto_max_density("cpu", torch.float32, b)
            limit = ops.auto_max_density("cpu", torch.bfloat16, b)
            line = ops.describe("cpu", torch.device("cpu"), torch.bfloat16, b, 0.9)
            widened = "bf16 widened to fp32" in line
            if amx and b == 16:
                assert limit == ops.AUTO_MAX_DENSITY[("cpu", torch.bfloat16)] and not widened
                continue
            if native and not amx and b in (4, 16):  # the AVX-512 BF16 tiles and token panels
                name = "AVX-512 BF16 tiles" if b == 16 else "AVX-512 BF16 token panels"
                assert limit == ops.BF16_PAIRS_MAX_DENSITY and name in line and not widened, line
                assert ops.choose(x, random_pattern(64, 64, b, 0.9)) == "cpu"
                assert ops.choose(x, random_pattern(64, 64, b, 0.5)) == "reference"
                continue
            assert widened and limit == (0.0 if amx else fp32 / 2 if native else fp32)
            s = 0.95 if b == 1 else 0.9
            expect = "cpu" if 1 - s <= limit else "reference"
            assert ops.choose(x, random_pattern(64, 64, b, s)) == expect, (amx, native, b)
    monkeypatch.setattr(cpu, "_amx", False)
    monkeypatch.setattr(cpu, "_native_bf16", False)
    monkeypatch.setattr(cpu, "_bf16_pairs", False)
    line = ops.describe("auto", torch.device("cpu"), torch.bfloat16, 1, 0.9)
    assert "CPU kernels, fp32 token panels (bf16 widened to fp32)" in line, line


def test_token_panels_refuse_an_unknown_block_size():
    # every configurable block size has a kernel instance; another gets an error, not wrong numbers
    a, w, out = torch.zeros(16 * 12), torch.zeros(9), torch.zeros(16 * 12)
    idx = torch.zeros(5, dtype=torch.int32)
    assert cpu.library().bsmm_panel_lines(a.data_ptr(), 1, 12, w.data_ptr(), 3, idx.data_ptr(), idx.data_ptr(),
                                          4, None, out.data_ptr(), 1) == -1


def test_frozen_inactive_values_use_the_reference_op():
    pattern = random_pattern(32, 32, 16, 0.5, torch.Generator().manual_seed(0))
    values, frozen, x = torch.randn(pattern.nnz, 16, 16), torch.randn(32, 32), torch.randn(3, 32)
    torch.testing.assert_close(cpu.linear(x, values, pattern, frozen=frozen),
                               reference.linear(x, values, pattern, frozen=frozen), rtol=0, atol=0)


def test_autocast_bf16_gives_fp32_value_gradients():
    pattern = random_pattern(64, 96, 16, 0.75, torch.Generator().manual_seed(0))
    values = torch.randn(pattern.nnz, 16, 16, requires_grad=True)
    x = torch.randn(2, 9, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cpu.linear(x, values, pattern)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 64)
    y.float().sum().backward()
    assert values.grad.dtype == torch.float32
    v16 = values.detach().bfloat16().double().requires_grad_()
    reference.linear(x.bfloat16().double(), v16, pattern).sum().backward()
    torch.testing.assert_close(values.grad.double(), v16.grad, rtol=2e-2, atol=2e-2)


def test_metadata_is_built_once_per_pattern_and_rebuilt_after_an_update():
    layer = SparseLinear(64, 64, sparsity=0.75, block_size=16, backend="cpu",
                         generator=torch.Generator().manual_seed(0))
    cache = cpu._meta if cpu.path("cpu", torch.float32, 16) == "tiles" else cpu._meta_own
    x = torch.randn(4, 64)
    layer(x).sum().backward()
    builds = cache.builds
    for _ in range(3):
        layer(x).sum().backward()
    assert cache.builds == builds  # steps reuse the metadata
    # a pattern update rewrites the buffers in place (as PatternUpdater does)
    new = random_pattern(64, 64, 16, 0.75, torch.Generator().manual_seed(5))
    assert not new.equal(layer.pattern)
    with torch.no_grad():
        layer.block_rows.copy_(new.rows)
        layer.block_cols.copy_(new.cols)
    layer.pattern_changed()
    y = layer(x)
    assert cache.builds == builds + 1
    torch.testing.assert_close(y, reference.linear(x, layer.values, new, layer.bias))


def test_kernel_meta_walks_every_tile_once():
    pattern = random_pattern(96, 64, 32, 0.5, torch.Generator().manual_seed(1))
    m = meta.build_meta(pattern, 16)
    assert m.ntiles == pattern.nnz * 4 and m.grid == (6, 4)
    by_row = {(int(m.rows[k]), int(m.cols[k])) for k in m.row_blk.tolist()}
    assert len(by_row) == m.ntiles
    for line in range(m.grid[0]):
        for p in range(int(m.row_ptr[line]), int(m.row_ptr[line + 1])):
            assert int(m.rows[m.row_blk[p]]) == line and int(m.cols[m.row_blk[p]]) == int(m.row_col[p])
    for line in range(m.grid[1]):
        for p in range(int(m.col_ptr[line]), int(m.col_ptr[line + 1])):
            assert int(m.cols[m.col_blk[p]]) == line and int(m.rows[m.col_blk[p]]) == int(m.col_row[p])
    values = torch.randn(pattern.nnz, 32, 32)
    tiles = meta.tile_values(values, 16)
    dense = torch.zeros(96, 64)
    for k in range(m.ntiles):
        r, c = int(m.rows[k]), int(m.cols[k])
        dense[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = tiles[k]
    torch.testing.assert_close(dense, pattern.to_dense(values), rtol=0, atol=0)
    torch.testing.assert_close(meta.untile_values(tiles, 32), values, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a multiple of the kernel tile 16"):
        meta.build_meta(random_pattern(32, 32, 8, 0.5), 16)


def test_model_trains_identically_on_cpu_kernels_and_reference():
    torch.manual_seed(0)
    ref = SparseLinear(128, 64, sparsity=0.8, block_size=16, generator=torch.Generator().manual_seed(2))
    fast = SparseLinear(128, 64, sparsity=0.8, block_size=16, backend="cpu",
                        generator=torch.Generator().manual_seed(2))
    fast.load_state_dict(ref.state_dict())
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_f = torch.optim.AdamW(fast.parameters(), lr=1e-2)
    x, target = torch.randn(33, 128), torch.randn(33, 64)
    for _ in range(5):
        for layer, opt in ((ref, opt_r), (fast, opt_f)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(layer(x), target).backward()
            opt.step()
    torch.testing.assert_close(fast.values, ref.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.bias, ref.bias, rtol=1e-4, atol=1e-5)


def test_auto_choice(cpu_kind):
    x32, pattern16 = torch.randn(2, 64), random_pattern(64, 64, 16, 0.9)
    assert ops.choose(x32, pattern16) == "cpu"
    # token panels: b = 4 breaks even near s = 0.6, b = 1 near s = 0.8 (bench kernels; a margin kept)
    assert ops.auto_max_density("cpu", torch.float32, 4) == ops.PANEL_MAX_DENSITY_DEFAULT == 0.35
    assert ops.auto_max_density("cpu", torch.float32, 1) == 0.18
    assert ops.choose(x32, random_pattern(64, 64, 4, 0.9)) == "cpu"
    assert ops.choose(x32, random_pattern(64, 64, 4, 0.5)) == "reference"
    assert ops.choose(x32, random_pattern(64, 64, 1, 0.9)) == "cpu"
    assert ops.choose(x32, random_pattern(64, 64, 1, 0.75)) == "reference"
    assert ops.choose(x32, random_pattern(64, 64, 16, 0.5)) == "reference"  # fp32: needs s >= 0.6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # AMX's bf16 tiles break even lowest; the AVX-512 BF16 tiles need s >= 0.7, widened kernels more
        expect = "cpu" if cpu_kind.amx else "reference"
        assert ops.choose(x32, random_pattern(64, 64, 16, 0.5)) == expect
        assert ops.choose(x32, random_pattern(64, 64, 16, 0.25)) == "reference"
        assert ops.choose(x32, random_pattern(64, 64, 16, 0.9)) == "cpu"
    assert ops.choose(x32, pattern16, frozen=torch.zeros(64, 64)) == "reference"
    assert ops.choose(x32.half(), pattern16) == "reference"
    assert "CPU kernels" in ops.describe("auto", torch.device("cpu"), torch.float32, 16, 0.9)
    assert "CPU kernels, fp32 token panels" in ops.describe("cpu", torch.device("cpu"), torch.float32, 4, 0.9)
    line = ops.describe("cpu", torch.device("cpu"), torch.float16, 4, 0.9)
    assert "reference op" in line and "cpu does not cover this" in line
    limit = ops.auto_max_density("cpu", torch.float32, 16)
    assert f"density 0.80 > {limit:g}, where dense is faster" in ops.describe("auto", torch.device("cpu"),
                                                                             torch.float32, 16, 0.2)


def test_build_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("IPU_APP_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu.KernelBuildError, match="C compiler 'no-such-cc' not found; install gcc"):
        cpu.build("no-such-cc")
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'bsmm_cpu.c:1: error: broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(cpu.KernelBuildError, match="compiling bsmm_cpu.c failed: bsmm_cpu.c:1: error: broken"):
        cpu.build(str(fake))
    assert not any((tmp_path / "cache").iterdir())  # no half-written library left behind
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("IPU_APP_KERNEL_CACHE", str(blocker / "sub"))
    with pytest.raises(cpu.KernelBuildError, match="cannot write the kernel cache .*set IPU_APP_KERNEL_CACHE"):
        cpu.build()


def test_build_is_cached_per_cpu_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("IPU_APP_KERNEL_CACHE", str(tmp_path))
    path = cpu.build()
    assert path.parent == tmp_path and path.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert cpu.build() == path and path.stat().st_mtime_ns == mtime  # cached, not rebuilt
    monkeypatch.setattr(cpu_build, "_cpu_signature", lambda: "another-cpu")
    assert cpu.library_path() != path


def test_cli_builds_the_kernels(tmp_path):
    env = {"IPU_APP_KERNEL_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "ipu_app", "build-kernels"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path) in proc.stdout and list(tmp_path.glob("bsmm_cpu_*.so"))
    bad = subprocess.run([sys.executable, "-m", "ipu_app", "build-kernels"], capture_output=True, text=True,
                         env={**env, "CC": "no-such-cc"}, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "no-such-cc" in bad.stderr


def test_unknown_and_unavailable_backends():
    with pytest.raises(ops.BackendError, match="unknown sparse backend 'cuda'"):
        ops.get_backend("cuda")
    assert ops.get_backend("reference") is reference.linear
    assert ops.get_backend("cpu") is cpu.linear
    assert ops.get_backend("auto") is ops.auto_linear


def test_values_of_wrong_shape_are_refused():
    pattern = random_pattern(32, 32, 16, 0.5)
    with pytest.raises(Exception, match="values have shape"):
        cpu.linear(torch.randn(2, 32), torch.randn(pattern.nnz + 1, 16, 16), pattern)
    assert isinstance(pattern, BlockPattern)


def test_meta_cache_rebuilds_on_any_change_and_only_then():
    cache = meta.MetaCache(16)
    pattern = random_pattern(64, 64, 16, 0.5, torch.Generator().manual_seed(0))
    first = cache.get(pattern)
    assert cache.get(BlockPattern(64, 64, 16, pattern.rows, pattern.cols)) is first  # same buffers: a hit
    other = random_pattern(64, 64, 16, 0.5, torch.Generator().manual_seed(1))
    pattern.rows.copy_(other.rows)        # an in-place write bumps the version counter
    pattern.cols.copy_(other.cols)
    second = cache.get(pattern)
    assert second is not first and torch.equal(second.row_col, meta.build_meta(other, 16).row_col)
    third = random_pattern(64, 64, 16, 0.5, torch.Generator().manual_seed(2))
    pattern.rows.data.copy_(third.rows)   # a write that bypasses the counter: caught by the CPU compare
    pattern.cols.data.copy_(third.cols)
    assert torch.equal(cache.get(pattern).row_col, meta.build_meta(third, 16).row_col)
    assert cache.builds == 3
    clone = BlockPattern(64, 64, 16, pattern.rows.clone(), pattern.cols.clone())
    cache.get(clone)                      # new buffers: a new entry
    assert cache.builds == 4


def test_portable_c_loops_match_reference(tmp_path, monkeypatch):
    """What a CPU without AVX-512 (or not x86) runs: the same library built without intrinsics."""
    monkeypatch.setenv("IPU_APP_KERNEL_CACHE", str(tmp_path))
    lib = cpu.load(cpu.build(extra_flags=("-DBSMM_PORTABLE",)))
    assert not lib.bsmm_f32_avx512() and not lib.bsmm_amx_available() and not hasattr(lib, "bsmm_amx_lines")
    monkeypatch.setattr(cpu, "_lib", lib)
    monkeypatch.setattr(cpu, "_amx", False)
    monkeypatch.setattr(cpu, "_avx512", False)
    monkeypatch.setattr(cpu, "_bf16_pairs", False)
    assert cpu.kernel_name(torch.float32) == "fp32 token panels"  # no AVX-512 tiles: panels for every b
    assert cpu.path("cpu", torch.bfloat16, 16) == "panels"  # bf16 without AMX: widened to fp32
    for b, tokens in ((1, 300), (4, 37), (16, 37), (32, 9)):
        assert cpu.path("cpu", torch.float32, b) == "panels"
        check_backend(cpu.linear, b, torch.float32, tokens, gaps=b == 16, seed=b)
    check_backend(cpu.linear, 4, torch.bfloat16, 37, seed=1)
    # the 16x16 tiles' C loops, fp32 and bf16 widened (what an AVX-512 CPU without AMX runs for bf16)
    monkeypatch.setattr(cpu, "_avx512", True)
    assert cpu.path("cpu", torch.bfloat16, 16) == "tiles" and cpu.converts(torch.bfloat16, 16)
    for dtype in (torch.float32, torch.bfloat16):
        check_backend(cpu.linear, 16, dtype, 37, gaps=True, seed=2)
        check_backend(cpu.linear, 32, dtype, 300, seed=3)
    # the bf16 pair kernels' every line, with PAIR_DOT as fp32 multiply-adds on widened values
    monkeypatch.setattr(cpu, "_bf16_pairs", True)
    assert cpu.path("cpu", torch.bfloat16, 16) == "tiles_bf16" and not cpu.converts(torch.bfloat16, 16)
    assert cpu.path("cpu", torch.bfloat16, 4) == "panels_bf16" and not cpu.converts(torch.bfloat16, 4)
    assert cpu.path("cpu", torch.bfloat16, 2) == "panels" and cpu.converts(torch.bfloat16, 2)
    assert cpu_build.pairs_self_check(lib)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the library may first load inside a bf16 step
        assert cpu_build.pairs_self_check(lib)
    for b, tokens in ((16, 37), (32, 300), (64, 1), (4, 37), (8, 300), (4, 1)):
        check_backend(cpu.linear, b, torch.bfloat16, tokens, gaps=b in (4, 16), seed=b)


def test_patterns_made_in_inference_mode_work():
    with torch.inference_mode():
        layer = SparseLinear(32, 32, sparsity=0.5, block_size=16, backend="cpu",
                             generator=torch.Generator().manual_seed(0))
        x = torch.randn(4, 32)
        torch.testing.assert_close(layer(x), reference.linear(x, layer.values, layer.pattern, layer.bias))
        torch.testing.assert_close(layer(x), reference.linear(x, layer.values, layer.pattern, layer.bias))
