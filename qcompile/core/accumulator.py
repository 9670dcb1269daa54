"""Accumulator semantics, written once: ranges, tiles, overflow, worst-case bounds.

For each output: acc_0 = bias; the reduction is cut into contiguous tiles of `tile` products
(the last may be shorter; tile=None is one tile); each tile's sum p_t of integer products is
exact; acc_t = overflow(acc_(t-1) + p_t) with overflow = clamp to [-2^(b-1), 2^(b-1)-1]
("saturate") or two's-complement wrap ("wrap"); acc_bits=None is an exact accumulator.
Wrapping after each tile equals wrapping once at the end (arithmetic mod 2^b); saturation is
order dependent: the clamp runs after every tile.
Invariant: the training op (`qcompile.train.tiled`), the reference interpreter, the analyses,
the log barrier and the C emitter take ranges, tile plans and bounds from here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OVERFLOW_MODES = ("saturate", "wrap")


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
