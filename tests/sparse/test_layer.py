"""Finding the sparse layers of a model: the members of ``SparseWeight``, looked up as a module offers them."""

import inspect
from pathlib import Path

import torch
from torch import nn

import ipu_app
from ipu_app.model.sparse_linear import SparseLinear
from ipu_app.sparse.layer import SPARSE_WEIGHT_MEMBERS, SparseWeight, offers_sparse_weight, sparse_weights


def test_members_are_the_protocols():
    annotated = set(SparseWeight.__annotations__)
    methods = {n for n, _ in inspect.getmembers(SparseWeight) if not n.startswith("_")}
    assert set(SPARSE_WEIGHT_MEMBERS) == annotated | methods


def test_finds_layers_whose_members_are_parameters_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), SparseLinear(32, 64, block_size=4, sparsity=0.75), nn.ReLU(),
                          SparseLinear(64, 32, block_size=8, sparsity=0.5))
    # values and block_rows are reached through nn.Module.__getattr__ only: a static lookup (what a
    # runtime_checkable isinstance does from Python 3.12) does not see them
    assert inspect.getattr_static(model[1], "values", None) is None
    assert [name for name, _ in sparse_weights(model)] == ["1", "3"]


def test_a_module_missing_a_member_is_not_a_sparse_layer():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            layer = SparseLinear(16, 16, block_size=4, sparsity=0.5)
            self.values = layer.values
            self.register_buffer("block_rows", layer.block_rows)
            self.register_buffer("block_cols", layer.block_cols)
            self.block_size, self.target_sparsity, self.frozen = 4, 0.5, None
            self.record_dense_grad, self.dense_grad = False, None
            # no pattern, nnz, sparsity or pattern_changed
    assert not offers_sparse_weight(Partial())
    assert offers_sparse_weight(SparseLinear(16, 16, block_size=4, sparsity=0.5))


def test_no_runtime_checkable_protocol_in_the_package():
    # isinstance against a runtime_checkable Protocol misses nn.Module members from Python 3.12 on
    # (the GPU image's Python found no sparse layer at all); check members with hasattr instead
    root = Path(ipu_app.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if "@runtime_checkable" in p.read_text()]
    assert offenders == []
