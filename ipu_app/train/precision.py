"""Mixed precision: bf16 autocast where the device supports it, fp16 + loss scaling on GPUs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..config import ConfigError


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype matrix products run in."""
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def grad_scaler(self, loss_scale: float | str):
        """A loss scaler for fp16 (dynamic, or fixed when ``loss_scale`` is a number); None otherwise."""
        if self.name != "fp16":
            return None
        if loss_scale == "dynamic":
            return torch.amp.GradScaler(self.device_type)
        # A fixed scale: never grows, never shrinks (an overflow still skips the step).
        return torch.amp.GradScaler(self.device_type, init_scale=float(loss_scale), growth_factor=1.0,
                                    backoff_factor=1.0)


def cpu_supports_bf16() -> bool:
    """Native bf16 on this CPU (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 on GPUs with bf16 and on CPUs with native bf16, fp16 on older GPUs, else fp32."""
    kind = device.type
    if requested == "auto":
        if kind == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "bf16" if kind == "cpu" and cpu_supports_bf16() else "fp32"
    if requested == "fp16" and kind != "cuda":
        raise ConfigError("training.precision=fp16 needs a GPU; use bf16 or fp32 on a CPU")
    if requested not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"training.precision={requested!r} is not valid; use auto, fp32, bf16 or fp16")
    return Precision(requested, kind)


def resolve_threads(setting: int | None, run_time: int | None = None) -> tuple[int, str]:
    """``(threads, where the number comes from)``: ``run_time`` (``--threads``, which changes no result
    and so also applies on ``--resume``), else ``training.threads``, else ``OMP_NUM_THREADS`` (what
    ``sweep --jobs`` sets for each run), else the cores this process may use."""
    import os

    if run_time:
        return run_time, "--threads"
    if setting:
        return setting, "training.threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    try:
        return len(os.sched_getaffinity(0)), "the cores this process may use"
    except AttributeError:  # not Linux
        return os.cpu_count() or 1, "the cores"

