"""Named sums of losses and counts, kept where the model runs until they are read.

Training adds a micro-batch's MLM loss, NSP loss and correct predictions to a running sum without a
host sync, and reads the sums once per log interval; validation sums token- and sequence-weighted
losses over its batches. A position in a tensor is not a name: ``Sums`` stores its values in one
float64 tensor (one add per micro-batch, one transfer per read) but is written and read by field
name only, so a reader cannot take one field for another.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

# What one forward pass contributes to the training sums (``output_sums``).
TRAIN_FIELDS = ("mlm_loss", "nsp_loss", "mlm_correct")


class Sums:
    """Float64 sums of the named ``fields`` on ``device``."""

    def __init__(self, fields: Iterable[str], device: torch.device | str = "cpu",
                 values: torch.Tensor | None = None) -> None:
        self.fields = tuple(fields)
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"repeated field in {self.fields}")
        self.values = (torch.zeros(len(self.fields), dtype=torch.float64, device=device) if values is None
                       else values.to(torch.float64))
        if self.values.shape != (len(self.fields),):
            raise ValueError(f"{len(self.fields)} fields {self.fields} but values of shape {tuple(self.values.shape)}")

    def add(self, **values) -> "Sums":
        """Add one value to every field (all of them, by name; tensors stay on their device)."""
        if set(values) != set(self.fields):
            raise KeyError(f"Sums.add takes exactly the fields {self.fields}, got {tuple(values)}")
        device = self.values.device
        self.values += torch.stack([torch.as_tensor(values[f], device=device).to(torch.float64).reshape(())
                                    for f in self.fields])
        return self

    def __iadd__(self, other: "Sums") -> "Sums":
        if other.fields != self.fields:
            raise KeyError(f"cannot add sums of {other.fields} to sums of {self.fields}")
        self.values += other.values.to(self.values.device)
        return self

    def clone(self) -> "Sums":
        return Sums(self.fields, values=self.values.clone())

    def to(self, device: torch.device | str) -> "Sums":
        """These sums on ``device`` (a restored checkpoint's sums go to where the model runs)."""
        return Sums(self.fields, values=self.values.to(device))

    def read(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, **host: float) -> dict[str, float]:
        """Every field as a float, with ``host`` values (counts kept on the host) appended, in one
        transfer; ``reduce`` (e.g. an all-reduce over ranks) applies to all of them together."""
        clash = set(host) & set(self.fields)
        if clash:
            raise KeyError(f"host value {sorted(clash)[0]!r} is also a summed field")
        values = self.values
        if host:
            extra = torch.tensor([float(v) for v in host.values()], dtype=torch.float64, device=values.device)
            values = torch.cat([values, extra])
        if reduce is not None:
            values = reduce(values)
        return dict(zip(self.fields + tuple(host), values.tolist()))

    def state_dict(self) -> dict[str, float]:
        return dict(zip(self.fields, self.values.tolist()))

    @classmethod
    def from_state(cls, state: dict | list, fields: Iterable[str] = TRAIN_FIELDS) -> "Sums":
        """From ``state_dict``; a list is a checkpoint of an older version, whose training sums were
        ``[mlm loss, nsp loss, correct]`` in that order."""
        fields = tuple(fields)
        if isinstance(state, (list, tuple)):
            if fields != TRAIN_FIELDS or len(state) != len(fields):
                raise ValueError(f"positional sums {state!r} are not training sums")
            state = dict(zip(fields, state))
        if set(state) != set(fields):
            raise ValueError(f"sums with fields {sorted(state)}, expected {sorted(fields)}")
        return cls(fields, values=torch.tensor([float(state[f]) for f in fields], dtype=torch.float64))


def output_sums(out) -> dict[str, torch.Tensor]:
    """What a forward pass (``PretrainingOutput``) adds to the training sums, by name, on its device:
    its MLM loss (mean over masked tokens), NSP loss (mean over sequences; 0 without NSP) and the
    number of masked tokens predicted exactly."""
    mlm = out.mlm_loss.detach()
    nsp = out.nsp_loss.detach() if out.nsp_loss is not None else torch.zeros_like(mlm)
    return {"mlm_loss": mlm, "nsp_loss": nsp, "mlm_correct": torch.as_tensor(out.mlm_correct, device=mlm.device)}
