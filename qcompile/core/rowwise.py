"""Integer softmax and LayerNorm over the last axis, written once (lowering builds their constants,
the reference runs them; the C copy is in `backends/c/templates/`). Every value is an int64.

Rounded division (`div_round`): for d > 0, div_round(n, d) = floor((2n + d) / (2d)), i.e. n/d
rounded half up (toward +inf), with floor division for negative n.

Softmax of a row x (codes on a grid of scale S; the op's `scale` c multiplies the real input,
e.g. 1/√d of attention), output on a grid of scale S_y:
    e_j = T[mx − x_j]    (T[d] = round(2^EXP_BITS · exp(−d·S·c)); T[d] = 0 past the table's end)
    r_j = div_round(e_j · R, Σ_k e_k · 2^RECIP_BITS),    R = round(2^RECIP_BITS / S_y)
over the row's visible entries (causal: j ≤ i + (columns − rows) in row i of the last two axes; and
where an explicit 0/1 `visible` mask, broadcast against x's trailing axes, is 1); a hidden entry has
r = 0 (probability 0). T[0] = 2^EXP_BITS, so Σ e ≥ 2^EXP_BITS > 0.

LayerNorm of a row x of N codes (the zero point cancels), affine weight codes g_j and bias b_j:
    d_j = N·x_j − Σ_k x_k                      (N times the deviation from the mean, exact)
    ρ   = isqrt(Σ_k d_k² + E)                  (floor square root; E = round(ε·N³/S²))
    n_j = div_round(d_j · 2^NORM_BITS, ρ)      (ρ = 0 only when every d_j = 0: then n_j = 0)
    acc_j = n_j · g_j + b_j
since (x_j − mean)/√(var + ε) = d_j·√N / √(Σd² + E) ≈ n_j·√N / 2^NORM_BITS; the op requantizes acc
with multiplier S_g·√N / (2^NORM_BITS·S_y) and adds b = round(β / (S_g·√N / 2^NORM_BITS)).
Not centred (RMSNorm, F.normalize): d_j = N·(x_j − z) with z the input's zero point, the rest the same:
RMSNorm's x_j/√(mean x² + ε) = d_j·√N / √(Σd² + E) with the same E; F.normalize's
x_j / max(‖x‖, ε) ≈ d_j / √(Σd² + E) = n_j / 2^NORM_BITS with E = round(ε²·N²/S²) (√(‖x‖² + ε²) for the
max: the same to within ε²/‖x‖² relative), unit S_g / 2^NORM_BITS.
Bounds (`layer_norm_bounds`, on the code span `layer_norm_span`): Σd² = N²·Σ(x − mean)² ≤ N³·(qmax − qmin)²/4
(not centred: N³·max|x − z|²), so Σd² + E must stay below
2^62 (8-bit rows up to about 60,000 elements, 16-bit rows up to 1,625); |n_j| ≤ 2^NORM_BITS (ρ ≥ |d_j|), so
|acc| ≤ 2^NORM_BITS·max|g| + max|b|.
"""
from __future__ import annotations

import math

import numpy as np

EXP_BITS = 16       # exp table entries in units of 2^-16
RECIP_BITS = 16     # softmax output multiplier R = round(2^16 / S_y)
NORM_BITS = 16      # normalized LayerNorm values in units of 2^-16 / √N


def div_round(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """n / d rounded half up, for d > 0 (see the module docstring)."""
    n, d = np.asarray(n, np.int64), np.asarray(d, np.int64)
    return (2 * n + d) // (2 * d)


def exp_table(real_step: float) -> np.ndarray:
    """T[d] = round(2^EXP_BITS · exp(−d · real_step)) for d = 0, 1, ... up to its last non-zero entry."""
    if not real_step > 0:
        raise ValueError(f"softmax input step {real_step} must be positive")
    length = int(math.ceil((EXP_BITS + 1) * math.log(2) / real_step)) + 1
    table = np.round(np.exp(-np.arange(length, dtype=np.float64) * real_step) * 2.0 ** EXP_BITS).astype(np.int64)
    return table[:int(np.count_nonzero(table))]


def softmax_multiplier(out_scale: float) -> int:
    """R = round(2^RECIP_BITS / S_y)."""
    return int(round(2.0 ** RECIP_BITS / out_scale))


def softmax_visible(rows: int, cols: int, causal: bool) -> np.ndarray:
    """(rows, cols) bool mask of the entries a row sees: all, or j ≤ i + (cols − rows) when causal."""
    if not causal:
        return np.ones((rows, cols), dtype=bool)
    return np.arange(cols)[None, :] <= np.arange(rows)[:, None] + (cols - rows)


def softmax_rows(x: np.ndarray, table: np.ndarray, multiplier: int, causal: bool,
                 visible: np.ndarray | None = None) -> np.ndarray:
    """r_j of every row of x (..., rows, cols) (module docstring); hidden entries are 0."""
    x = np.asarray(x, np.int64)
    mask = softmax_visible(x.shape[-2] if x.ndim > 1 else 1, x.shape[-1], causal).reshape(
        x.shape[-2:] if x.ndim > 1 else x.shape)
    visible = mask if visible is None else mask & (np.asarray(visible) != 0)
    low = np.iinfo(np.int64).min
    mx = np.where(visible, x, low).max(axis=-1, keepdims=True)
    d = np.clip(mx - x, 0, len(table))          # hidden entries may lie above the max: clipped, then dropped
    e = np.where(visible & (d < len(table)), np.append(table, 0)[d], 0)
    total = e.sum(axis=-1, keepdims=True)
    return div_round(e * multiplier, total << RECIP_BITS)


def isqrt(v: np.ndarray) -> np.ndarray:
    """floor(√v) elementwise for 0 ≤ v < 2^62, exact (a float estimate corrected in integers)."""
    v = np.asarray(v, np.int64)
    r = np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64)
    for _ in range(2):
        r = np.where(r * r > v, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= v, r + 1, r)
    return r


def layer_norm_eps(eps: float, n: int, in_scale: float) -> int:
    """E = round(ε · N³ / S²): ε in the units of Σ d²."""
    return int(round(eps * n ** 3 / in_scale ** 2))


def layer_norm_span(qmin: int, qmax: int, zero_point: int, centered: bool) -> int:
    """The code width whose square over 4 bounds (x − centre)²: qmax − qmin (centred on the mean), or twice
    the largest |x − z| (centred on the zero point)."""
    return qmax - qmin if centered else 2 * max(qmax - zero_point, zero_point - qmin)


def layer_norm_bounds(n: int, code_width: int, eps: int, weight, bias) -> tuple[int, int]:
    """(bound on Σd² + E, bound on |acc|) of a LayerNorm row of n codes spanning `code_width`
    (`layer_norm_span`)."""
    weight, bias = np.asarray(weight, np.int64), np.asarray(bias, np.int64)
    return (n ** 3 * code_width ** 2 // 4 + int(eps),
            (1 << NORM_BITS) * int(np.abs(weight).max(initial=0)) + int(np.abs(bias).max(initial=0)))


def layer_norm_rows(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: int,
                    zero_point: int | None = None) -> np.ndarray:
    """acc_j = n_j · g_j + b_j of every row of x (..., N) (module docstring): centred on the row's mean, or
    on `zero_point` when given (RMSNorm, F.normalize)."""
    x = np.asarray(x, np.int64)
    n = x.shape[-1]
    d = n * x - (x.sum(axis=-1, keepdims=True) if zero_point is None else n * int(zero_point))
    rho = isqrt((d * d).sum(axis=-1, keepdims=True) + eps)
    normed = np.where(rho > 0, div_round(d << NORM_BITS, np.maximum(rho, 1)), 0)
    return normed * np.asarray(weight, np.int64) + np.asarray(bias, np.int64)
