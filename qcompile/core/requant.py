"""Integer arithmetic shared by lowering and the reference interpreter (the Python copy;
the C copy is the requantization helper in `templates/`).

requantize(v, m, s) = round_half_to_even(v · m / 2^n), n = 31 − s, with the real multiplier
M = m · 2^(s − 31), m in [2^30, 2^31) (m = 0 for M = 0) and 0 <= n <= MAX_RIGHT_SHIFT. It is
exact for every int64 v: |v · m| < 2^63 · 2^31 = 2^94, so a 128-bit product always holds it, and
products below 2^62 with shifts up to 62 (`fits_int64`) may use 64-bit arithmetic. The right shift reaches 94 so a
tiny multiplier on a wide accumulator (16-bit operands, 8-bit output) keeps its 31 bits; a
multiplier below 2^-95 is 0, which is exact: |v · M| < 2^63 · 2^-95 < 1/2 rounds to 0 for every
int64 v.
"""
from __future__ import annotations

import math

import numpy as np

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
MAX_RIGHT_SHIFT = 94        # n = 31 − s; 2^94 > |v · m| for every int64 v and int32 m


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(m, s) with real = m · 2^(s − 31), m an int32 in [2^30, 2^31), 31 − s <= MAX_RIGHT_SHIFT;
    (0, 0) for real == 0 or real < 2^-95 (exact, see the module docstring)."""
    if real == 0.0:
        return 0, 0
    if real < 0:
        raise ValueError(f"requantization multiplier must be non-negative, got {real}")
    frac, exp = math.frexp(real)            # real = frac · 2^exp, frac in [0.5, 1)
    m = round(frac * (1 << 31))
    if m == 1 << 31:
        m //= 2
        exp += 1
    if 31 - exp > MAX_RIGHT_SHIFT:
        return 0, 0
    if 31 - exp < 0:
        raise ValueError(f"requantization multiplier {real:g} >= 2^31: no int32 fixed-point form")
    return int(m), int(exp)


def product_bound(bound: int, m) -> int:
    """max |v · m| over |v| <= bound (m a scalar or an array; exact Python int)."""
    return int(bound) * int(np.max(np.abs(np.asarray(m, dtype=np.int64)), initial=0))


def requantized_bound(bound: int, m, s) -> int:
    """A bound on |requantize(v, m, s)| over |v| <= bound: floor(bound · m / 2^(31 − s)) + 1."""
    return (product_bound(bound, m) >> int(np.min(31 - np.asarray(s, dtype=np.int64), initial=94))) + 1


def fits_int64(bound: int, m, s) -> bool:
    """True when requantize(v, m, s) for every |v| <= bound is exact in 64-bit arithmetic: the
    product v · m below 2^62 (room for the rounding offset) and the right shift 31 − s <= 62;
    else it needs the 128-bit form."""
    return product_bound(bound, m) < 2 ** 62 and int(np.max(31 - np.asarray(s, dtype=np.int64), initial=0)) <= 62


def requantize(v: np.ndarray, m, s) -> np.ndarray:
    """round_half_to_even(v · m / 2^(31 − s)) elementwise for int64 v (m, s scalars or broadcastable
    arrays), exact: in int64 when every product stays below 2^62 and n <= 62, else in Python integers."""
    v = np.asarray(v, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    n = 31 - np.asarray(s, dtype=np.int64)
    if int(n.min(initial=0)) < 0 or int(n.max(initial=0)) > MAX_RIGHT_SHIFT:
        raise ValueError(f"requantization shift outside 31 − s in 0..{MAX_RIGHT_SHIFT}")
    if int(n.max(initial=0)) > 62 or not fits_int64(int(np.abs(v).max(initial=0)), m, s):
        return _requantize_exact(v, m, n)
    prod = v * m
    q = prod >> n
    rem = prod - (q << n)
    half = np.where(n > 0, np.int64(1) << np.maximum(n - 1, 0), 0)
    up = (n > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
    return q + up.astype(np.int64)


def _requantize_exact(v, m, n) -> np.ndarray:
    """The 128-bit case in Python integers (object arrays): the oracle for wide accumulators. A result
    beyond int64 (M > 1 on a huge v) is held at the int64 limit: every caller clamps it to a code
    range of at most 16 bits next, which the held value reaches as well (requantization is monotone)."""
    v, m, n = np.broadcast_arrays(v.astype(object), m.astype(object), n.astype(object))
    out = np.empty(v.shape, dtype=np.int64)
    flat = out.reshape(-1)
    for i, (vi, mi, ni) in enumerate(zip(v.reshape(-1), m.reshape(-1), n.reshape(-1))):
        p = int(vi) * int(mi)
        q, rem = divmod(p, 1 << int(ni))
        half = (1 << int(ni)) >> 1
        r = q + (int(ni) > 0 and (rem > half or (rem == half and q & 1)))
        flat[i] = min(max(r, INT64_MIN), INT64_MAX)
    return out


def is_power_of_two(m: int) -> bool:
    """True when a multiplier m (as from `quantize_multiplier`) stands for a power of two (or zero):
    requantizing by it is a shift, exact on a float32 sum of dequantized values."""
    return int(m) in (0, 1 << 30)
