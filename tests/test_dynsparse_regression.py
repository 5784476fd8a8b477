"""End to end: DynSparse with random regrowth beats static sparsity at the same ratio.

A 2-layer MLP student with 90%-sparse weights learns a teacher whose weights are
sparse at *other* random positions. A static student is stuck with its initial
pattern; DynSparse moves its blocks to where the teacher's weights are.
"""

import pytest
import torch
from torch import nn

from ipu_app.model.sparse_linear import SparseLinear
from ipu_app.sparse.schedule import UpdateSchedule
from ipu_app.sparse.updater import build_updater


def relative_val_error(mode: str, seed: int, steps: int = 600, segments: int = 30) -> float:
    g = torch.Generator().manual_seed(1000 + seed)
    d_in, d_hidden, d_out = 64, 64, 8
    w1 = torch.randn(d_hidden, d_in, generator=g) * (torch.rand(d_hidden, d_in, generator=g) < 0.1)
    w2 = torch.randn(d_out, d_hidden, generator=g) * (torch.rand(d_out, d_hidden, generator=g) < 0.3)

    def teacher(x):
        return torch.relu(x @ w1.t()) @ w2.t()

    x_train, x_val = torch.randn(4096, d_in, generator=g), torch.randn(1024, d_in, generator=g)
    y_train, y_val = teacher(x_train), teacher(x_val)
    gm = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        SparseLinear(d_in, d_hidden, sparsity=0.9, generator=gm, init="glorot"),
        nn.ReLU(),
        SparseLinear(d_hidden, d_out, sparsity=0.9, generator=gm, init="glorot"),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    updater = build_updater(model, optimizer, UpdateSchedule.evenly_spaced(steps, segments), mode=mode,
                             pruning_ratio=0.5, regrowth="random", seed=seed)
    for step in range(1, steps + 1):
        batch = torch.randint(0, x_train.shape[0], (128,), generator=gm)
        loss = (model(x_train[batch]) - y_train[batch]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        updater.step(step)
    assert updater.update_count == (segments - 1 if mode == "dynamic" else 0)
    with torch.no_grad():
        return float((model(x_val) - y_val).pow(2).mean() / y_val.pow(2).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_dynsparse_reaches_lower_loss_than_static(seed):
    static, dynamic = relative_val_error("static", seed), relative_val_error("dynamic", seed)
    assert dynamic < 0.7 * static, (static, dynamic)
