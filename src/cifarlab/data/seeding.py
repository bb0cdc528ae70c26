"""Seed mixing shared by the synthetic generator and the loader's random streams.

Its own module because both depend on it and neither should depend on the other.
"""

from __future__ import annotations


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finaliser per step: nearby inputs diverge)."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1
