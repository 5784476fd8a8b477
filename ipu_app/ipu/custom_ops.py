"""The popsparse dynamic block-sparse matmul op (``popart_ops/``) from Python.

* :func:`load_library` loads ``popart_ops/build/libdynsparse.so`` with ctypes; PopTorch needs this
  before the model is compiled (the library registers the PopART op ``ai.graphcore::DynSparseMatMul``).
* :func:`dynsparse_matmul` inserts the op into a PopTorch graph with ``poptorch.custom_op``.
* :class:`DynSparseHost` wraps the library's host helpers: the metainfo/nz buffer sizes that popsparse
  plans for a layer, and our pattern + values <-> (metainfo, nz) through the popsparse host
  partitioner, on an offline IPU target (no device needed).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..sparse.pattern import BlockPattern
from . import IpuUnavailable
from .popsparse import check_dynamic_block, dynamic_coo

LIBRARY_ENV = "IPU_APP_POPART_OPS"
OP_NAME, OP_DOMAIN, OP_VERSION = "DynSparseMatMul", "ai.graphcore", 1


def library_path() -> Path:
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent.parent / "popart_ops" / "build" / "libdynsparse.so"


_LIBRARY = None


def load_library() -> ctypes.CDLL:
    """Load the custom-op library once (registers the op with PopART)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    path = library_path()
    if not path.is_file():
        raise IpuUnavailable(f"the popsparse custom ops are not built ({path} is missing): source the Poplar SDK's "
                             f"enable.sh and run `make -C popart_ops`, or set {LIBRARY_ENV}")
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as exc:
        raise IpuUnavailable(f"cannot load {path}: {exc} (built against another SDK? rebuild with make -C popart_ops)") from None
    i64, p64 = ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    pf32, pu16, err = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint16), ctypes.c_char_p
    head = [i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_char_p]
    library.ipu_app_dynsparse_sizes.argtypes = head + [p64, p64, err, i64]
    library.ipu_app_dynsparse_encode.argtypes = head + [p64, p64, pf32, pu16, i64, pf32, i64, err, i64]
    library.ipu_app_dynsparse_decode.argtypes = head + [pu16, i64, pf32, i64, p64, p64, pf32, err, i64]
    for fn in (library.ipu_app_dynsparse_sizes, library.ipu_app_dynsparse_encode, library.ipu_app_dynsparse_decode):
        fn.restype = ctypes.c_int
    _LIBRARY = library
    return library


def options_string(options: dict) -> str:
    """popsparse option flags as the op's ``options`` attribute: ``key=value;key=value``."""
    for key, value in options.items():
        if any(c in f"{key}{value}" for c in ";="):
            raise ValueError(f"option {key}={value} may not contain ';' or '='")
    return ";".join(f"{key}={value}" for key, value in sorted(options.items()))


def op_attributes(pattern: BlockPattern, batch_size: int, options: dict) -> dict:
    """The op's attributes for a layer (all ints but ``options``)."""
    out_features, in_features = pattern.shape
    return {"block_size": pattern.block_size, "input_size": in_features, "output_size": out_features,
            "batch_size": batch_size, "max_non_zero_blocks": pattern.nnz, "options": options_string(options)}


def dynsparse_matmul(poptorch, x, metainfo, nz, attributes: dict):
    """``Y = X · Wᵀ`` by the custom op inside a PopTorch graph (``x``: ``[batch, in]``)."""
    example = x.new_empty((attributes["batch_size"], attributes["output_size"]))
    return poptorch.custom_op([x, metainfo, nz], OP_NAME, OP_DOMAIN, OP_VERSION, example_outputs=[example],
                              attributes=dict(attributes))[0]


class DynSparseHost:
    """Host-side popsparse conversions for one layer shape (needs the built library)."""

    def __init__(self, pattern: BlockPattern, batch_size: int, options: dict, half: bool = True,
                 library: ctypes.CDLL | None = None) -> None:
        check_dynamic_block(pattern.block_size, "float16" if half else "float32")
        self.attributes = op_attributes(pattern, batch_size, options)
        self.half = int(half)
        self.library = library or load_library()
        meta, nz = ctypes.c_int64(), ctypes.c_int64()
        self._call("sizes", ctypes.byref(meta), ctypes.byref(nz))
        self.metainfo_size, self.nz_size = meta.value, nz.value

    def _head(self):
        a = self.attributes
        return (a["block_size"], a["input_size"], a["output_size"], a["batch_size"], a["max_non_zero_blocks"],
                self.half, a["options"].encode())

    def _call(self, name: str, *args) -> None:
        err = ctypes.create_string_buffer(1024)
        status = getattr(self.library, f"ipu_app_dynsparse_{name}")(*self._head(), *args, err, len(err))
        if status != 0:
            raise RuntimeError(f"popsparse {name}: {err.value.decode(errors='replace')}")

    def encode(self, pattern: BlockPattern, values) -> tuple[np.ndarray, np.ndarray]:
        """``(metainfo uint16 [M], nz float32 [N])`` for the pattern and ``[nnz, b, b]`` values."""
        coo = dynamic_coo(pattern, values)
        rows = np.ascontiguousarray(coo.rows, dtype=np.int64)
        cols = np.ascontiguousarray(coo.cols, dtype=np.int64)
        vals = np.ascontiguousarray(coo.values, dtype=np.float32)
        meta = np.zeros(self.metainfo_size, dtype=np.uint16)
        nz = np.zeros(self.nz_size, dtype=np.float32)
        self._call("encode", _ptr(rows, ctypes.c_int64), _ptr(cols, ctypes.c_int64), _ptr(vals, ctypes.c_float),
                   _ptr(meta, ctypes.c_uint16), meta.size, _ptr(nz, ctypes.c_float), nz.size)
        return meta, nz

    def decode(self, metainfo: np.ndarray, nz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(block rows of W, block cols of W, values [nnz, b, b])`` back from device buffers."""
        nnz, b = self.attributes["max_non_zero_blocks"], self.attributes["block_size"]
        meta = np.ascontiguousarray(metainfo, dtype=np.uint16)
        nzv = np.ascontiguousarray(nz, dtype=np.float32)
        rows, cols = np.zeros(nnz, dtype=np.int64), np.zeros(nnz, dtype=np.int64)
        vals = np.zeros(nnz * b * b, dtype=np.float32)
        self._call("decode", _ptr(meta, ctypes.c_uint16), meta.size, _ptr(nzv, ctypes.c_float), nzv.size,
                   _ptr(rows, ctypes.c_int64), _ptr(cols, ctypes.c_int64), _ptr(vals, ctypes.c_float))
        # popsparse's rows/cols index V = Wᵀ in elements; each block of V is Wᵀ's block.
        return cols // b, rows // b, vals.reshape(nnz, b, b).transpose(0, 2, 1).copy()


def _ptr(array: np.ndarray, ctype):
    return array.ctypes.data_as(ctypes.POINTER(ctype))


class PopsparseLayers:
    """Runs every SparseLinear of a model through ``DynSparseMatMul`` inside the IPU graph.

    ``values`` stays the trainable parameter (so the optimizer state, the updater, checkpoints and
    export are unchanged); two buffers per layer carry the pattern to the device in popsparse's form:
    ``popsparse_metainfo`` (the partitioner's uint16 metainfo, as float16 bits) and
    ``popsparse_nz_index`` (int32: for each nz slot, the index of its value in ``values`` flattened,
    or the extra zero slot for bucket padding). In the graph ``nz = [values, 0][nz_index]`` -- a
    gather whose gradient scatters dNz back onto ``values``. After a pattern update :meth:`refresh`
    recomputes both buffers on the host; their shapes never change, so uploading them with
    ``copyNamedBuffersToDevice`` needs no recompilation. Off the IPU (host validation, RigL's host
    pass) a layer runs its ordinary backend op.
    """

    def __init__(self, model, poptorch, tokens: int, options: dict, half: bool, library=None) -> None:
        from ..sparse.layer import sparse_weights

        self.poptorch = poptorch
        self.layers = sparse_weights(model)
        self.hosts = {}  # id(layer) -> its DynSparseHost
        for name, layer in self.layers:
            if layer.frozen is not None:
                raise ValueError(f"{name}: ipu.sparse_op=popsparse needs sparsity.inactive=zero (frozen inactive "
                                 "weights need the dense weight: use ipu.sparse_op=masked)")
            if layer.nnz * layer.block_size ** 2 >= 2 ** 24:
                raise ValueError(f"{name}: {layer.nnz * layer.block_size ** 2} non-zeros are too many to index "
                                 "through float32 (2^24)")
            self.hosts[id(layer)] = DynSparseHost(layer.pattern, tokens, options, half, library)
            metainfo, index = self._encode(layer)
            # Not persistent: derived from the pattern, so checkpoints and exports stay backend-neutral.
            layer.register_buffer("popsparse_metainfo", metainfo, persistent=False)
            layer.register_buffer("popsparse_nz_index", index, persistent=False)
            layer.op_override = self.forward

    def _encode(self, layer) -> tuple:
        import torch

        size = layer.nnz * layer.block_size ** 2
        ids = torch.arange(1, size + 1, dtype=torch.float32).reshape(layer.nnz, layer.block_size, layer.block_size)
        metainfo, nz = self.hosts[id(layer)].encode(layer.pattern, ids)
        index = np.rint(nz).astype(np.int64) - 1
        index[index < 0] = size  # padding reads the appended zero
        return torch.from_numpy(metainfo.view(np.float16).copy()), torch.from_numpy(index.astype(np.int32))

    def stash(self) -> list:
        """The metainfo bits, to put back with :meth:`unstash` after a dtype cast of the whole model
        (``model.float()`` would turn the float16-carried bits into numbers)."""
        return [layer.popsparse_metainfo.clone() for _, layer in self.layers]

    def unstash(self, saved: list) -> None:
        for (_, layer), bits in zip(self.layers, saved):
            layer.popsparse_metainfo = bits

    def refresh(self) -> None:
        """Re-derive every layer's metainfo and nz order from its (updated) pattern, in place."""
        for _, layer in self.layers:
            metainfo, index = self._encode(layer)
            layer.popsparse_metainfo.copy_(metainfo)
            layer.popsparse_nz_index.copy_(index)

    def forward(self, layer, x):
        import torch

        if not self.poptorch.isRunningOnIpu():
            return layer.backend_forward(x)
        flat = torch.cat([layer.values.reshape(-1), layer.values.new_zeros(1)])
        nz = flat.index_select(0, layer.popsparse_nz_index)
        y = dynsparse_matmul(self.poptorch, x.reshape(-1, layer.in_features), layer.popsparse_metainfo, nz,
                             self.hosts[id(layer)].attributes)
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*x.shape[:-1], layer.out_features)


STATIC_OP_NAME = "StaticBsMatMul"


class StaticPopsparseLayers:
    """``ipu.sparse_op: popsparse_static`` (static sparsity only): every SparseLinear runs
    ``StaticBsMatMul`` with its block mask compiled into the graph. ``values`` stay the parameter; the
    graph reorders them into the op's weight layout (blocks of Wᵀ row-major in mask order) with a
    fixed gather and a transpose, so gradients reach ``values`` directly. A pattern change would need
    a new executable, hence static sparsity only."""

    def __init__(self, model, poptorch, tokens: int, dtype: str) -> None:
        import torch

        from ..sparse.layer import sparse_weights
        from .popsparse import static_bsmatmul

        self.poptorch = poptorch
        self.layers = sparse_weights(model)
        self.attributes = {}
        for name, layer in self.layers:
            if layer.frozen is not None:
                raise ValueError(f"{name}: ipu.sparse_op=popsparse_static needs sparsity.inactive=zero")
            op = static_bsmatmul(layer.pattern, layer.values.detach(), tokens, dtype)
            layer.register_buffer("popsparse_static_order", torch.from_numpy(op.order.astype(np.int32)),
                                  persistent=False)
            self.attributes[id(layer)] = op.attributes
            layer.op_override = self.forward

    def forward(self, layer, x):
        if not self.poptorch.isRunningOnIpu():
            return layer.backend_forward(x)
        b = layer.block_size
        w = layer.values.index_select(0, layer.popsparse_static_order).transpose(1, 2).reshape(layer.nnz, b * b)
        x2 = x.reshape(-1, layer.in_features)
        attributes = self.attributes[id(layer)]
        example = x2.new_empty((x2.shape[0], layer.out_features))
        y = self.poptorch.custom_op([x2, w], STATIC_OP_NAME, OP_DOMAIN, OP_VERSION, example_outputs=[example],
                                    attributes=dict(attributes))[0]
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*x.shape[:-1], layer.out_features)
