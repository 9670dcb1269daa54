"""Integer arithmetic shared by lowering and the reference interpreter (the Python copy;
the C copy is the requantization helper in `templates/`).

requantize(v, m, s) = round_half_to_even(v · m / 2^(31 − s)), 64-bit products, with the
real multiplier M = m · 2^(s − 31), m in [2^30, 2^31) (m = 0 for M = 0).
"""
from __future__ import annotations

import math

import numpy as np


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(m, s) with real = m · 2^(s − 31), m an int32 in [2^30, 2^31); (0, 0) for real == 0."""
    if real == 0.0:
        return 0, 0
    if real < 0:
        raise ValueError(f"requantization multiplier must be non-negative, got {real}")
    frac, exp = math.frexp(real)            # real = frac · 2^exp, frac in [0.5, 1)
    m = round(frac * (1 << 31))
    if m == 1 << 31:
        m //= 2
        exp += 1
    if 31 - exp > 62:                        # underflows to zero at 64-bit precision
        return 0, 0
    return int(m), int(exp)


def requantize(v: np.ndarray, m, s) -> np.ndarray:
    """round_half_to_even(v · m / 2^(31 − s)) elementwise, in int64 (m, s scalars or broadcastable arrays)."""
    v = np.asarray(v, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    n = 31 - np.asarray(s, dtype=np.int64)
    left = np.where(n < 0, -n, 0)
    n = np.where(n < 0, 0, n)
    prod = (v << left) * m
    q = prod >> n
    rem = prod - (q << n)
    half = np.where(n > 0, np.int64(1) << np.maximum(n - 1, 0), 0)
    up = (n > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
    return q + up.astype(np.int64)


def is_power_of_two(m: int) -> bool:
    """True when a multiplier m (as from `quantize_multiplier`) stands for a power of two (or zero):
    requantizing by it is a shift, exact on a float32 sum of dequantized values."""
    return int(m) in (0, 1 << 30)
