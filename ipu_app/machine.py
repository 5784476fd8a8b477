"""What machine a run trained on: results (losses as well as timings) differ between CPUs, since
``precision: auto``, the kernels and the rounding of reductions follow the CPU, so runs are paired
only within one machine. Importable without torch."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

# The instruction-set extensions that change what this project computes on a CPU (bf16 autocast and
# the kernels' paths), in the order they are named.
ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


@lru_cache(maxsize=1)
def cpu_identity() -> dict:
    """``{"model", "family", "model_number", "isa", "key"}`` of this CPU from ``/proc/cpuinfo``
    (``lscpu``'s source). ``key`` names the machine kind in one string; the model name alone does
    not (an "AMD EPYC" may be a Zen 3 without AVX-512 or a Zen 4 with AVX-512 BF16)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block describes them all
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    isa = [flag for flag in ISA_FLAGS if flag in flags]
    family, number = fields.get("cpu family", "?"), fields.get("model", "?")
    key = f"{model} (family {family} model {number}; {' '.join(isa) or 'no AVX2'})"
    return {"model": model, "family": family, "model_number": number, "isa": isa, "key": key}


def machine_key(device_type: str = "cpu", gpu_name: str | None = None) -> str:
    """The key runs are paired by: the CPU's, or the GPU's name for a GPU run."""
    if device_type == "cuda" and gpu_name:
        return f"GPU {gpu_name}"
    return cpu_identity()["key"]


def cpu_line() -> str:
    """One line naming this CPU for benchmark output."""
    c = cpu_identity()
    return f"CPU: {c['model']} (family {c['family']} model {c['model_number']}), {os.cpu_count()} cores, " \
           f"{' '.join(c['isa']) or 'no AVX2'}"
