"""Seeds derived from integer keys: the one seeding rule of patterns, initialisation and data order.

Neutral ground for ``sparse/`` and ``data/`` (neither knows the other); importing it needs no torch.
"""

from __future__ import annotations

import hashlib
import struct


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys, identical on every process and platform."""
    data = struct.pack(f"<{len(keys)}q", *[int(k) for k in keys])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)


def seeded_generator(*keys: int):
    """A CPU ``torch.Generator`` seeded from integer keys, e.g. ``(seed, update_index, layer_index)``."""
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(*keys))
    return generator
