"""The attributes of each IR op kind: one dataclass per kind, whose fields are the specification.

`op.attrs` is an instance of `SPEC[op.kind]`. A field without a default is required; a field
with a default is optional (`acc_bits=None` is an exact accumulator, `overflow="saturate"`,
`weight_scale=None`, ...). The type annotation of each field is what `qcompile.ir.verify` checks:
  int, bool                       a Python / numpy integer (not a bool), a bool
  Pair, tuple[int, ...]           a tuple or list of two / any number of integers
  tuple[float, ...]               a tuple or list of reals
  Array[n] (Annotated ndarray)    a numpy integer array of n dimensions
  Literal[...]                    one of the listed values
  X | None                        None or an X
The semantics of every kind are in `qcompile.ir.graph`'s docstring. Shared groups of fields are
base classes (`Clamp`, `Requant`, `Accumulator`, `PerChannel`): a backend may test
`isinstance(op.attrs, ir.Clamp)` to learn that an op clamps to act_min..act_max. All fields are
keyword-only: `ir.Conv2d(weight=..., bias=..., ...)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np

Pair = tuple[int, int]
Ints = tuple[int, ...]
Floats = tuple[float, ...]
Overflow = Literal["saturate", "wrap", "pairwise"]
# integer numpy arrays; the Annotated metadata is the allowed number of dimensions
Vector = Annotated[np.ndarray, 1]
Matrix = Annotated[np.ndarray, 2]
Kernel = Annotated[np.ndarray, 4]
Values = Annotated[np.ndarray, 1, 2, 3, 4, 5]


# ---- shared groups ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class Clamp:
    """y = clamp(zy + r, act_min, act_max): the output tensor's qmin/qmax unless a ReLU was fused."""
    act_min: int
    act_max: int


@dataclass(kw_only=True)
class Requant:
    """One fixed-point requantization r = requantize(v, multiplier, shift)."""
    multiplier: int
    shift: int


@dataclass(kw_only=True)
class Accumulator:
    """The accumulator mode: acc_bits None = exact; else tiles of `tile` products folded by `overflow`."""
    acc_bits: int | None = None
    tile: int | None = None
    overflow: Overflow = "saturate"


@dataclass(kw_only=True)
class PerChannel:
    """Per-output-channel bias and requantization of conv2d / linear (each of shape (O,))."""
    bias: Vector                            # int32, or int64 where int32 cannot hold it
    multiplier: Vector
    shift: Vector
    weight_scale: Floats | None = None      # descriptive only: the real value of the weight codes


# ---- op kinds -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Conv2d(PerChannel, Accumulator, Clamp):
    weight: Kernel                          # (O, I/groups, kh, kw) int8 or int16
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int


@dataclass(kw_only=True)
class Linear(PerChannel, Accumulator, Clamp):
    weight: Matrix                          # (O, I) int8 or int16


@dataclass(kw_only=True)
class Matmul(Requant, Accumulator, Clamp):
    pass


@dataclass(kw_only=True)
class Add(Requant, Clamp):
    left_shift: int
    multiplier_a: int
    shift_a: int
    multiplier_b: int
    shift_b: int


@dataclass(kw_only=True)
class Mul(Requant, Clamp):
    pass


@dataclass(kw_only=True)
class Concat(Clamp):
    axis: int
    multipliers: Ints                       # one per input
    shifts: Ints


@dataclass(kw_only=True)
class Requantize(Requant, Clamp):
    pass


@dataclass(kw_only=True)
class MaxPool2d:
    kernel: Pair
    stride: Pair
    padding: Pair
    ceil_mode: bool


@dataclass(kw_only=True)
class AvgPool2d(Requant, Clamp):
    kernel: Pair
    stride: Pair
    padding: Pair
    global_pool: bool                       # kernel = the whole H×W


@dataclass(kw_only=True)
class AdaptiveAvgPool2d(Clamp):
    """Windows of any size, overlapping or not: output row i averages input rows
    h_start[i]..h_end[i]−1 (columns likewise); one requantization per output position
    (row-major, OH·OW entries), the 1/count of its window folded into its multiplier."""
    h_start: Ints
    h_end: Ints
    w_start: Ints
    w_end: Ints
    multiplier: Vector
    shift: Vector


@dataclass(kw_only=True)
class Lut:
    table: Vector                           # (n,): already clamped output codes


@dataclass(kw_only=True)
class Softmax(Clamp):
    """Over the last axis (`qcompile.core.rowwise`): exp table over mx − x, output multiplier R."""
    table: Vector                           # T[d], d = mx − x; 0 past its end
    out_multiplier: int                     # R = round(2^RECIP_BITS / S_y)
    causal: bool                            # row i of the last two axes sees columns j ≤ i + (cols − rows)
    visible: Values | None = None           # 1 = visible, 0 = hidden; broadcast against the input's trailing axes


@dataclass(kw_only=True)
class LayerNorm(Requant, Clamp):
    """Over the last axis (`qcompile.core.rowwise`): affine weight codes and bias per element of it."""
    weight: Vector                          # (N,) codes g_j
    bias: Vector                            # (N,) int64, in units of S_g·√N / 2^NORM_BITS
    eps: int                                # E = round(ε·N³/S²)
    centered: bool = True                   # False: d_j = N·(x_j − zx) (RMSNorm, F.normalize), not N·x_j − Σx


@dataclass(kw_only=True)
class Embedding:
    """y[..., :] = table[min(ids[...], V − 1)]: rows of codes gathered by the input's codes (token ids)."""
    table: Matrix                           # (V, E) codes on the output grid, int8/int16


@dataclass(kw_only=True)
class Constant:
    value: Values                           # the per-sample codes, already on the output grid


@dataclass(kw_only=True)
class Reshape:
    shape: Ints


@dataclass(kw_only=True)
class Transpose:
    perm: Ints


@dataclass(kw_only=True)
class Slice:
    axis: int
    start: int
    stop: int


# kind → attrs class
SPEC: dict[str, type] = {
    "conv2d": Conv2d, "linear": Linear, "matmul": Matmul, "add": Add, "mul": Mul, "concat": Concat,
    "requantize": Requantize, "max_pool2d": MaxPool2d, "avg_pool2d": AvgPool2d,
    "adaptive_avg_pool2d": AdaptiveAvgPool2d, "lut": Lut, "softmax": Softmax, "layer_norm": LayerNorm,
    "constant": Constant, "embedding": Embedding,
    "reshape": Reshape, "transpose": Transpose, "slice": Slice,
}
