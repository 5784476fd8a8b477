"""Fast block-sparse training on x86 CPUs: C kernels (``csrc/bsmm_cpu.c``) for 16x16 tiles.

bf16 runs on AMX tiles with fp32 accumulation, fp32 on vectorised loops; both are parallel with
OpenMP. Block sizes that are multiples of 16 are cut into 16x16 tiles. The kernels are compiled on
first use (``gcc -O3 -march=native -fopenmp``, about a second) into a cache directory keyed by the
source, the compiler and this CPU, so a cluster sharing a home directory never loads a library built
for another CPU; ``python -m ipu_app build-kernels`` (run by ``install.sh``) builds it ahead of time.

Whatever these kernels do not cover falls back to ``ops.reference``, per call: block sizes 1/4/8, a
frozen inactive subset, fp16, bf16 on a CPU without AMX, non-CPU tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .fast import block_sparse_ops, make_linear
from .meta import KernelMeta, MetaCache, tile_values

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


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: KernelBuildError | None = None
_amx: bool = False


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bsmm_amx_available.restype = i32
    lib.bsmm_f32_avx512.restype = i32
    lib.bsmm_f32_lines.argtypes = [p, i64, i64, p, p, p, p, i64, p, p, i32]
    lib.bsmm_f32_sddmm.argtypes = [p, i64, p, i64, i64, p, p, i64, p, i32]
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


def library() -> ctypes.CDLL:
    """The loaded kernels (built on first use); :class:`KernelBuildError` when impossible."""
    global _lib, _lib_error, _amx
    if _lib is not None:  # loaded: no lock (also what lets torch.compile trace ``covers``)
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                lib = load(build())
                _amx = bool(lib.bsmm_amx_available())
                _lib = lib
            except (KernelBuildError, OSError) as exc:
                _lib_error = exc if isinstance(exc, KernelBuildError) else KernelBuildError(
                    f"cpu backend: loading the kernels failed: {exc}")
        if _lib_error is not None:
            raise _lib_error
        return _lib


def available() -> bool:
    """True when the kernels build and load on this machine."""
    try:
        library()
        return True
    except KernelBuildError:
        return False


def amx_available() -> bool:
    """True when bf16 runs on AMX here."""
    return available() and _amx


def kernel_name(dtype: torch.dtype) -> str:
    """What runs a call in ``dtype`` here, for the log."""
    if dtype == torch.bfloat16:
        return "AMX"
    return "AVX-512" if library().bsmm_f32_avx512() else "portable C"


def covers(device_type: str, dtype: torch.dtype, block_size: int, frozen: bool = False) -> bool:
    """Whether these kernels run such a call (otherwise the reference op does)."""
    if frozen or device_type != "cpu" or block_size % TILE:
        return False
    if dtype == torch.float32:
        return available()
    return dtype == torch.bfloat16 and amx_available()


_meta = MetaCache(TILE)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _pad_tokens(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


def _lines(a: torch.Tensor, weights: torch.Tensor, ptr, blk, other, nlines: int, bias) -> torch.Tensor:
    """``C = A`` times each line's tiles: forward (block rows) or input gradient (block columns)."""
    lib, T, threads = library(), a.shape[0], torch.get_num_threads()
    if a.dtype == torch.float32:
        weights = weights.contiguous()
        c = torch.empty(T, nlines * TILE, dtype=a.dtype)
        lib.bsmm_f32_lines(a.data_ptr(), T, a.shape[1], weights.data_ptr(), ptr.data_ptr(), blk.data_ptr(),
                           other.data_ptr(), nlines, _ptr(bias), c.data_ptr(), threads)
        return c
    a = _pad_tokens(a, 32)
    # VNNI operand: packed[k][p][o][q] = w[k](contracted 2p+q, output o)
    packed = weights.unflatten(1, (TILE // 2, 2)).transpose(2, 3).contiguous()
    c = torch.empty(a.shape[0], nlines * TILE, dtype=a.dtype)
    lib.bsmm_amx_lines(a.data_ptr(), a.shape[0], a.shape[1], packed.data_ptr(), ptr.data_ptr(), blk.data_ptr(),
                       other.data_ptr(), nlines, _ptr(bias), c.data_ptr(), threads)
    return c[:T]


def _sddmm(gy: torch.Tensor, x: torch.Tensor, meta: KernelMeta) -> torch.Tensor:
    lib, threads = library(), torch.get_num_threads()
    if x.shape[0] == 0:
        return torch.zeros(meta.ntiles, TILE, TILE, dtype=torch.float32)
    dv = torch.empty(meta.ntiles, TILE, TILE, dtype=torch.float32)
    if gy.dtype == torch.float32:
        lib.bsmm_f32_sddmm(gy.data_ptr(), gy.shape[1], x.data_ptr(), x.shape[1], x.shape[0], meta.rows.data_ptr(),
                           meta.cols.data_ptr(), meta.ntiles, dv.data_ptr(), threads)
        return dv
    gy, x = _pad_tokens(gy, 32), _pad_tokens(x, 32)
    # The kernel transposes its first operand: make it the narrower one.
    swap = x.shape[1] < gy.shape[1]
    p, q = (x, gy) if swap else (gy, x)
    p_line, q_line = (meta.cols, meta.rows) if swap else (meta.rows, meta.cols)
    p_used, q_used = (meta.col_used, meta.row_used) if swap else (meta.row_used, meta.col_used)
    order = meta.row_blk if swap else meta.col_blk  # grouped by Q's strip
    work = torch.empty(lib.bsmm_amx_sddmm_chunk(p.shape[1], q.shape[1]) * (p.shape[1] + q.shape[1]),
                       dtype=torch.bfloat16)
    lib.bsmm_amx_sddmm(p.data_ptr(), p.shape[1], q.data_ptr(), q.shape[1], x.shape[0], p_line.data_ptr(),
                       q_line.data_ptr(), p_used.data_ptr(), q_used.data_ptr(), order.data_ptr(), meta.ntiles,
                       dv.data_ptr(), work.data_ptr(), threads)
    return dv.transpose(1, 2) if swap else dv


def _forward(x2d, tiles, meta: KernelMeta, bias):
    fwd_w = tiles.transpose(1, 2)  # per tile [contracted in, out]; _lines lays it out once
    return _lines(x2d, fwd_w, meta.row_ptr, meta.row_blk, meta.row_col, meta.grid[0],
                  None if bias is None else bias.float().contiguous())


def _input_grad(gy, tiles, meta: KernelMeta):
    return _lines(gy, tiles, meta.col_ptr, meta.col_blk, meta.col_row, meta.grid[1], None)


_op = block_sparse_ops("cpu_bsmm", _forward, _input_grad, _sddmm, _meta)


linear = make_linear(_op, covers, "CPU kernels", lambda v: tile_values(v, TILE))


__all__ = ["linear", "build", "available", "amx_available", "covers", "kernel_name", "KernelBuildError"]
