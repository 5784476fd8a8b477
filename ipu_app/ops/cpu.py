"""Fast block-sparse training on CPUs: C kernels (``csrc/bsmm_cpu.c``), two layouts.

* 16x16 tiles, for block sizes that are multiples of 16: bf16 on AMX tiles with fp32 accumulation,
  fp32 on AVX-512 registers.
* Token panels, fp32, any block size (1, 2, 4, 8, and 16+ on CPUs without AVX-512): the dense
  operand is packed as panels of 16 tokens per feature, so that each output row accumulates whole
  token vectors (8-float vector types: AVX2 or AVX-512 code from one portable source).

bf16 on a CPU without AMX runs the fp32 kernels: its operands are widened where they are read (the
panels' packing does it on the way; the tiles get a converted copy) and the results rounded back to
bf16, so a bf16 run keeps its sparse speed on every CPU (:func:`converts`).

Both are parallel with OpenMP. :func:`path` says which runs a call. The kernels are compiled on
first use (``ops.cpu_build``: cached per source, compiler and CPU); ``python -m ipu_app build-kernels``
(run by ``install.sh``) builds them ahead of time.

Whatever these kernels do not cover falls back to ``ops.reference``, per call: a frozen inactive
subset, fp16 and fp64, non-CPU tensors.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from .cpu_build import KernelBuildError, build, cache_dir, library_path, load, pairs_self_check, vnni
from .fast import block_sparse_ops, compute_dtype, make_linear
from .meta import KernelMeta, MetaCache, tile_values

TILE = 16
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: KernelBuildError | None = None
_amx: bool = False
_avx512: bool = False  # read once at load: torch.compile traces ``path`` but not a ctypes call
_native_bf16: bool = False
_bf16_pairs: bool = False  # the bf16 pair kernels run natively here and passed their self-check


def library() -> ctypes.CDLL:
    """The loaded kernels (built on first use); :class:`KernelBuildError` when impossible."""
    global _lib, _lib_error, _amx, _avx512, _native_bf16, _bf16_pairs
    if _lib is not None:  # loaded: no lock (also what lets torch.compile trace ``covers``)
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                lib = load(build())
                _amx = bool(lib.bsmm_amx_available())
                _avx512 = bool(lib.bsmm_f32_avx512())
                _native_bf16 = bool(lib.bsmm_native_bf16())
                _lib = lib
                _bf16_pairs = bool(lib.bsmm_bf16_pairs_native()) and pairs_self_check(lib)
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


def bf16_pairs() -> bool:
    """True when bf16 calls can run the native bf16 pair kernels here (AVX-512 BF16, self-checked)."""
    return available() and _bf16_pairs


def native_bf16() -> bool:
    """True when this CPU has bf16 dot products (AVX-512 BF16): dense bf16 GEMMs are then about twice
    as fast as fp32 ones; without them PyTorch emulates bf16 and is far slower than in fp32."""
    return available() and _native_bf16


def converts(dtype: torch.dtype, block_size: int = TILE) -> bool:
    """True when calls in ``dtype`` run the fp32 kernels on widened operands by default: bf16 other than
    on AMX tiles or the AVX-512 BF16 tiles and panels (a CPU with neither, or a block size they do not take)."""
    return _widens(dtype, path("cpu", dtype, block_size))


def _widens(dtype: torch.dtype, chosen: str | None) -> bool:
    """Whether bf16 runs widened to fp32 on the path ``chosen`` (every path but the native bf16 ones)."""
    return dtype == torch.bfloat16 and chosen not in ("tiles_bf16", "panels_bf16") and not (chosen == "tiles" and _amx)


def kernel_name(dtype: torch.dtype, block_size: int = TILE, chosen: str | None = None) -> str:
    """What runs a call in ``dtype`` here (on ``chosen``, one of :func:`paths`, or the default path), for the log."""
    chosen = chosen or path("cpu", dtype, block_size)
    if chosen == "tiles_bf16":
        return "AVX-512 BF16 tiles"
    if chosen == "panels_bf16":
        return "AVX-512 BF16 token panels"
    name = "fp32 token panels" if chosen == "panels" else "AMX" if dtype == torch.bfloat16 and _amx else "AVX-512"
    return name + (" (bf16 widened to fp32)" if _widens(dtype, chosen) else "")


def path(device_type: str, dtype: torch.dtype, block_size: int, frozen: bool = False) -> str | None:
    """Which kernels run such a call: ``"tiles"`` (16x16 tiles: AMX bf16, AVX-512 fp32 and bf16 in
    fp32), ``"panels"`` (fp32 on token panels, bf16 in fp32: any block size, any CPU), or None (the
    reference op)."""
    if frozen or device_type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not available():
        return None
    if dtype == torch.bfloat16 and _bf16_pairs and not _amx:
        if block_size % TILE == 0:
            return "tiles_bf16"
        if block_size in PAIR_PANEL_SIZES:
            return "panels_bf16"
    if block_size % TILE == 0 and (_avx512 or (dtype == torch.bfloat16 and _amx)):
        return "tiles"
    return "panels"


def paths(device_type: str, dtype: torch.dtype, block_size: int, frozen: bool = False) -> list[str]:
    """Every kernel path that runs such a call well here (what ``auto`` measures against dense), the
    default :func:`path` first: the tiles where the CPU has them, and the token panels always."""
    first = path(device_type, dtype, block_size, frozen)
    if first is None:
        return []
    found = [first]
    if first == "tiles_bf16" and _avx512:
        found.append("tiles")  # bf16 widened to fp32 on the AVX-512 tiles
    return found + ([] if first == "panels" else ["panels"])  # the panels (widened) cover every call


def covers(device_type: str, dtype: torch.dtype, block_size: int, frozen: bool = False) -> bool:
    """Whether these kernels run such a call (otherwise the reference op does)."""
    return path(device_type, dtype, block_size, frozen) is not None


_meta = MetaCache(TILE)
_meta_own = MetaCache(None)  # the token-panel kernels walk each pattern at its own block size


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bias_grad(gy: torch.Tensor) -> torch.Tensor:
    """``gy.sum(0)`` in fp32, in ``gy``'s dtype (PyTorch's fp32 sum of bf16 is several times slower)."""
    gy = gy.contiguous()
    out = torch.empty(gy.shape[1], dtype=torch.float32)
    library().bsmm_colsum(gy.data_ptr(), gy.shape[0], gy.shape[1], gy.dtype == torch.bfloat16, out.data_ptr(),
                          torch.get_num_threads())
    return out.to(gy.dtype)


def _pad_tokens(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


def _convert(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` between bf16 and fp32 in the kernels' parallel loop (PyTorch's own widening
    of bf16 is several times slower on CPUs without bf16 instructions)."""
    t = t.contiguous()
    out = torch.empty(t.shape, dtype=dtype)
    library().bsmm_convert(t.data_ptr(), t.numel(), dtype == torch.bfloat16, out.data_ptr(), torch.get_num_threads())
    return out


def _lines(a: torch.Tensor, weights: torch.Tensor, ptr, blk, other, nlines: int, bias) -> torch.Tensor:
    """``C = A`` times each line's tiles: forward (block rows) or input gradient (block columns)."""
    lib, T, threads = library(), a.shape[0], torch.get_num_threads()
    if a.dtype == torch.float32 or not _amx:  # bf16 on these tiles without AMX: widened
        a32 = a if a.dtype == torch.float32 else _convert(a, torch.float32)
        weights = weights.float().contiguous()
        c = torch.empty(T, nlines * TILE, dtype=torch.float32)
        lib.bsmm_f32_lines(a32.data_ptr(), T, a.shape[1], weights.data_ptr(), ptr.data_ptr(), blk.data_ptr(),
                           other.data_ptr(), nlines, _ptr(bias), c.data_ptr(), threads)
        return c if a.dtype == torch.float32 else _convert(c, a.dtype)
    a = _pad_tokens(a, 32)
    packed = vnni(weights)  # packed[k][p][o][q] = w[k](contracted 2p+q, output o)
    c = torch.empty(a.shape[0], nlines * TILE, dtype=a.dtype)
    lib.bsmm_amx_lines(a.data_ptr(), a.shape[0], a.shape[1], packed.data_ptr(), ptr.data_ptr(), blk.data_ptr(),
                       other.data_ptr(), nlines, _ptr(bias), c.data_ptr(), threads)
    return c[:T]


def _sddmm(gy: torch.Tensor, x: torch.Tensor, meta: KernelMeta) -> torch.Tensor:
    lib, threads = library(), torch.get_num_threads()
    if x.shape[0] == 0:
        return torch.zeros(meta.ntiles, TILE, TILE, dtype=torch.float32)
    dv = torch.empty(meta.ntiles, TILE, TILE, dtype=torch.float32)
    if gy.dtype == torch.float32 or not _amx:
        if gy.dtype != torch.float32:
            gy, x = _convert(gy, torch.float32), _convert(x, torch.float32)
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


_op = block_sparse_ops("cpu_bsmm", _forward, _input_grad, _sddmm, _meta, bias_grad=_bias_grad)


# ------------------------------------------------------------ 16x16 tiles, bf16 pair dot products
def _pair_rows(a: torch.Tensor, role: str, lib=None) -> torch.Tensor:
    """``a [T, F]`` (bf16) in token pairs ``[ceil(T/2), F, 2]`` (a zero row after an odd T)."""
    T, F = a.shape
    out = _workspace.get(role, (T + 1) // 2 * F * 2, torch.bfloat16)
    (lib or library()).bsmm_pair_rows(a.data_ptr(), T, F, out.data_ptr(), torch.get_num_threads())
    return out


def _b_lines(a, weights, ptr, blk, other, nlines: int, bias) -> torch.Tensor:
    T, K = a.shape
    c = torch.empty(T, nlines * TILE, dtype=torch.bfloat16)
    packed = vnni(weights.bfloat16())  # held until the kernel returns
    work = _workspace.get("token_tiles", -(-T // TILE) * K * TILE, torch.bfloat16)
    library().bsmm_bf16_lines(a.data_ptr(), T, K, packed.data_ptr(), ptr.data_ptr(), blk.data_ptr(), other.data_ptr(),
                              nlines, _ptr(bias), c.data_ptr(), work.data_ptr(), torch.get_num_threads())
    return c


def _b_forward(x2d, tiles, meta: KernelMeta, bias):
    return _b_lines(x2d.bfloat16(), tiles.transpose(1, 2), meta.row_ptr, meta.row_blk, meta.row_col, meta.grid[0],
                    None if bias is None else bias.float().contiguous()).to(x2d.dtype)


def _b_input_grad(gy, tiles, meta: KernelMeta):
    return _b_lines(gy.bfloat16(), tiles, meta.col_ptr, meta.col_blk, meta.col_row, meta.grid[1], None).to(gy.dtype)


def _b_sddmm(gy, x, meta: KernelMeta) -> torch.Tensor:
    dv = torch.zeros(meta.ntiles, TILE, TILE, dtype=torch.float32)
    if x.shape[0] == 0 or meta.ntiles == 0:
        return dv
    yp, xp = _pair_rows(gy.bfloat16(), "pairs_y"), _pair_rows(x.bfloat16(), "pairs_x")
    library().bsmm_bf16_sddmm(yp.data_ptr(), gy.shape[1], xp.data_ptr(), x.shape[1], (x.shape[0] + 1) // 2,
                              meta.rows.data_ptr(), meta.cols.data_ptr(), meta.ntiles, dv.data_ptr(),
                              torch.get_num_threads())
    return dv


_op_pairs = block_sparse_ops("cpu_bf16_pairs", _b_forward, _b_input_grad, _b_sddmm, _meta, bias_grad=_bias_grad)


# ---------------------------------------------------------------------- token panels (fp32, any b)
PANEL = 16  # tokens per panel (csrc: PANEL)
PAIR_PANEL_SIZES = (4, 8)  # block sizes of the bf16 pair token panels


class _Workspace:
    """Reused float32 buffers for the packed operands, one per role and thread: a fresh multi-MiB
    tensor on every call costs more in page faults than packing it does. Packed buffers never leave
    the op (its outputs are new tensors)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, role: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        buf = buffers.get((role, dtype))
        if buf is None or buf.numel() < numel:
            buf = buffers[(role, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


_workspace = _Workspace()


def _pack(a: torch.Tensor, role: str) -> tuple[torch.Tensor, int]:
    """``[T, F]`` (fp32 or bf16) as fp32 token panels ``[ceil(T/16), F, 16]`` (zero-padded);
    (panels, panel count)."""
    T, F = a.shape
    np_ = -(-T // PANEL)
    out = _workspace.get(role, np_ * F * PANEL)
    library().bsmm_pack(a.data_ptr(), T, F, a.stride(0), a.dtype == torch.bfloat16, out.data_ptr(),
                        torch.get_num_threads())
    return out, np_


def _panel_lines(a, weights, ptr, blk, other, nlines: int, b: int, bias,
                 packed: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """``a [T, K]`` times each line's blocks; ``packed``: ``a`` already packed (:func:`_pack`)."""
    T, K = a.shape
    if T == 0:
        return a.new_empty(0, nlines * b)
    lib, threads = library(), torch.get_num_threads()
    panels, np_ = packed or _pack(a, "in")
    weights = weights.float().index_select(0, blk)  # in walk order: the kernel streams them; held
    c = _workspace.get("out", np_ * nlines * b * PANEL)
    if lib.bsmm_panel_lines(panels.data_ptr(), np_, K, weights.data_ptr(), b, ptr.data_ptr(), other.data_ptr(),
                            nlines, _ptr(bias), c.data_ptr(), threads):
        raise ValueError(f"cpu kernels: block size {b} is not supported")
    y = torch.empty(T, nlines * b, dtype=a.dtype)
    lib.bsmm_unpack(c.data_ptr(), T, nlines * b, a.dtype == torch.bfloat16, y.data_ptr(), threads)
    return y


def _p_forward(x2d, values, meta: KernelMeta, bias):
    # per block [contracted in, out]
    return _panel_lines(x2d, values.transpose(1, 2), meta.row_ptr, meta.row_blk, meta.row_col, meta.grid[0],
                        meta.tile, None if bias is None else bias.float().contiguous())


def _p_input_grad(gy, values, meta: KernelMeta, packed_gy: tuple[torch.Tensor, int] | None = None):
    return _panel_lines(gy, values, meta.col_ptr, meta.col_blk, meta.col_row, meta.grid[1], meta.tile, None,
                        packed_gy)


def _p_sddmm(gy, x, meta: KernelMeta, packed_gy: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    b = meta.tile
    dv = torch.zeros(meta.ntiles, b, b, dtype=torch.float32)
    if x.shape[0] == 0 or meta.ntiles == 0:
        return dv
    g, np_ = packed_gy or _pack(gy, "grad")
    xp, _ = _pack(x, "in")
    # b = 1 walks the lines of the wider operand, so that its random reads fall in the narrower one
    by_row = gy.shape[1] >= x.shape[1]
    walk = (meta.row_ptr, meta.row_col, meta.row_blk) if by_row else (meta.col_ptr, meta.col_row, meta.col_blk)
    library().bsmm_panel_sddmm(g.data_ptr(), gy.shape[1], xp.data_ptr(), x.shape[1], np_, b, meta.rows.data_ptr(),
                               meta.cols.data_ptr(), meta.ntiles, by_row, *(t.data_ptr() for t in walk),
                               dv.data_ptr(), torch.get_num_threads())
    return dv


def _p_grads(gy, x, values, meta: KernelMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients from one packing of dY."""
    packed = _pack(gy, "grad")
    return _p_input_grad(gy, values, meta, packed), _p_sddmm(gy, x, meta, packed)


# ------------------------------------------------- token panels, bf16 pair dot products (b = 4, 8)
def _q_lines(a, weights, ptr, blk, other, nlines: int, b: int, bias) -> torch.Tensor:
    """``a [T, K]`` (bf16) times each line's blocks on feature-pair panels; ``[T, nlines*b]`` bf16."""
    T, K = a.shape
    if T == 0:
        return a.new_empty(0, nlines * b)
    lib, threads = library(), torch.get_num_threads()
    np_ = -(-T // PANEL)
    panels = _workspace.get("pairs_in", np_ * K * PANEL, torch.bfloat16)
    lib.bsmm_pack_feature_pairs(a.data_ptr(), T, K, a.stride(0), panels.data_ptr(), threads)
    w = vnni(weights.bfloat16().index_select(0, blk))  # in walk order, held until the kernel returns
    c = _workspace.get("out", np_ * nlines * b * PANEL)
    if lib.bsmm_pair_panel_lines(panels.data_ptr(), np_, K, w.data_ptr(), b, ptr.data_ptr(), other.data_ptr(),
                                 nlines, _ptr(bias), c.data_ptr(), threads):
        raise ValueError(f"cpu kernels: block size {b} has no bf16 pair panels")
    y = torch.empty(T, nlines * b, dtype=torch.bfloat16)
    lib.bsmm_unpack(c.data_ptr(), T, nlines * b, True, y.data_ptr(), threads)
    return y


def _q_forward(x2d, values, meta: KernelMeta, bias):
    return _q_lines(x2d.bfloat16(), values.transpose(1, 2), meta.row_ptr, meta.row_blk, meta.row_col, meta.grid[0],
                    meta.tile, None if bias is None else bias.float().contiguous()).to(x2d.dtype)


def _q_input_grad(gy, values, meta: KernelMeta):
    return _q_lines(gy.bfloat16(), values, meta.col_ptr, meta.col_blk, meta.col_row, meta.grid[1], meta.tile,
                    None).to(gy.dtype)


def _token_pairs(a: torch.Tensor, role: str) -> tuple[torch.Tensor, int]:
    T, F = a.shape
    np_ = -(-T // 32)
    out = _workspace.get(role, np_ * F * 32, torch.bfloat16)
    library().bsmm_pack_token_pairs(a.data_ptr(), T, F, a.stride(0), out.data_ptr(), torch.get_num_threads())
    return out, np_


def _q_sddmm(gy, x, meta: KernelMeta) -> torch.Tensor:
    b = meta.tile
    dv = torch.zeros(meta.ntiles, b, b, dtype=torch.float32)
    if x.shape[0] == 0 or meta.ntiles == 0:
        return dv
    (g, np_), (xp, _) = _token_pairs(gy.bfloat16(), "pairs_g"), _token_pairs(x.bfloat16(), "pairs_x")
    library().bsmm_pair_panel_sddmm(g.data_ptr(), gy.shape[1], xp.data_ptr(), x.shape[1], np_, b,
                                    meta.rows.data_ptr(), meta.cols.data_ptr(), meta.ntiles, dv.data_ptr(),
                                    torch.get_num_threads())
    return dv


_op_pair_panels = block_sparse_ops("cpu_pair_panels", _q_forward, _q_input_grad, _q_sddmm, _meta_own,
                                   bias_grad=_bias_grad)

_op_panels = block_sparse_ops("cpu_panels", _p_forward, _p_input_grad, _p_sddmm, _meta_own, _p_grads,
                              bias_grad=_bias_grad)

_linear_tiles = make_linear(_op, lambda *a: "tiles" in paths(*a), "CPU kernels (16x16 tiles)",
                            lambda v: tile_values(v, TILE))
_linear_panels = make_linear(_op_panels, lambda *a: "panels" in paths(*a), "CPU kernels (token panels)")


_linear_pairs = make_linear(_op_pairs, lambda *a: "tiles_bf16" in paths(*a), "CPU kernels (bf16 16x16 tiles)",
                            lambda v: tile_values(v, TILE))
_linear_pair_panels = make_linear(_op_pair_panels, lambda *a: "panels_bf16" in paths(*a),
                                  "CPU kernels (bf16 token panels)")
_LINEARS = {"tiles": _linear_tiles, "panels": _linear_panels, "tiles_bf16": _linear_pairs,
            "panels_bf16": _linear_pair_panels}


def linear(x: torch.Tensor, values: torch.Tensor, pattern, bias: torch.Tensor | None = None,
           frozen: torch.Tensor | None = None, *, kernels: str | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` like :func:`ops.reference.linear`, on the CPU kernels where they apply
    (:func:`path`, or ``kernels``, one of :func:`paths`, as ``auto`` measured), else on the reference op."""
    chosen = path(x.device.type, compute_dtype(x), pattern.block_size, frozen is not None)
    if kernels is not None and chosen is not None:
        chosen = kernels
    return _LINEARS.get(chosen, _linear_panels)(x, values, pattern, bias, frozen)


__all__ = ["linear", "build", "load", "library", "library_path", "cache_dir", "available", "amx_available", "covers",
           "kernel_name", "path", "paths", "KernelBuildError"]
