"""The phase boundary on IPUs: pull state to the host, run the shared PatternUpdater, push it back.

Between two executor calls the trainer, on an update step,

1. ``executor.copyWeightsToHost()`` -- values (and every other weight) on the host model;
2. ``optimizer.state_dict()`` -- PopTorch reads the optimizer state from the device; the moments of
   a parameter ``NAME`` are the PopART tensors ``Accl1___NAME`` and ``Accl2___NAME`` (Adam, AdamW,
   LAMB) under ``"ipu_state"``;
3. runs the same :class:`~ipu_app.sparse.updater.PatternUpdater` as every backend on the host model,
   with the moments handed to it as that parameter's optimizer state: freed slots take the new
   coordinates, values and moments there become zero, everything is re-sorted in place;
4. ``optimizer.load_state_dict(...)`` -- marks the edited moments (and the weights) to be written to
   the device before the next call;
5. ``executor.copyNamedBuffersToDevice()`` -- uploads the pattern buffers (``block_rows``,
   ``block_cols``, ``frozen`` for untrained inactive weights, the popsparse metainfo and nz order
   when the custom op runs the layers), declared updatable with
   ``Options.updatableNamedBuffers`` when the executor was built.

Every tensor keeps its shape, so nothing is recompiled; a shape change would be a bug and stops the
run. RigL's dense gradient is computed on the host from one batch (``rigl_batch``) just before the
update: the compiled graph does not record it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..sparse.layer import sparse_weights
from ..sparse.updater import PatternUpdater, UpdateStats

MOMENT_PREFIXES = ("Accl1___", "Accl2___")  # PopART names of the first and second moments
PATTERN_BUFFERS = ("block_rows", "block_cols", "frozen", "popsparse_metainfo", "popsparse_nz_index")


class IpuStateError(RuntimeError):
    """The device state read back does not look like this model's; one actionable line."""


def pattern_buffer_names(model: nn.Module, prefix: str = "") -> list[str]:
    """The ``named_buffers()`` names a pattern update rewrites (for ``updatableNamedBuffers``);
    ``prefix`` is the model's name inside the module the executor wraps (e.g. ``model.``)."""
    names = []
    for layer_name, layer in sparse_weights(model):
        for buffer in PATTERN_BUFFERS:
            if getattr(layer, buffer, None) is not None:
                names.append(f"{prefix}{layer_name}.{buffer}")
    return names


class _HostOptimizerView:
    """What PatternUpdater reads of an optimizer: ``state[param]`` -> tensors shaped like it."""

    def __init__(self, state: dict) -> None:
        self.state = state


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}


class IpuPatternSync:
    """Runs scheduled pattern updates of a PopTorch training executor between its calls."""

    def __init__(self, executor, optimizer, updater: PatternUpdater, model: nn.Module,
                 dense_gradient: Callable[[nn.Module, int], None] | None = None, prefix: str = "",
                 on_pattern_change: Callable[[], None] | None = None) -> None:
        self.executor = executor
        self.optimizer = optimizer  # a poptorch.optim optimizer
        self.updater = updater
        self.model = model
        self.dense_gradient = dense_gradient  # RigL: runs a host forward/backward recording dense grads
        self.prefix = prefix  # the model's name inside the executor's module: PopART names carry it
        self.buffer_names = pattern_buffer_names(model, prefix)
        self.on_pattern_change = on_pattern_change  # e.g. re-derive popsparse metainfo from the new patterns

    def moment_keys(self, ipu_state: dict) -> dict[str, list[str]]:
        """Per sparse layer, the PopART names of its values' moments present in ``ipu_state``."""
        keys = {}
        for name, _ in sparse_weights(self.model):
            wanted = [f"{moment}{self.prefix}{name}.values" for moment in MOMENT_PREFIXES]
            found = [k for k in wanted if k in ipu_state]
            if not found:
                sample = ", ".join(sorted(ipu_state)[:3]) or "nothing"
                raise IpuStateError(f"the optimizer state read from the IPU has no moments for {self.prefix}{name}.values "
                                    f"(expected {wanted[0]}; it holds {sample}, ...); use poptorch.optim.AdamW")
            keys[name] = found
        return keys

    @torch.no_grad()
    def _edit(self, step: int, ipu_state: dict) -> UpdateStats:
        keys = self.moment_keys(ipu_state)
        view = {}
        for name, layer in sparse_weights(self.model):
            moments = {k: ipu_state[k] for k in keys[name]}
            for key, tensor in moments.items():
                if tuple(tensor.shape) != tuple(layer.values.shape):
                    raise IpuStateError(f"{key} has shape {tuple(tensor.shape)}, {name}.values "
                                        f"{tuple(layer.values.shape)}: the device state is not this model's")
            view[layer.values] = moments
        previous, self.updater.optimizer = self.updater.optimizer, _HostOptimizerView(view)
        try:
            return self.updater.update(step)
        finally:
            self.updater.optimizer = previous

    def step(self, step: int) -> UpdateStats | None:
        """After executor call ``step``: the scheduled update, if any, with the uploads it needs."""
        if not self.updater.is_update_step(step):
            return None
        self.executor.copyWeightsToHost()
        if self.updater.regrowth.needs_dense_grad:
            if self.dense_gradient is None:
                raise IpuStateError("RigL regrowth on IPUs needs a host dense-gradient pass (dense_gradient)")
            self.updater.begin_step(step)
            with torch.enable_grad():
                self.dense_gradient(self.model, step)
            self.model.zero_grad(set_to_none=True)  # the host model's own gradients are not used
        before = _shapes(self.model)
        state = self.optimizer.state_dict()
        if "ipu_state" not in state:
            raise IpuStateError("optimizer.state_dict() has no 'ipu_state': is the optimizer a poptorch.optim one "
                                "attached to a compiled training model?")
        stats = self._edit(step, state["ipu_state"])  # moments are edited in place inside ``state``
        if self.on_pattern_change is not None:
            self.on_pattern_change()
        after = _shapes(self.model)
        changed = [n for n in before if before[n] != after.get(n)]
        if changed:
            raise IpuStateError(f"a pattern update changed the shape of {changed[0]}: the IPU graph would have to "
                                "be recompiled (a bug)")
        self.optimizer.load_state_dict(state)  # written to the device, with the weights, before the next call
        self.executor.copyNamedBuffersToDevice()
        return stats
