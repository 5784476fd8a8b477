"""Exploration: which blocks of each sparse layer have ever been active (the explored degrees of
freedom, paper Fig. 5), what the last update grew, and the run's ``explored.safetensors`` file."""

from __future__ import annotations

import numpy as np
import torch

from .errors import UpdaterError
from .layer import SparseWeight


class ExplorationError(UpdaterError):
    """Saved exploration state or an explored-map file does not fit (one line)."""


class Exploration:
    """The ever-active union per layer and the blocks grown at the last update, in layer order."""

    def __init__(self, layers: list[tuple[str, SparseWeight]]) -> None:
        self.layers = layers
        self._explored = [m.pattern.block_mask().flatten().cpu() for _, m in layers]
        self._last_grown = [torch.empty(0, dtype=torch.long) for _ in layers]

    def record(self, index: int, dropped: torch.Tensor, grown: torch.Tensor, after_first: bool) -> tuple[float, float, float]:
        """Layer ``index`` pruned ``dropped`` and grew ``grown`` (block positions, CPU). Returns its
        explored DOF, the fraction of the pruned blocks grown at the previous update (NaN: none pruned,
        or no previous update) and the fraction of the previous update's grown blocks pruned again
        (NaN: none grown before)."""
        num_blocks = self._explored[index].numel()
        last = self._last_grown[index]
        recent = (float(members(dropped, last, num_blocks).float().mean())
                  if dropped.numel() and after_first else float("nan"))
        again = float(members(last, dropped, num_blocks).float().mean()) if last.numel() else float("nan")
        self._explored[index][grown] = True
        self._last_grown[index] = grown
        return float(self._explored[index].float().mean()), recent, again

    def last_grown(self, index: int) -> torch.Tensor:
        return self._last_grown[index]

    def explored_dof(self) -> dict[str, float]:
        """Per layer: fraction of the dense weight that has ever been active."""
        return {name: float(e.float().mean()) for (name, _), e in zip(self.layers, self._explored)}

    def mean_explored_dof(self) -> float:
        return float(np.mean(list(self.explored_dof().values())))

    def explored_mask(self, name: str) -> torch.Tensor:
        """Boolean ``[out/b, in/b]`` map of the blocks of layer ``name`` ever active."""
        for (n, layer), explored in zip(self.layers, self._explored):
            if n == name:
                return explored.reshape(layer.pattern.grid).clone()
        raise KeyError(f"no sparse layer named {name!r}")

    # ----------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """Per layer: the union (bit-packed) and the last grown blocks, for exact resume."""
        return {
            name: {"explored": torch.from_numpy(np.packbits(e.numpy())), "num_blocks": int(e.numel()),
                   "last_grown": g.clone()}
            for (name, _), e, g in zip(self.layers, self._explored, self._last_grown)
        }

    def load_state_dict(self, saved: dict) -> None:
        names = [n for n, _ in self.layers]
        if sorted(saved) != sorted(names):
            missing = sorted(set(names) - set(saved)) or sorted(set(saved) - set(names))
            raise ExplorationError(f"updater state does not match the model's sparse layers "
                                   f"(first difference: {missing[0]})")
        explored, last = [], []
        for name, e in zip(names, self._explored):
            entry = saved[name]
            if int(entry["num_blocks"]) != e.numel():
                raise ExplorationError(f"updater state for {name} has {entry['num_blocks']} blocks, "
                                       f"the layer {e.numel()}")
            bits = np.unpackbits(entry["explored"].numpy(), count=e.numel()).astype(bool)
            explored.append(torch.from_numpy(bits))
            last.append(entry["last_grown"].clone().long())
        self._explored, self._last_grown = explored, last

    # ------------------------------------------------------------- the file
    def save(self, path) -> None:
        """Every layer's ever-active block map (``uint8 [out/b, in/b]``, 1 = active at some point) to a
        safetensors file, atomically; the block size is in the metadata."""
        from safetensors.numpy import save

        from ..io import atomic_write_bytes

        tensors, block_sizes = {}, set()
        for name, layer in self.layers:
            tensors[name] = self.explored_mask(name).numpy().astype(np.uint8)
            block_sizes.add(layer.pattern.block_size)
        metadata = {"format": "ipu_app.explored/1", "block_size": ",".join(str(b) for b in sorted(block_sizes))}
        atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_explored(path) -> tuple[dict[str, np.ndarray], int]:
    """``({layer name: bool block map}, block size)`` from a file written by :meth:`Exploration.save`."""
    from safetensors import SafetensorError, safe_open

    from ..io import first_line

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            maps = {name: f.get_tensor(name).astype(bool) for name in f.keys()}
    except (OSError, ValueError, SafetensorError) as exc:  # missing, empty, truncated or not safetensors
        raise ExplorationError(f"cannot read {path}: {first_line(exc)}") from None
    try:
        block_size = int(metadata.get("block_size", "1").split(",")[0])
    except ValueError:
        raise ExplorationError(f"{path}: bad block_size metadata {metadata.get('block_size')!r}") from None
    return maps, block_size


def members(positions: torch.Tensor, subset: torch.Tensor, size: int) -> torch.Tensor:
    """``positions in subset`` for block positions in ``[0, size)``, via a lookup table (O(k), unlike isin)."""
    table = torch.zeros(size, dtype=torch.bool, device=positions.device)
    table[subset.to(positions.device)] = True
    return table[positions]
