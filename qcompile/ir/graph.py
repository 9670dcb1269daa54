"""The integer graph IR: what `qcompile.ir.lower` produces and every backend consumes.

A `Graph` is a list of `Op`s in topological order over named `Tensor`s. Tensors hold
integer codes; the real value of a code q is scale·(q − zero_point). Shapes are per
sample (no batch dimension; images are (C, H, W)); backends run a batch as independent
samples. Everything an op needs is in its `attrs`, an instance of the op kind's dataclass
(`qcompile.ir.ops`, `ir.SPEC[kind]`: `ir.Conv2d`, `ir.Add`, ...) holding Python ints or numpy
integer arrays, so a backend never computes a float: scales are kept only for describing tensors and for
quantizing the graph input / dequantizing the outputs at the boundary.

Requantization (the only way a value changes grid) is fixed-point:
    requantize(v, m, s) = round_half_to_even(v · m / 2^(31 − s))
with m an int32 in [2^30, 2^31) (or 0) and s an int shift, computed from a real multiplier
M = m · 2^(s − 31) by `qcompile.core.requant.quantize_multiplier`, 0 <= 31 − s <= 94. Exact for
every int64 v: 64-bit products where |v|·m < 2^62 and 31 − s <= 62 (`core.requant.fits_int64` on
the static bound of v), 128-bit ones otherwise. Accumulators are exact in int64 (lowering
and the backends reject a bound at or past 2^62).

Op kinds, their attrs classes and fields (x, y: input/output codes; zx, zy: zero points, read
from the tensors; every op ends with y = clamp(zy + r, act_min, act_max) where r is what the op
computes; `act_min`/`act_max` are fields of every op that requantizes (the `ir.Clamp` group),
equal to the output tensor's qmin/qmax unless a ReLU was fused, then act_min = zy):
  conv2d (Conv2d)  inputs [x]; weight (O, I/groups, kh, kw) int8 (int16 for 9–16-bit weight grids),
           bias (O,) int32 (int64 where int32 cannot hold it; never saturated) at scale Sx·Sw[o],
           stride, padding, dilation (pairs), groups, multiplier/shift (O,) int arrays,
           acc_bits (int or None = exact), tile (int or None), overflow ("saturate"|"wrap"|"pairwise": tile 2).
           acc starts at bias[o]; the reduction over (c_in/groups, ky, kx), in that order, is
           cut into contiguous tiles of `tile` products; each tile's Σ (x − zx)·w is exact;
           after each tile acc = overflow(acc + partial) into acc_bits. Padding taps are
           x = zx (contribute 0). r = requantize(acc, multiplier[o], shift[o]).
           weight_scale: tuple of O floats, descriptive only (the real value of the weight codes,
           for exporters whose ops take float scales); integer backends ignore it.
  linear (Linear)  as conv2d with weight (O, I), reduction over the last axis I (x of per-sample
           shape (..., I), every row independent; y of shape (..., O)).
  matmul (Matmul)  inputs [a, b] (activations, zero points za, zb); r = requantize(Σ (a−za)(b−zb), m, s)
           with scalar multiplier/shift; acc_bits/tile/overflow as conv2d.
  add (Add)  inputs [a, b]; fields left_shift, multiplier_a/shift_a, multiplier_b/shift_b,
           multiplier/shift (scalars);
           r = requantize(requantize((a−za)·2^left_shift, ma, sa) + requantize((b−zb)·2^left_shift, mb, sb), m, s)
           (left_shift = 20 for inputs of ≤ 8 bits, 12 for 16-bit inputs: products stay < 2^63)
  mul (Mul)  inputs [a, b]; r = requantize((a−za)·(b−zb), m, s)
           add and mul broadcast a and b with numpy rules on the per-sample shapes, of equal rank.
  concat (Concat)  inputs [x0, x1, ...], axis (per-sample axis), multipliers/shifts (one per input);
           each input's r_i = requantize(x_i − z_i, m_i, s_i)
  requantize (Requantize)  inputs [x]; r = requantize(x − zx, m, s) (m = 2^30, s = 1 is the identity: a ReLU
           on the same grid is a requantize with act_min = zy)
  max_pool2d (MaxPool2d)  kernel, stride, padding (pairs), ceil_mode; padded taps never win;
           y = max (same grid as x, no clamp)
  avg_pool2d (AvgPool2d)  kernel, stride, padding (pairs; count_include_pad=True: padding taps are x = zx),
           or global_pool=True (kernel = whole H×W); r = requantize(Σ (x − zx), m, s) with the
           1/count folded into m
  adaptive_avg_pool2d (AdaptiveAvgPool2d)  h_start/h_end (OH each), w_start/w_end (OW each): output
           (i, j) averages the window rows h_start[i]..h_end[i]−1 × columns w_start[j]..w_end[j]−1
           (PyTorch's adaptive windows: uneven, overlapping, or one input repeated when upsampling);
           r = requantize(Σ (x − zx), multiplier[i·OW + j], shift[i·OW + j]), 1/count folded in
  lut (Lut)  table: int array indexed by x − qmin_in (one entry per input code); y = table[...]
           (relu6, hardswish, silu, sigmoid, hardsigmoid, gelu, tanh, relu when the grid
           changes). The table already holds clamped output codes (no act_min/act_max).
  softmax (Softmax)  inputs [x]; over the last axis: table, out_multiplier R, causal, visible (None or a
           0/1 int array broadcast against x's trailing axes, numpy rules: Swin's shifted-window mask);
           r_j = div_round(T[mx − x_j] · R, Σ_k T[mx − x_k] · 2^16) over the visible entries of the row
           (`qcompile.core.rowwise`), r = 0 on hidden ones (causal: column j > i + cols − rows of row i;
           visible: an entry where it is 0)
  layer_norm (LayerNorm)  inputs [x]; over the last axis of N: weight (N,) codes, bias (N,) int64, eps;
           acc_j = div_round(d_j·2^16, isqrt(Σ d² + eps))·weight_j + bias_j with d_j = N·x_j − Σx, or
           d_j = N·(x_j − zx) when not `centered` (RMSNorm, F.normalize) (`qcompile.core.rowwise`);
           r = requantize(acc, m, s)
  embedding (Embedding)  inputs [ids] (an unsigned tensor of token ids: scale 1, zero point 0, the
           graph input of a language model); table (V, E) codes of the output grid;
           y[..., e] = table[min(ids[...], V − 1), e] (an id past the table reads its last row), shape (..., E)
  constant (Constant)  no inputs; value: the per-sample codes of the output tensor (y = value)
  reshape (Reshape)  shape (per sample); data order unchanged
  transpose (Transpose)  perm (per-sample axes)
  slice (Slice)  axis (per-sample axis), start, stop

Tensors are at most 16 bits. 8-bit (or narrower) tensors are the quantizers' grids of the
trained graph; 16-bit signed tensors are intermediate grids that lowering chooses where the
trained graph has no quantizer (e.g. between a SiLU and the multiply that consumes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qcompile.core.grids import code_range, max_code_magnitude


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]          # per sample, no batch dimension
    bits: int
    signed: bool                    # storage: int8/int16 when signed, uint8/uint16 otherwise
    scale: float
    zero_point: int

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.signed)[1]

    @property
    def magnitude(self) -> int:
        """max |code − zero_point|: the largest value an op reads from this tensor once centred."""
        return int(max_code_magnitude((self.qmin, self.qmax), self.zero_point))


@dataclass
class Op:
    kind: str
    name: str                       # the fx node it came from (sanitize before using as an identifier)
    inputs: list[str]
    output: str
    attrs: Any                      # an instance of ir.SPEC[kind] (`qcompile.ir.ops`)


@dataclass
class Graph:
    inputs: list[str]
    outputs: list[str]
    tensors: dict[str, Tensor]
    ops: list[Op]
    meta: dict[str, Any] = field(default_factory=dict)   # qcompile version, config

    def tensor(self, name: str) -> Tensor:
        return self.tensors[name]
