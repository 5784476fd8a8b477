"""SparseLinear: an ``nn.Linear`` replacement whose weight is always stored compressed."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..choices import INACTIVE_MODES
from ..sparse.init import DEFAULT_INIT_STD, init_values_, random_pattern
from ..sparse.layer import sparse_weights
from ..sparse.pattern import BlockPattern, PatternError, nnz_blocks
from ..sparse.scoring import dense_block_norms, largest



class SparseLinear(nn.Module):
    """Block-sparse linear layer with a fixed number of active blocks.

    The only trainable weight tensor is ``values`` (``[nnz, b, b]``); the pattern
    lives in the int32 buffers ``block_rows``/``block_cols``; the bias is dense.
    With ``inactive="frozen"`` the inactive positions keep untrained, non-zero
    values (buffer ``frozen``) instead of being zero (paper Fig. 1).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sparsity: float = 0.9,
        block_size: int = 1,
        backend: str = "reference",
        init: str = "trunc_normal",
        init_std: float = DEFAULT_INIT_STD,
        inactive: str = "zero",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if inactive not in INACTIVE_MODES:
            raise PatternError(f"unknown inactive mode {inactive!r}; use one of {list(INACTIVE_MODES)}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.target_sparsity = float(sparsity)
        self.backend = ops.resolve_backend(backend)
        self.inactive = inactive
        nnz = nnz_blocks(out_features, in_features, block_size, sparsity)
        pattern = random_pattern(out_features, in_features, block_size, sparsity, generator)
        factory = {"device": device, "dtype": dtype}
        self.values = nn.Parameter(torch.empty(nnz, block_size, block_size, **factory))
        init_values_(self.values, init, in_features, out_features, sparsity, init_std, generator)
        self.register_buffer("block_rows", pattern.rows.to(device))
        self.register_buffer("block_cols", pattern.cols.to(device))
        if inactive == "frozen":
            frozen = torch.empty(out_features, in_features, **factory)
            init_values_(frozen, init, in_features, out_features, sparsity, init_std, generator)
            self.register_buffer("frozen", frozen.masked_fill_(pattern.mask().to(frozen.device), 0))
        else:
            self.frozen = None
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        # Counts pattern changes so backends can cache per-pattern metadata.
        self.pattern_version = 0
        # RigL: when set, backward accumulates the dense weight gradient here (fp32).
        self.record_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        # An accelerator's own op for this layer, ``fn(layer, x) -> y`` (the IPU popsparse op); it
        # falls back to the backend op itself where it cannot run (e.g. on the host).
        self.op_override = None
        # backend auto: what measuring chose for this layer's kind (ops.tune_layers: "reference" or
        # "cpu/<path>"); None: chosen per call (ops.choose)
        self.kernels: str | None = None

    # --------------------------------------------------------------- pattern
    @property
    def pattern(self) -> BlockPattern:
        """The pattern, sharing this module's buffers."""
        return BlockPattern(self.out_features, self.in_features, self.block_size, self.block_rows, self.block_cols)

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    @property
    def sparsity(self) -> float:
        """Actual fraction of inactive weights."""
        return self.pattern.sparsity

    def mask(self) -> torch.Tensor:
        return self.pattern.mask()

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``[out, in]`` (frozen values included), detached."""
        with torch.no_grad():
            return ops.reference.dense_weight(self.values, self.pattern, self.frozen)

    def pattern_changed(self) -> None:
        """Called after the pattern buffers were rewritten in place."""
        self.pattern_version += 1

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op_override is not None:
            return self.op_override(self, x)
        return self.backend_forward(x)

    def backend_forward(self, x: torch.Tensor) -> torch.Tensor:
        op = ops.linear_for(self.kernels) if self.kernels and self.backend == "auto" else ops.get_backend(self.backend)
        if self.frozen is not None:
            y = op(x, self.values, self.pattern, self.bias, frozen=self.frozen)
        else:
            y = op(x, self.values, self.pattern, self.bias)
        if self.record_dense_grad and y.requires_grad:
            inputs = x.detach()
            y.register_hook(lambda grad_y: self._accumulate_dense_grad(grad_y, inputs))
        return y

    def _accumulate_dense_grad(self, grad_y: torch.Tensor, x: torch.Tensor) -> None:
        g = grad_y.reshape(-1, self.out_features).float().t() @ x.reshape(-1, self.in_features).float()
        self.dense_grad = g if self.dense_grad is None else self.dense_grad.add_(g)

    # ---------------------------------------------------------- conversions
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        sparsity: float = 0.9,
        block_size: int = 1,
        selection: str = "random",
        inactive: str = "zero",
        backend: str = "reference",
        generator: torch.Generator | None = None,
    ) -> "SparseLinear":
        """Sparsify a dense layer, keeping its weights at the active positions.

        ``selection`` picks the active blocks: ``random`` or ``magnitude`` (largest
        L1 block norm). With ``inactive="frozen"`` the other weights are kept,
        untrained, in the ``frozen`` buffer (freezing a random subset, Fig. 1b).
        """
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            sparsity=sparsity,
            block_size=block_size,
            backend=backend,
            inactive=inactive,
            generator=generator,
            device=weight.device,
            dtype=weight.dtype,
        )
        if selection == "magnitude":
            scores = dense_block_norms(weight, block_size, "l1")
            keep = largest(scores, layer.nnz)
            pattern = BlockPattern.from_linear_index(linear.out_features, linear.in_features, block_size, keep)
            layer.block_rows.copy_(pattern.rows)
            layer.block_cols.copy_(pattern.cols)
        elif selection != "random":
            raise PatternError(f"unknown selection {selection!r}; use 'random' or 'magnitude'")
        with torch.no_grad():
            layer.values.copy_(layer.pattern.gather(weight))
            if layer.frozen is not None:
                layer.frozen.copy_(weight.masked_fill(layer.mask(), 0))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with this layer's weights (frozen ones included): unfreezing."""
        weight = self.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear

    # ------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "block_rows" in state_dict:
            try:
                self.pattern.validate(expected_nnz=self.nnz)
            except PatternError as exc:
                error_msgs.append(f"{prefix[:-1] or 'SparseLinear'}: invalid sparsity pattern in state dict: {exc}")
            self.pattern_changed()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, sparsity={self.sparsity:.4f}, nnz_blocks={self.nnz}, "
            f"backend={self.backend}, inactive={self.inactive}"
        )



def sparsify_(
    model: nn.Module,
    include,
    *,
    sparsity: float,
    block_size: int = 1,
    seed: int = 0,
    selection: str = "random",
    inactive: str = "zero",
    backend: str = "reference",
) -> list[str]:
    """Replace in place every ``nn.Linear`` for which ``include(name, module)`` is true.

    Layer ``i`` (in module order) gets its own random pattern from generator
    ``(seed, i)``, all with the same sparsity. Returns the replaced names.
    """
    from ..seeding import seeded_generator

    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and include(n, m)]
    for index, (name, linear) in enumerate(targets):
        layer = SparseLinear.from_linear(
            linear, sparsity=sparsity, block_size=block_size, selection=selection,
            inactive=inactive, backend=backend, generator=seeded_generator(seed, index),
        )
        _set_submodule(model, name, layer)
    return [n for n, _ in targets]


def densify_(model: nn.Module) -> list[str]:
    """Replace every SparseLinear by its dense ``nn.Linear`` (e.g. to unfreeze a frozen subset)."""
    names = [n for n, _ in sparse_weights(model)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_linear())
    return names


def dense_copy(model: nn.Module) -> nn.Module:
    """A dense fp32 copy on the CPU of ``model``, its SparseLinear layers made ``nn.Linear`` (for export)."""
    import copy

    dense = copy.deepcopy(model).cpu().float()
    densify_(dense)
    return dense


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
