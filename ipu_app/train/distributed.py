"""Multi-process training with ``torchrun``: process context, collectives, pattern consistency.

``torchrun --nproc_per_node N run_pretraining.py --config ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; ``DistContext.from_env`` reads them and ``init`` joins the
process group (gloo on CPU, NCCL on GPU) with a timeout, so a dead peer fails a collective
instead of hanging forever. With one process everything here is a no-op.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class PatternMismatchError(RuntimeError):
    """Ranks disagree on a sparsity pattern (a bug or a corrupted process: never continue)."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistContext":
        """The context ``torchrun`` describes in the environment (one process when unset)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise ValueError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
        return torch.device("cpu")

    # ----------------------------------------------------------------- lifecycle
    def init(self, timeout_s: float) -> None:
        if not self.enabled or dist.is_initialized():
            return
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s))

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # --------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the tensor moves to the process group's device and back)."""
        if self.enabled:
            device = tensor.device
            work = tensor.to(self._collective_device())
            dist.all_reduce(work, op=dist.ReduceOp.SUM)
            if work is not tensor:
                tensor.copy_(work.to(device))
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor).div_(self.world_size) if self.enabled else tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. a stop request)."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def pattern_digests(layers) -> list[str]:
    """One hash per SparseLinear of its block coordinates (``[(name, module)]`` as sparse_weights gives)."""
    digests = []
    for _, module in layers:
        h = hashlib.sha256()
        for buffer in (module.block_rows, module.block_cols):
            h.update(buffer.detach().cpu().contiguous().numpy().tobytes())
        digests.append(h.hexdigest())
    return digests


def check_patterns_consistent(ctx: DistContext, layers, step: int) -> None:
    """Compare every layer's pattern hash across ranks; a mismatch is a hard error naming the first layer."""
    if not ctx.enabled:
        return
    mine = pattern_digests(layers)
    everyone = ctx.all_gather_object(mine)
    for index, (name, _) in enumerate(layers):
        ranks = [r for r, digests in enumerate(everyone) if digests[index] != everyone[0][index]]
        if ranks:
            raise PatternMismatchError(
                f"sparsity pattern of {name} differs between rank 0 and rank {ranks[0]} after step {step}; "
                "the ranks no longer train the same model"
            )
