"""The four CPU kinds a machine of ours may be, simulated: tests whose expectations follow the CPU
(``precision: auto``, the kernels' paths, ``auto``'s limits) run for each kind, whatever the host
is, and for the host itself."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class CpuKind:
    name: str
    amx: bool          # AMX-BF16 tiles
    avx512: bool       # AVX-512F
    native_bf16: bool  # AVX-512 BF16 dot products
    pairs: bool | None = None  # the AVX-512 BF16 kernels run (None: wherever native_bf16 without AMX)

    @property
    def bf16_tiles(self) -> bool:
        """bf16 at b = 16 runs the AVX-512 BF16 tiles (pair dot products), at b = 4 and 8 the token panels."""
        return self.native_bf16 and not self.amx if self.pairs is None else self.pairs

    @property
    def bf16(self) -> bool:
        """``precision: auto`` picks bf16 (native bf16 of either kind)."""
        return self.amx or self.native_bf16


KINDS = {k.name: k for k in (
    CpuKind("sapphire_rapids", amx=True, avx512=True, native_bf16=True),
    CpuKind("zen4", amx=False, avx512=True, native_bf16=True),
    CpuKind("zen3", amx=False, avx512=False, native_bf16=False),
    CpuKind("icelake", amx=False, avx512=True, native_bf16=False),
)}


def host_kind() -> CpuKind:
    """What the host is, as the kernels read it."""
    from ipu_app.ops import cpu

    cpu.available()
    return CpuKind("host", amx=cpu._amx, avx512=cpu._avx512, native_bf16=cpu._native_bf16, pairs=cpu._bf16_pairs)


def simulate(monkeypatch: pytest.MonkeyPatch, kind: CpuKind) -> CpuKind:
    """Make the kernels' choices and ``precision: auto`` see ``kind``'s flags (the kernels loaded first,
    since loading reads the host's). A simulated kind changes choices, not the host's instructions: a
    test that also calls kernels a kind has and the host may lack loads the portable build (as
    test_portable_c_loops_match_reference does)."""
    from ipu_app.ops import cpu
    from ipu_app.train import precision

    if not cpu.available():
        pytest.skip("the CPU kernels do not build here")
    monkeypatch.setattr(cpu, "_amx", kind.amx)
    monkeypatch.setattr(cpu, "_avx512", kind.avx512)
    monkeypatch.setattr(cpu, "_native_bf16", kind.native_bf16)
    monkeypatch.setattr(cpu, "_bf16_pairs", kind.bf16_tiles)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: kind.bf16)
    return kind
