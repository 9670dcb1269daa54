"""Accumulator semantics, written once: ranges, tiles, overflow, worst-case bounds.

For each output: acc_0 = bias; the reduction is cut into contiguous tiles of `tile` products
(the last may be shorter; tile=None is one tile); each tile's sum p_t of integer products is
exact; acc_t = overflow(acc_(t-1) + p_t) with overflow = clamp to [-2^(b-1), 2^(b-1)-1]
("saturate") or two's-complement wrap ("wrap"); acc_bits=None is an exact accumulator.
Wrapping after each tile equals wrapping once at the end (arithmetic mod 2^b); saturation is
order dependent: the clamp runs after every tile.

"pairwise" is what x86's fast int8 dot product computes without VNNI (AVX2 vpmaddubsw, then
vpaddsw): tiles of 2 products (tile = 2), each pair's sum itself saturated before it is added,
acc_t = clamp(acc_(t-1) + clamp(p_t)). Where no pair can leave the range (`pairs_saturation_free`:
e.g. 7-bit unsigned inputs × 8-bit weights, 2·127·128 = 32512 < 2^15) clamp(p_t) = p_t and the
mode is "saturate" with tile 2, the plain tile semantics.
Invariant: the training op (`qcompile.train.tiled`), the reference interpreter, the analyses,
the log barrier and the C emitter take ranges, tile plans and bounds from here.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from qcompile.core.grids import bias_codes, quantize_codes

OVERFLOW_MODES = ("saturate", "wrap", "pairwise")
PAIR = 2                 # products per tile of the "pairwise" mode


def acc_range(acc_bits: int) -> tuple[int, int]:
    """[lo, hi] of a signed `acc_bits`-bit accumulator."""
    return -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1


def min_acc_bits(bound) -> int:
    """The smallest signed width whose range holds every integer of magnitude <= `bound`."""
    return math.ceil(math.log2(float(bound) + 1)) + 1


def wrap(v: torch.Tensor, acc_bits: int) -> torch.Tensor:
    """Two's-complement wrap of integer-valued `v` into `acc_bits` bits (exact for |v| < 2^53 as float)."""
    lo, _ = acc_range(acc_bits)
    return torch.remainder(v - lo, 2 ** acc_bits) + lo


def check_mode(acc_bits, tile, overflow) -> None:
    if acc_bits is not None and (not isinstance(acc_bits, int) or acc_bits < 2):
        raise ValueError(f"acc_bits={acc_bits!r}: must be None (exact) or an integer >= 2")
    if tile is not None and (not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile={tile!r}: must be None (whole reduction) or a positive integer")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow={overflow!r}: choose one of {OVERFLOW_MODES}")
    if overflow == "pairwise" and acc_bits is not None and tile != PAIR:
        raise ValueError(f"overflow='pairwise' sums pairs of products: tile must be {PAIR}, got {tile!r}")


def pairs_saturation_free(w_abs, x_absmax, acc_bits: int) -> bool:
    """True when no pair of consecutive products (in reduction order, weights |w| (O, K) against
    inputs |x| <= x_absmax) can leave the signed acc_bits range: then "pairwise" equals "saturate"
    with tile 2 (the module docstring)."""
    w_abs = np.abs(np.asarray(w_abs, dtype=np.int64))
    w_abs = np.pad(w_abs, ((0, 0), (0, w_abs.shape[1] % PAIR)))
    worst = int(w_abs.reshape(w_abs.shape[0], -1, PAIR).sum(2).max(initial=0)) * int(x_absmax)
    return worst <= acc_range(acc_bits)[1]


def tile_plan(length: int, tile: int | None) -> tuple[int, int]:
    """(tile length, number of tiles) for a reduction of `length` products."""
    t = length if tile is None or tile >= length else tile
    return t, -(-length // t)


def l1_bounds(w_abs: torch.Tensor, x_absmax, bias_abs: torch.Tensor | None, tile: int | None):
    """Worst-case accumulator magnitudes per output channel for weights |w_int| (O, K) in reduction
    order and inputs |x_int| <= x_absmax: (whole reduction incl. |bias|, largest single tile).
    Differentiable in its tensor arguments."""
    K = w_abs.shape[1]
    tl, T = tile_plan(K, tile)
    whole = w_abs.sum(1) * x_absmax
    if bias_abs is not None:
        whole = whole + bias_abs
    w_tiles = F.pad(w_abs, (0, T * tl - K)) if T * tl > K else w_abs
    per_tile = w_tiles.reshape(w_abs.shape[0], T, tl).sum(2).amax(1) * x_absmax
    return whole, per_tile


def accumulate_tiles(partials, start, acc_bits: int | None, overflow: str) -> np.ndarray:
    """The accumulator after the last tile, in numpy int64: acc = start, then for each tile's exact
    partial sum p_t in order acc = overflow(acc + p_t) ("pairwise": clamp(acc + clamp(p_t)); the module
    docstring's semantics).
    `partials` is an int64 array with the tile axis first, or any iterable of per-tile arrays;
    `start` (e.g. the bias) broadcasts against one tile. Wrap is applied once at the end (modular:
    also right when an int64 sum itself wrapped, since 2^acc_bits divides 2^64)."""
    check_mode(acc_bits, PAIR if overflow == "pairwise" else None, overflow)
    saturate = acc_bits is not None and overflow in ("saturate", "pairwise")
    lo, hi = acc_range(acc_bits) if acc_bits is not None else (None, None)
    acc = np.asarray(start, dtype=np.int64)
    for p in partials:
        p = np.asarray(p, dtype=np.int64)
        acc = acc + (np.clip(p, lo, hi) if saturate and overflow == "pairwise" else p)
        if saturate:
            np.clip(acc, lo, hi, out=acc)
    if acc_bits is not None and overflow == "wrap" and acc_bits < 64:
        acc = (acc - lo) % (1 << acc_bits) + lo
    return acc


def max_l1_bounds(w_int, x_absmax: int, bias_int, tile: int | None) -> tuple[int, int]:
    """`l1_bounds` of integer weights (O, K) in reduction order and integer bias (numpy, torch or
    ints; the bias one value or O), maximised over the output channels, as exact Python ints:
    (whole reduction incl. |bias|, largest single tile); (0, 0) without channels. For code
    generators choosing accumulator lanes: summed in int64, OverflowError where a bound reaches
    2^62 (checked first in float64)."""
    w_abs = torch.as_tensor(np.abs(np.asarray(w_int, dtype=np.int64)))
    b_abs = torch.as_tensor(np.abs(np.asarray(bias_int, dtype=np.int64))).expand(w_abs.shape[0])
    if w_abs.shape[0] == 0:
        return 0, 0
    approx = max(float(b.max()) for b in l1_bounds(w_abs.double(), float(x_absmax), b_abs.double(), tile))
    if approx >= 2.0 ** 62:
        raise OverflowError(f"accumulator bound about {approx:.3g} reaches 2^62: past what int64 sums hold")
    whole, per_tile = l1_bounds(w_abs, int(x_absmax), b_abs, tile)
    return int(whole.max()), int(per_tile.max())


def overflow_free_scale(w: torch.Tensor, scale: torch.Tensor, qr: tuple[int, int], bias: torch.Tensor | None,
                        input_scale: torch.Tensor, input_absmax, acc_bits: int, pow2: bool = False) -> torch.Tensor:
    """The smallest symmetric weight scale, at or above `scale` (per output channel, axis 0 of `w`,
    or one 0-d scale for all), at which no input on a grid with max|x_int| <= `input_absmax` can
    overflow an `acc_bits` accumulator: per channel o, Σ_k |code(w_ok)|·X + |bias code_o| <= A =
    2^(b−1) − 1, with code() the grid's rounding (`quantize_codes`) and the bias coded as the layer
    adds it (`bias_codes` at input_scale·scale). This is A2Q's ℓ1 constraint with the bias in the
    accumulator; it holds for every tile and both overflow modes, since no partial sum exceeds it.
    The left side does not grow with the scale (|round(v)| is monotone in |v|), so the scale is found
    by doubling from the continuous bound (Σ|w|·X + |b|/s_x)/A until the constraint holds, then
    bisecting down to `scale` over float32 values (pow2: the smallest power of two, by doubling).
    Returns float32 of `scale`'s shape."""
    A = acc_range(acc_bits)[1]
    X = float(input_absmax)
    w2 = w.detach().float().reshape(w.shape[0], -1)
    zero = torch.zeros(w2.shape[0], device=w2.device)
    per_tensor = scale.dim() == 0

    def holds(s):
        total = quantize_codes(w2, s, zero, qr, axis=0).abs().sum(1).double() * X
        if bias is not None:
            total = total + bias_codes(bias.detach(), input_scale, s)[0].abs()
        ok = total <= A
        return ok.all().expand_as(ok) if per_tensor else ok

    def one(s):            # a per-tensor scale is the same for every channel
        return s.max().expand_as(s).clone() if per_tensor else s

    lo = one(scale.detach().float().expand(w2.shape[0]).clone())
    bias_part = 0.0 if bias is None else bias.detach().double().abs() / input_scale.double()
    hi = one(torch.maximum(lo, ((w2.abs().sum(1).double() * X + bias_part) / A).float()))
    if pow2:
        lo = hi = torch.exp2(torch.ceil(torch.log2(lo)))
    hi = torch.where(holds(lo), lo, hi)
    for _ in range(256):
        ok = holds(hi)
        if bool(ok.all()):
            break
        hi = torch.where(ok, hi, hi * 2)
    else:
        raise ArithmeticError(f"overflow_free_scale: no weight scale holds for acc_bits={acc_bits}, max|x_int|={X:g}")
    while not pow2:
        mid = ((lo.double() + hi.double()) / 2).float()
        if bool(((mid <= lo) | (mid >= hi)).all()):
            break
        ok = holds(mid)
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return hi if not per_tensor else hi[0]
