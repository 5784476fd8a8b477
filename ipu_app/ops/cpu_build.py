"""Building and loading the CPU kernels (``csrc/bsmm_cpu.c``): compiled on first use (``gcc -O3
-march=native -fopenmp``, about a second) into a cache directory keyed by the source, the compiler and
this CPU, so a cluster sharing a home directory never loads a library built for another CPU; the
functions typed for ctypes; the native bf16 pair kernels' self-check. ``ops.cpu`` loads the library
once per process and reads what this CPU has from it."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

TILE = 16
SOURCE = Path(__file__).with_name("csrc") / "bsmm_cpu.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where compiled kernels live: ``$IPU_APP_KERNEL_CACHE`` or ``~/.cache/ipu_app/kernels``."""
    env = os.environ.get("IPU_APP_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ipu_app" / "kernels"


def _cpu_signature() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def library_path(compiler: str | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    compiler = compiler or os.environ.get("CC", "gcc")
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS + extra_flags).encode(),
                 _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"bsmm_cpu_{key.hexdigest()[:16]}.so"


def build(compiler: str | None = None, force: bool = False, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernels (if not cached) and return the library's path. ``-DBSMM_PORTABLE`` in
    ``extra_flags`` builds the portable C loops only (what a CPU without AVX-512 / x86 runs)."""
    compiler = compiler or os.environ.get("CC", "gcc")
    path = library_path(compiler, extra_flags)
    if path.exists() and not force:
        return path
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"cpu backend: C compiler {compiler!r} not found; install gcc (or set CC) "
                               "or use backend: reference")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    except OSError as exc:
        raise KernelBuildError(f"cpu backend: cannot write the kernel cache {path.parent} ({exc.strerror}); "
                               "set IPU_APP_KERNEL_CACHE to a writable directory") from None
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, *extra_flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
            raise KernelBuildError(f"cpu backend: compiling {SOURCE.name} failed: {first}")
        os.replace(tmp, path)  # atomic: concurrent builders each install a complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bsmm_amx_available.restype = i32
    lib.bsmm_f32_avx512.restype = i32
    lib.bsmm_native_bf16.restype = i32
    lib.bsmm_convert.argtypes = [p, i64, i32, p, i32]
    lib.bsmm_f32_lines.argtypes = [p, i64, i64, p, p, p, p, i64, p, p, i32]
    lib.bsmm_f32_sddmm.argtypes = [p, i64, p, i64, i64, p, p, i64, p, i32]
    lib.bsmm_pack.argtypes = [p, i64, i64, i64, i32, p, i32]
    lib.bsmm_unpack.argtypes = [p, i64, i64, i32, p, i32]
    lib.bsmm_panel_lines.argtypes = [p, i64, i64, p, i64, p, p, i64, p, p, i32]
    lib.bsmm_panel_lines.restype = i32
    lib.bsmm_panel_sddmm.argtypes = [p, i64, p, i64, i64, i64, p, p, i64, i32, p, p, p, p, i32]
    lib.bsmm_bf16_pairs_native.restype = i32
    lib.bsmm_colsum.argtypes = [p, i64, i64, i32, p, i32]
    lib.bsmm_pack_feature_pairs.argtypes = [p, i64, i64, i64, p, i32]
    lib.bsmm_pack_token_pairs.argtypes = [p, i64, i64, i64, p, i32]
    lib.bsmm_pair_panel_lines.argtypes = [p, i64, i64, p, i64, p, p, i64, p, p, i32]
    lib.bsmm_pair_panel_lines.restype = i32
    lib.bsmm_pair_panel_sddmm.argtypes = [p, i64, p, i64, i64, i64, p, p, i64, p, i32]
    lib.bsmm_bf16_lines.argtypes = [p, i64, i64, p, p, p, p, i64, p, p, p, i32]
    lib.bsmm_pair_rows.argtypes = [p, i64, i64, p, i32]
    lib.bsmm_bf16_sddmm.argtypes = [p, i64, p, i64, i64, p, p, i64, p, i32]
    if hasattr(lib, "bsmm_amx_lines"):
        lib.bsmm_amx_lines.argtypes = [p, i64, i64, p, p, p, p, i64, p, p, i32]
        lib.bsmm_amx_sddmm.argtypes = [p, i64, p, i64, i64, p, p, p, p, p, i64, p, p, i32]
        lib.bsmm_amx_sddmm_chunk.argtypes = [i64, i64]
        lib.bsmm_amx_sddmm_chunk.restype = i64


def load(path: Path) -> ctypes.CDLL:
    """A built library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    _bind(lib)
    return lib


def vnni(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks ``[k, contracted b, out b]`` in pairs of contracted entries, ``[k][b/2][b out][2]``: the
    operand of AMX tiles and of the AVX-512 BF16 pair dot products."""
    return blocks.unflatten(1, (blocks.shape[1] // 2, 2)).transpose(2, 3).contiguous()


def _pair_rows(a: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    T, F = a.shape
    out = torch.empty((T + 1) // 2 * F * 2, dtype=torch.bfloat16)
    lib.bsmm_pair_rows(a.data_ptr(), T, F, out.data_ptr(), torch.get_num_threads())
    return out


def pairs_self_check(lib: ctypes.CDLL) -> bool:
    """The native bf16 pair kernels against fp32 sums on a small random problem, once per process
    (a compiler or CPU that gets them wrong costs a warning and the widened kernels, not wrong losses).
    The library may first load inside a training step: autocast and autograd stay out of the check."""
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        return _run_pairs_self_check(lib)


def _run_pairs_self_check(lib: ctypes.CDLL) -> bool:
    gen = torch.Generator().manual_seed(1234)
    T, K, N = 35, 48, 32
    a = torch.randn(T, K, generator=gen).bfloat16()
    tiles = torch.randn(6, TILE, TILE, generator=gen).bfloat16()  # blocks [contracted][out]
    rows, cols = torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.int32), torch.tensor([0, 2, 0, 1, 2, 1], dtype=torch.int32)
    weight = torch.zeros(N, K)
    for k in range(6):
        weight[rows[k] * TILE:(rows[k] + 1) * TILE, cols[k] * TILE:(cols[k] + 1) * TILE] = tiles[k].float().t()
    order = torch.argsort(rows * 8 + cols).to(torch.int32)
    ptr = torch.tensor([0, 3, 6], dtype=torch.int32)
    c = torch.empty(T, N, dtype=torch.bfloat16)
    packed, other = vnni(tiles), cols[order.long()].contiguous()  # held: the kernel reads them
    work = torch.empty(-(-T // TILE) * K * TILE, dtype=torch.bfloat16)
    lib.bsmm_bf16_lines(a.data_ptr(), T, K, packed.data_ptr(), ptr.data_ptr(), order.data_ptr(), other.data_ptr(),
                        2, None, c.data_ptr(), work.data_ptr(), 1)
    expect = a.float() @ weight.t()
    ok = torch.allclose(c.float(), expect, rtol=2e-2, atol=2e-2 * float(expect.abs().max()))
    gy = torch.randn(T, N, generator=gen).bfloat16()
    dv = torch.empty(6, TILE, TILE)
    yp, xp = _pair_rows(gy, lib), _pair_rows(a, lib)
    lib.bsmm_bf16_sddmm(yp.data_ptr(), N, xp.data_ptr(), K, (T + 1) // 2, rows.data_ptr(), cols.data_ptr(), 6,
                        dv.data_ptr(), 1)
    dense = gy.float().t() @ a.float()
    expect = torch.stack([dense[r * TILE:(r + 1) * TILE, q * TILE:(q + 1) * TILE] for r, q in zip(rows, cols)])
    ok = ok and torch.allclose(dv, expect, rtol=1e-3, atol=1e-3 * float(expect.abs().max()))
    if not ok:
        import warnings

        warnings.warn("cpu backend: the native bf16 (AVX-512 BF16) kernels failed their self-check on this CPU; "
                      "bf16 runs the fp32 kernels on widened operands instead", RuntimeWarning, stacklevel=3)
    return ok
