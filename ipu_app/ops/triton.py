"""Block-sparse training kernels in Triton for GPUs, block sizes 16, 32 and 64.

Two kernels for the three products of a training step of ``y = x W^T``:

* ``_lines`` Y = X W^T with one program per (token tile, block row), summing the row's blocks, and
  dX = dY W with one program per (token tile, block column), over the transposed pattern;
* ``_sddmm`` dV[k] = dY[:, row k]^T X[:, col k]: one program per (active block, token split).

They walk the index lists of :mod:`ops.meta`, built once per pattern (cached until the pattern's
coordinates change). On a GPU the token tile and warp count are autotuned per shape; with
``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on the CPU in
Triton's interpreter, which is how the test suite checks them without a GPU (there bf16 tiles are
multiplied in fp32: the interpreter's own bf16 product is wrong). Inputs are fp32, bf16 or
fp16 (fp32 accumulation); fp32 products use TF32 only where ``torch.backends.cuda.matmul.allow_tf32``
allows it, as dense ``F.linear`` does. Anything else (block sizes 1/4/8, a frozen inactive subset,
tensors not on a GPU outside interpreter mode) goes to ``ops.reference``.
"""

from __future__ import annotations

import os

import torch

from .fast import block_sparse_ops, make_linear
from .meta import KernelMeta, MetaCache

try:  # the GPU path is optional: the package works (reference backend) without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

BLOCK_SIZES = (16, 32, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """True when the kernels can run: Triton importable, and a CUDA GPU or interpreter mode."""
    return triton is not None and (interpreting() or torch.cuda.is_available())


def covers(device_type: str, dtype: torch.dtype, block_size: int, frozen: bool = False) -> bool:
    """Whether these kernels run such a call (otherwise the reference op does)."""
    if triton is None or frozen or block_size not in BLOCK_SIZES or dtype not in DTYPES:
        return False
    return device_type == "cuda" or (interpreting() and device_type == "cpu")


if triton is not None:
    def _configs():
        if interpreting():
            return [triton.Config({"BLOCK_T": 32}, num_warps=4)]
        return [triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=st)
                for bt in (64, 128) for w in (4, 8) for st in (2, 3)]

    @triton.autotune(configs=_configs(), key=["T_BUCKET", "N_LINES", "B", "LDA", "TRANS_W"])
    @triton.jit
    def _lines(A, W, PTR, BLK, OTHER, BIAS, C, T, LDA, LDC, T_BUCKET, N_LINES,
               B: tl.constexpr, TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_T: tl.constexpr):
        """C[t, line*B + o] = sum over the line's blocks k of A[t, other_k*B + i] w_k[i, o], with
        w_k = V[k]^T (TRANS_W, forward) or V[k] (input gradient)."""
        pid_t = tl.program_id(0)
        line = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_b = tl.arange(0, B)
        t_mask = offs_t < T
        acc = tl.zeros((BLOCK_T, B), dtype=tl.float32)
        start = tl.load(PTR + line)
        end = tl.load(PTR + line + 1)
        for p in range(start, end):
            k = tl.load(BLK + p).to(tl.int64)
            other = tl.load(OTHER + p).to(tl.int64)
            a = tl.load(A + offs_t[:, None].to(tl.int64) * LDA + other * B + offs_b[None, :],
                        mask=t_mask[:, None], other=0.0)
            if TRANS_W:  # w[i, o] = V[k][o, i]
                w = tl.load(W + k * B * B + offs_b[None, :] * B + offs_b[:, None])
            else:        # w[i, o] = V[k][i, o]
                w = tl.load(W + k * B * B + offs_b[:, None] * B + offs_b[None, :])
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + line * B + offs_b).to(tl.float32)[None, :]
        tl.store(C + offs_t[:, None].to(tl.int64) * LDC + line * B + offs_b[None, :],
                 acc.to(C.dtype.element_ty), mask=t_mask[:, None])

    @triton.autotune(configs=_configs(), key=["T_BUCKET", "B", "LDY", "LDX"])
    @triton.jit
    def _sddmm(DY, X, ROWS, COLS, DV, T, LDY, LDX, T_BUCKET, TOKENS_PER_SPLIT,
               B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr):
        """DV[split, k] = sum over the split's tokens of dY[t, row_k*B + i] X[t, col_k*B + j]."""
        k = tl.program_id(0)
        split = tl.program_id(1)
        row = tl.load(ROWS + k).to(tl.int64)
        col = tl.load(COLS + k).to(tl.int64)
        offs_b = tl.arange(0, B)
        acc = tl.zeros((B, B), dtype=tl.float32)
        t_begin = split * TOKENS_PER_SPLIT
        for t0 in range(t_begin, t_begin + TOKENS_PER_SPLIT, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < T
            dy_t = tl.load(DY + offs_t[None, :].to(tl.int64) * LDY + row * B + offs_b[:, None],
                           mask=t_mask[None, :], other=0.0)          # [B, BLOCK_T]
            x = tl.load(X + offs_t[:, None].to(tl.int64) * LDX + col * B + offs_b[None, :],
                        mask=t_mask[:, None], other=0.0)             # [BLOCK_T, B]
            if UPCAST:
                dy_t, x = dy_t.to(tl.float32), x.to(tl.float32)
            acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
        n_blocks = tl.num_programs(0)
        tl.store(DV + (split * n_blocks + k) * B * B + offs_b[:, None] * B + offs_b[None, :], acc)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not (torch.backends.cuda.matmul.allow_tf32 and not interpreting()):
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bf16 wrongly (numpy has no bf16): there the products are taken
    in fp32 from the bf16 values, which is what the GPU's bf16 tensor cores compute too."""
    return interpreting() and dtype == torch.bfloat16


def _bucket(tokens: int) -> int:
    """Autotuning key for the token count: its power of two."""
    return 1 << max(tokens - 1, 0).bit_length()


def _lines_call(a: torch.Tensor, values: torch.Tensor, ptr, blk, other, n_lines: int, b: int,
                trans_w: bool, bias: torch.Tensor | None) -> torch.Tensor:
    T = a.shape[0]
    c = torch.empty(T, n_lines * b, dtype=a.dtype, device=a.device)
    if T == 0:
        return c
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), n_lines)  # noqa: E731
    _lines[grid](a, values, ptr, blk, other, bias if bias is not None else c, c, T, a.shape[1], c.shape[1],
                 _bucket(T), n_lines, B=b, TRANS_W=trans_w, HAS_BIAS=bias is not None,
                 PRECISION=_precision(a.dtype), UPCAST=_upcast(a.dtype))
    return c


def _sddmm_splits(n_tiles: int, tokens: int, sms: int) -> int:
    """Token splits of the values gradient: enough programs to fill ``sms`` multiprocessors ~4 times
    over, each with at least 256 tokens; the partial sums are added after."""
    return max(1, min(-(-4 * sms // max(n_tiles, 1)), -(-tokens // 256)))


def _sddmm_call(gy: torch.Tensor, x: torch.Tensor, meta: KernelMeta, b: int) -> torch.Tensor:
    T = x.shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    splits = _sddmm_splits(meta.ntiles, T, sms)
    per_split = triton.cdiv(triton.cdiv(T, splits), 128) * 128
    splits = triton.cdiv(T, per_split) if T else 1
    dv = torch.zeros(splits, meta.ntiles, b, b, dtype=torch.float32, device=x.device)
    if T and meta.ntiles:
        _sddmm[(meta.ntiles, splits)](gy, x, meta.rows, meta.cols, dv, T, gy.shape[1], x.shape[1], _bucket(T),
                                      per_split, B=b, PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype))
    return dv.sum(0) if splits > 1 else dv[0]


_meta = MetaCache(None)  # tiles are the blocks themselves


def _forward(x2d, values, meta: KernelMeta, bias):
    return _lines_call(x2d, values, meta.row_ptr, meta.row_blk, meta.row_col, meta.grid[0], values.shape[-1],
                       True, bias)


def _input_grad(gy, values, meta: KernelMeta):
    return _lines_call(gy, values, meta.col_ptr, meta.col_blk, meta.col_row, meta.grid[1], values.shape[-1],
                       False, None)


def _values_grad(gy, x2d, meta: KernelMeta):
    return _sddmm_call(gy, x2d, meta, meta.tile)


_op = block_sparse_ops("triton_bsmm", _forward, _input_grad, _values_grad, _meta)


linear = make_linear(_op, covers, "Triton kernels")
