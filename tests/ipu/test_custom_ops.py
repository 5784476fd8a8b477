import numpy as np
import pytest
import torch

from ipu_app.ipu import IpuUnavailable, custom_ops
from ipu_app.ipu.custom_ops import DynSparseHost, dynsparse_matmul, load_library, op_attributes, options_string
from ipu_app.sparse.init import random_pattern

from .fake_library import FakeLibrary
from .recorder import Recorder, calls


@pytest.mark.parametrize("block", [4, 16])
def test_host_round_trip_through_the_library_interface(block):
    pattern = random_pattern(64, 128, block, 0.75, generator=torch.Generator().manual_seed(block))
    values = torch.randn(pattern.nnz, block, block)
    host = DynSparseHost(pattern, 256, {"availableMemoryProportion": 0.9}, library=FakeLibrary())
    assert (host.metainfo_size, host.nz_size) == (2 * pattern.nnz + 3, pattern.nnz * block * block + 5)
    meta, nz = host.encode(pattern, values)
    assert meta.dtype == np.uint16 and nz.dtype == np.float32 and nz.size == host.nz_size
    rows, cols, back = host.decode(meta, nz)
    order = np.lexsort((cols, rows))  # back to our row-major slot order
    np.testing.assert_array_equal(rows[order], pattern.rows.numpy())
    np.testing.assert_array_equal(cols[order], pattern.cols.numpy())
    np.testing.assert_array_equal(back[order], values.numpy())


def test_library_errors_are_one_line(monkeypatch, tmp_path):
    pattern = random_pattern(64, 64, 4, 0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="popsparse sizes: Overflow in buckets"):
        DynSparseHost(pattern, 32, {}, library=FakeLibrary(fail="Overflow in buckets"))
    monkeypatch.setattr(custom_ops, "_LIBRARY", None)
    monkeypatch.setenv("IPU_APP_POPART_OPS", str(tmp_path / "missing.so"))
    with pytest.raises(IpuUnavailable, match="make -C popart_ops") as info:
        load_library()
    assert "\n" not in str(info.value)
    (tmp_path / "bad.so").write_bytes(b"not a library")
    monkeypatch.setenv("IPU_APP_POPART_OPS", str(tmp_path / "bad.so"))
    with pytest.raises(IpuUnavailable, match="cannot load"):
        load_library()


def test_op_is_inserted_with_poptorch_custom_op():
    pattern = random_pattern(64, 128, 16, 0.9, generator=torch.Generator().manual_seed(0))
    attributes = op_attributes(pattern, 512, {"partialsType": "float", "availableMemoryProportion": 0.9})
    assert attributes == {"block_size": 16, "input_size": 128, "output_size": 64, "batch_size": 512,
                          "max_non_zero_blocks": pattern.nnz,
                          "options": "availableMemoryProportion=0.9;partialsType=float"}
    log = []
    poptorch = Recorder(log, "poptorch", returns={"poptorch.custom_op": lambda *a, **k: ["y"]})
    x = torch.zeros(512, 128)
    assert dynsparse_matmul(poptorch, x, "meta", "nz", attributes) == "y"
    (args, kwargs), = calls(log, "poptorch.custom_op")
    assert args[1:] == ("DynSparseMatMul", "ai.graphcore", 1) and args[0][1:] == ["meta", "nz"]
    assert kwargs["example_outputs"][0].shape == (512, 64) and kwargs["attributes"] == attributes
    with pytest.raises(ValueError, match="may not contain"):
        options_string({"a": "b;c"})
