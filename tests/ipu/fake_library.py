"""A stand-in for libdynsparse.so (popart_ops) and a CPU emulation of its PopART op."""

import ctypes

import numpy as np
import torch


class FakeLibrary:
    """Stands in for libdynsparse.so's C functions: a trivial 'partitioner' (metainfo = the block
    corners, nz = the blocks in order, then padding) that exercises the ctypes plumbing and the
    W <-> Wᵀ conventions of the Python side."""

    def __init__(self, fail=None):
        self.fail = fail

    def _err(self, err, message):
        ctypes.memmove(err, message.encode() + b"\0", len(message) + 1)
        return 1

    def ipu_app_dynsparse_sizes(self, b, i, o, batch, nnz, half, opts, meta, nz, err, errlen):
        if self.fail:
            return self._err(err, self.fail)
        meta._obj.value, nz._obj.value = 2 * nnz + 3, nnz * b * b + 5
        return 0

    def ipu_app_dynsparse_encode(self, b, i, o, batch, nnz, half, opts, rows, cols, values, meta, msize, nz, nsize,
                                 err, errlen):
        r = np.ctypeslib.as_array(rows, (nnz,))
        c = np.ctypeslib.as_array(cols, (nnz,))
        m = np.ctypeslib.as_array(meta, (msize,))
        m[:nnz], m[nnz:2 * nnz] = r, c
        np.ctypeslib.as_array(nz, (nsize,))[:nnz * b * b] = np.ctypeslib.as_array(values, (nnz * b * b,))
        return 0

    def ipu_app_dynsparse_decode(self, b, i, o, batch, nnz, half, opts, meta, msize, nz, nsize, rows, cols, values,
                                 err, errlen):
        m = np.ctypeslib.as_array(meta, (msize,))
        np.ctypeslib.as_array(rows, (nnz,))[:] = m[:nnz]
        np.ctypeslib.as_array(cols, (nnz,))[:] = m[nnz:2 * nnz]
        np.ctypeslib.as_array(values, (nnz * b * b,))[:] = np.ctypeslib.as_array(nz, (nsize,))[:nnz * b * b]
        return 0


def emulate_op(inputs, attributes):
    """What DynSparseMatMul computes, given FakeLibrary's metainfo layout: rows then cols of the
    blocks of V = Wᵀ (element corners), nz = those blocks row-major; differentiable in x and nz."""
    x, metainfo, nz = inputs
    b, n_in, n_out = attributes["block_size"], attributes["input_size"], attributes["output_size"]
    nnz = attributes["max_non_zero_blocks"]
    meta = torch.from_numpy(metainfo.detach().numpy().view(np.uint16).astype(np.int64))
    rows, cols = meta[:nnz] // b, meta[nnz:2 * nnz] // b
    blocks = nz[:nnz * b * b].reshape(nnz, b, b)
    v = blocks.new_zeros(n_in // b, n_out // b, b, b).index_put((rows, cols), blocks)
    return x @ v.permute(0, 2, 1, 3).reshape(n_in, n_out)


def emulate_static_op(inputs, attributes):
    """What StaticBsMatMul computes from its attributes and weight (differentiable in x and w)."""
    x, w = inputs
    m, k, n = attributes["matrix_dims"]
    _, bk, bn = attributes["block_size"]
    mask = torch.tensor(attributes["sparsity_mask"]).reshape(k // bk, n // bn)
    rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major: the weight's order
    v = w.new_zeros(k // bk, n // bn, bk, bn).index_put((rows, cols), w.reshape(-1, bk, bn))
    assert x.shape == (m, k)
    return x @ v.permute(0, 2, 1, 3).reshape(k, n)
