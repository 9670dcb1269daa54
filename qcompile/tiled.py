"""Tiled narrow-accumulator matmuls: the one implementation of the accumulator semantics.

Semantics (shared with `qcompile.ir` and every backend). For each output element:
  acc_0 = bias;  the reduction (conv: (c_in/groups, ky, kx) in that order; linear: in_features;
  matmul: the inner dimension) is cut into contiguous tiles of `tile` products (the last one
  may be shorter; tile=None is one tile); each tile's sum p_t of integer products is exact;
  acc_t = overflow(acc_(t-1) + p_t), overflow = clamp to [-2^(b-1), 2^(b-1)-1] ("saturate")
  or two's-complement wrap ("wrap"); acc_bits=None is an exact accumulator.
Wrapping after each tile equals wrapping once at the end (arithmetic mod 2^b), so wrap does
no per-tile work. Saturation is order dependent: the clamp runs after every tile.
Overflow statistics: with saturation an event is one tile update whose exact value
acc_(t-1) + p_t left the range (it was clamped); with wrap, intermediate wraps that cancel
leave the result exact, so an event is an output whose wrapped result differs from the exact
sum. An output `overflowed` when it had at least one event.

Every function takes integer-valued tensors (int64, or float32/float64 holding integers) and
is exact whenever the bounds below hold; it raises otherwise. Integer operands give integer
results; float operands give the accumulator in the float dtype used (float32 or float64).
Partial sums are computed in float32 when every tile's Σ|products| < 2^24 (float32 holds every
integer below 2^24, so any summation order is exact) and in float64 (exact below 2^53)
otherwise. When the worst case |bias| + Σ|products| cannot leave the range, the whole
reduction is one exact op. Otherwise the partial sums are batched GEMMs (over the im2col
matrix for a conv), computed a chunk of tiles at a time and folded into the accumulator tile
after tile, so memory stays bounded whatever the number of tiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import bias_codes

FLOAT32_EXACT = 2 ** 24
FLOAT64_EXACT = 2 ** 53
OVERFLOW_MODES = ("saturate", "wrap")


@dataclass
class AccResult:
    """The accumulator after the last tile, per output; `exact` is bias + Σ partials (no overflow)."""
    acc: torch.Tensor
    exact: torch.Tensor         # exact as an integer type or below 2^24 (float32) / 2^53 (float64)
    overflowed: torch.Tensor    # bool, per output: at least one overflow event
    events: torch.Tensor        # int64 scalar: number of overflow events


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


def _absmax(t: torch.Tensor | None) -> float:
    return float(t.detach().abs().max()) if t is not None and t.numel() else 0.0


def _check_mode(acc_bits, tile, overflow) -> None:
    if acc_bits is not None and (not isinstance(acc_bits, int) or acc_bits < 2):
        raise ValueError(f"acc_bits={acc_bits!r}: must be None (exact) or an integer >= 2")
    if tile is not None and (not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile={tile!r}: must be None (whole reduction) or a positive integer")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow={overflow!r}: choose one of {OVERFLOW_MODES}")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _ntiles(length: int, tile: int | None) -> tuple[int, int]:
    """(tile length, number of tiles) for a reduction of `length` products."""
    t = length if tile is None or tile >= length else tile
    return t, -(-length // t)


@dataclass
class _Plan:
    """How to run one reduction exactly: tile length/count and the float dtypes of partials and sums."""
    tile: int
    tiles: int
    part_dtype: torch.dtype
    acc_dtype: torch.dtype
    dense: bool                 # no overflow possible: compute the whole reduction at once


def _plan(a, b, bias, length: int, acc_bits, tile, overflow, absmax=None) -> _Plan:
    _check_mode(acc_bits, tile, overflow)
    amax, bmax = absmax if absmax is not None else (_absmax(a), _absmax(b))
    prod = amax * bmax
    total = length * prod + _absmax(bias)
    if total >= FLOAT64_EXACT:
        raise ValueError(f"operands too large for an exact accumulation: |bias| + Σ|products| can reach "
                         f"{total:.3g} >= 2^53")
    dense = acc_bits is None or total <= acc_range(acc_bits)[1]
    tl, T = _ntiles(length, None if dense else tile)
    part = torch.float32 if tl * prod < FLOAT32_EXACT else torch.float64
    # float32 sums are exact below 2^24; with saturation the accumulator stays in range (acc_bits <= 24),
    # an out-of-range value is clamped whatever its rounding, and `exact` is then only used as a float
    acc_ok = total < FLOAT32_EXACT or (overflow == "saturate" and acc_bits is not None and acc_bits <= 24
                                       and _absmax(bias) < FLOAT32_EXACT)
    acc = torch.float32 if part == torch.float32 and acc_ok else torch.float64
    return _Plan(tl, 1 if dense else T, part, acc, dense)


CHUNK_ELEMENTS = 1 << 22          # partial sums computed per GEMM call: at most ~16 MB of float32


def run_tiles(partials: Callable[[int, int], torch.Tensor], tiles: int, start: torch.Tensor,
              acc_bits: int | None, overflow: str, per_tile: int | None = None) -> AccResult:
    """The accumulator over exact per-tile partial sums: partials(t0, t1) returns tiles t0..t1−1
    (a sequence, or a tensor stacked along dim 0), each shaped like `start` (the initial
    accumulator, e.g. the bias).
    Tiles are requested in chunks of about CHUNK_ELEMENTS / per_tile (default: start's size)."""
    exact = start.clone()
    chunk = max(1, min(tiles, CHUNK_ELEMENTS // max(per_tile or start.numel(), 1)))
    chunks = [(t0, min(t0 + chunk, tiles)) for t0 in range(0, tiles, chunk)]
    none = torch.zeros((), dtype=torch.int64, device=start.device)
    if acc_bits is None or overflow == "wrap":
        for t0, t1 in chunks:
            for p in partials(t0, t1):
                exact += p
        if acc_bits is None:
            return AccResult(exact, exact, torch.zeros(exact.shape, dtype=torch.bool, device=exact.device), none)
        acc = wrap(exact, acc_bits)
        hit = acc != exact
        return AccResult(acc, exact, hit, hit.sum())
    lo, hi = acc_range(acc_bits)
    acc, v = start.clone(), torch.empty_like(start)
    clamps = torch.zeros_like(start)            # per output: number of clamps so far
    for t0, t1 in chunks:
        ps = partials(t0, t1)
        for p in ps:
            exact += p
            torch.add(acc, p, out=v)
            torch.clamp(v, lo, hi, out=acc)
            s = v.sub_(acc).clamp_(-1, 1)           # v − clamp(v) is an integer, nonzero where clamped
            clamps.addcmul_(s, s)
    return AccResult(acc, exact, clamps > 0, clamps.sum(dtype=torch.float64).to(torch.int64))


def _out_dtype(ref: torch.Tensor) -> torch.dtype | None:
    """Integer operands give integer results; float operands keep the (exact) accumulation dtype."""
    return ref.dtype if ref.dtype in (torch.int64, torch.int32) else None


def _cast(res: AccResult, dtype: torch.dtype | None) -> AccResult:
    if dtype is None:
        return res
    return AccResult(res.acc.round().to(dtype), res.exact.round().to(dtype), res.overflowed, res.events)


def _start(shape, bias, dtype, device) -> torch.Tensor:
    start = torch.zeros(shape, dtype=dtype, device=device)
    return start if bias is None else start.add_(bias.to(dtype))


@torch.no_grad()
def tiled_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
                 acc_bits: int | None, tile: int | None, overflow: str = "saturate", absmax=None) -> AccResult:
    """a (..., M, K) @ b (..., K, N) (+ bias broadcast to (..., M, N)) with the tiled accumulator;
    the reduction runs over K in index order. `absmax`=(max|a|, max|b|), when known, skips measuring."""
    K = a.shape[-1]
    if b.shape[-2] != K:
        raise ValueError(f"tiled_matmul: inner dimensions differ ({tuple(a.shape)} @ {tuple(b.shape)})")
    plan = _plan(a, b, bias, K, acc_bits, tile, overflow, absmax)
    tl, T = plan.tile, plan.tiles
    pad = T * tl - K
    a_ = F.pad(a.to(plan.part_dtype), (0, pad))
    b_ = F.pad(b.to(plan.part_dtype).transpose(-1, -2), (0, pad)).transpose(-1, -2)
    a_t = a_.reshape(*a_.shape[:-1], T, tl).movedim(-2, 0)                  # (T, ..., M, tl)
    b_t = b_.reshape(*b_.shape[:-2], T, tl, b_.shape[-1]).movedim(-3, 0)    # (T, ..., tl, N)

    def partials(t0, t1):
        return torch.matmul(a_t[t0:t1], b_t[t0:t1]).to(plan.acc_dtype)

    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    res = run_tiles(partials, T, _start(shape, bias, plan.acc_dtype, a.device),
                    None if plan.dense else acc_bits, overflow)
    return _cast(res, _out_dtype(a))


def tiled_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                 acc_bits: int | None, tile: int | None, overflow: str = "saturate", absmax=None) -> AccResult:
    """x (..., in) · w (out, in)ᵀ + bias (out,), reduction over in_features in index order."""
    return tiled_matmul(x, w.t(), bias, acc_bits=acc_bits, tile=tile, overflow=overflow, absmax=absmax)


@torch.no_grad()
def tiled_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                 dilation=1, groups: int = 1, *, acc_bits: int | None, tile: int | None,
                 overflow: str = "saturate", absmax=None) -> AccResult:
    """conv2d of integer operands x (N, C, H, W) (already x − zx: padding contributes 0) and
    w (O, C/groups, kh, kw), bias (O,), with the tiled accumulator (see the module docstring).
    The tiles are GEMMs over the im2col matrix, whose rows are in (c, ky, kx) order."""
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"tiled_conv2d: expects 4-d x and w, got {tuple(x.shape)} and {tuple(w.shape)}")
    O, cin_g, kh, kw = w.shape
    N, K = x.shape[0], cin_g * kh * kw
    plan = _plan(x, w, bias, K, acc_bits, tile, overflow, absmax)
    x_, w_ = x.to(plan.part_dtype), w.to(plan.part_dtype)
    if plan.tiles == 1:
        y = F.conv2d(x_, w_, None, stride, padding, dilation, groups).to(plan.acc_dtype)
        start = _start(y.shape, None if bias is None else bias.view(-1, 1, 1), plan.acc_dtype, x.device)
        res = run_tiles(lambda t0, t1: y.unsqueeze(0), 1, start, None if plan.dense else acc_bits, overflow)
        return _cast(res, _out_dtype(x))
    tl, T = plan.tile, plan.tiles
    kk, og = kh * kw, O // groups
    Ho, Wo = _conv_out_hw(x.shape[-2:], (kh, kw), stride, padding, dilation)
    L = Ho * Wo
    wg = w_.reshape(groups, og, K)

    def partials(t0, t1):                                  # tiles t0..t1−1, each (N, O, L)
        k0, k1 = t0 * tl, min(t1 * tl, K)
        c0, c1 = k0 // kk, (k1 - 1) // kk + 1              # the input channels these tiles read
        if groups == 1:
            xs = x_[:, c0:c1]
        else:
            chans = (torch.arange(groups, device=x.device).view(groups, 1) * cin_g
                     + torch.arange(c0, c1, device=x.device)).reshape(-1)
            xs = x_.index_select(1, chans)
        cols = F.unfold(xs, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        cols = cols.reshape(N, groups, (c1 - c0) * kk, L)[:, :, k0 - c0 * kk:k1 - c0 * kk]
        full = (k1 - k0) // tl
        out = []
        if full:
            wt = wg[:, :, k0:k0 + full * tl].reshape(groups, og, full, tl).transpose(1, 2)      # (G, full, og, tl)
            ps = torch.matmul(wt, cols[:, :, :full * tl].reshape(N, groups, full, tl, L))     # (N, G, full, og, L)
            out += [ps[:, :, i].reshape(N, O, L) for i in range(full)]
        if k0 + full * tl < k1:
            out.append(torch.matmul(wg[:, :, k0 + full * tl:k1], cols[:, :, full * tl:]).reshape(N, O, L))
        return [p.to(plan.acc_dtype) for p in out]

    start = _start((N, O, L), None if bias is None else bias.view(-1, 1), plan.acc_dtype, x.device)
    res = run_tiles(partials, T, start, acc_bits, overflow, per_tile=max(O, 2 * tl) * N * L)
    res = AccResult(res.acc.reshape(N, O, Ho, Wo), res.exact.reshape(N, O, Ho, Wo),
                    res.overflowed.reshape(N, O, Ho, Wo), res.events)
    return _cast(res, _out_dtype(x))


def _conv_out_hw(hw, k, stride, padding, dilation) -> tuple[int, int]:
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return ((hw[0] + 2 * ph - dh * (k[0] - 1) - 1) // sh + 1, (hw[1] + 2 * pw - dw * (k[1] - 1) - 1) // sw + 1)


def l1_bounds(w_abs: torch.Tensor, x_absmax, bias_abs: torch.Tensor | None, tile: int | None):
    """Worst-case accumulator magnitudes per output channel for weights |w_int| (O, K) in reduction
    order and inputs |x_int| <= x_absmax: (whole reduction incl. |bias|, largest single tile).
    Differentiable in its tensor arguments."""
    K = w_abs.shape[1]
    tl, T = _ntiles(K, tile)
    whole = w_abs.sum(1) * x_absmax
    if bias_abs is not None:
        whole = whole + bias_abs
    per_tile = F.pad(w_abs, (0, T * tl - K)).reshape(w_abs.shape[0], T, tl).sum(2).amax(1) * x_absmax
    return whole, per_tile


# ---- backward matmuls: the same tiled accumulator over the backward reductions ----------------

@torch.no_grad()
def tiled_conv2d_input_grad(g: torch.Tensor, w: torch.Tensor, input_hw, stride=1, padding=0, dilation=1,
                            groups: int = 1, *, acc_bits: int | None, tile: int | None,
                            overflow: str = "saturate", absmax=None) -> AccResult:
    """G_X = G_Y·Wᵀ of conv2d: the conv2d of G_Y with stride-1 zeros inserted between its rows and
    columns, padded by dilation·(k−1) − padding (plus what the forward dropped at the end), with
    the spatially flipped, in/out-transposed kernel. Its reduction runs over (c_out/groups, ky', kx')
    of the flipped kernel (inserted zeros and padding contribute 0) and is tiled like any conv."""
    N, O, Ho, Wo = g.shape
    _, cin_g, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    H, W = input_hw
    if (sh, sw) != (1, 1):
        stuffed = g.new_zeros(N, O, (Ho - 1) * sh + 1, (Wo - 1) * sw + 1)
        stuffed[:, :, ::sh, ::sw] = g
        g = stuffed
    lh, lw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    eh = H - ((Ho - 1) * sh - 2 * ph + dh * (kh - 1) + 1)
    ew = W - ((Wo - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
    g = F.pad(g, (lw, lw + ew, lh, lh + eh))
    og = O // groups
    wt = w.reshape(groups, og, cin_g, kh, kw).transpose(1, 2).reshape(groups * cin_g, og, kh, kw).flip(-1, -2)
    return tiled_conv2d(g, wt, None, 1, 0, (dh, dw), groups, acc_bits=acc_bits, tile=tile, overflow=overflow,
                        absmax=absmax)


@torch.no_grad()
def tiled_conv2d_weight_grad(x: torch.Tensor, g: torch.Tensor, weight_shape, stride=1, padding=0, dilation=1,
                             groups: int = 1, *, acc_bits: int | None, tile: int | None,
                             overflow: str = "saturate", absmax=None) -> AccResult:
    """G_W = Xᵀ·G_Y of conv2d: G_W[o, c, ky, kx] = Σ_(n, i, j) G_Y[n, o, i, j]·X_pad[n, c, i·s + ky·d, j·s + kx·d],
    the reduction over (n, i, j) in that order, tiled. Result shaped like the weight."""
    O, cin_g, kh, kw = weight_shape
    N = x.shape[0]
    og = O // groups
    xf = x if x.is_floating_point() else x.to(torch.float64)                            # im2col is float-only
    cols = F.unfold(xf, (kh, kw), dilation=dilation, padding=padding, stride=stride)      # (N, C·kk, L)
    L = cols.shape[-1]
    b = cols.reshape(N, groups, cin_g * kh * kw, L).permute(1, 0, 3, 2).reshape(groups, N * L, -1)
    a = g.reshape(N, groups, og, L).permute(1, 2, 0, 3).reshape(groups, og, N * L)
    if absmax is not None:
        absmax = (absmax[1], absmax[0])                                                   # (|G_Y|, |X|)
    res = tiled_matmul(a, b, None, acc_bits=acc_bits, tile=tile, overflow=overflow, absmax=absmax)
    return AccResult(res.acc.reshape(weight_shape), res.exact.reshape(weight_shape),
                     res.overflowed.reshape(weight_shape), res.events)


# ---- the training op: what passes/narrow_acc puts in place of a quantized conv / linear / matmul ----

def _channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """`t` (a scalar or one value per channel) shaped to broadcast along `axis` of an ndim tensor."""
    if t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class _NarrowAccFunction(torch.autograd.Function):
    """y = acc·(s_a·s_b) with acc the tiled accumulator over the integer operands a/s_a, b/s_b;
    also returns the exact accumulator (integer units). Backward: see NarrowAccOp."""

    @staticmethod
    def forward(ctx, a, b, bias, op):
        sa, sb = op.operand_scales()
        a_int = torch.round(a / sa)
        b_int = torch.round(b / _channel_view(sb, b.dim(), 0)) if op.kind != "matmul" else torch.round(b / sb)
        out_scale = sa * sb
        bias_int = None if bias is None else bias_codes(bias.detach(), sa, sb)[0]
        res = op.forward_int(a_int, b_int, bias_int)
        op.record("train" if op.training else "eval", res)
        op.remember_bounds(b_int, bias_int)
        y_scale = op.out_view(out_scale, res.acc.dim())
        ctx.save_for_backward(a_int, b_int, res.overflowed)
        ctx.op, ctx.sa, ctx.sb, ctx.has_bias = op, sa, sb, bias is not None
        return (res.acc * y_scale).to(a.dtype), res.exact.to(a.dtype)

    @staticmethod
    def backward(ctx, gy, gexact):
        a_int, b_int, overflowed = ctx.saved_tensors
        op, sa, sb = ctx.op, ctx.sa, ctx.sb
        g = gy
        if op.acc_grad == "zero_saturated":
            g = g.masked_fill(overflowed, 0.0)
        if gexact is not None:
            g = g + gexact / op.out_view(sa * sb, g.dim())
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=[d for d in range(g.dim()) if d != op.channel_axis(g.dim())])
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gq = op.grad_output_quant
        if gq is not None and gq.enabled:
            # one quantized gradient operand for both backward matmuls: u = G_Y·s_w (per output channel
            # for weights, so G_X's reduction over channels has one scale), u_int = û/s_u
            fold = op.kind != "matmul"
            u = g * op.out_view(sb, g.dim()) if fold else g
            u_int = torch.round(gq.quantize_gradient(u) / gq.scale)
            su = gq.scale.clone()
            ga, gb = op.backward_int(a_int, b_int, u_int, need_a, need_b)
            grad_a = ga.acc.to(g.dtype) * (su if fold else su * sb) if need_a else None
            if need_b:
                b_scale = su * sa / _channel_view(sb, gb.acc.dim(), 0) if fold else su * sa
                grad_b = gb.acc.to(g.dtype) * b_scale
            else:
                grad_b = None
        else:
            a_hat = a_int * sa
            b_hat = b_int * (_channel_view(sb, b_int.dim(), 0) if op.kind != "matmul" else sb)
            grad_a, grad_b = op.backward_float(a_hat, b_hat, g, need_a, need_b)
        return grad_a, grad_b, grad_bias, None


class NarrowAccOp(nn.Module):
    """A quantized conv2d / conv1d / linear / matmul computed with the tiled narrow accumulator.

    Called as op(a, b, bias) with a, b on the grids of the quantizers `grids` (activation, and
    weight or activation); computes in the integer domain (a/s_a, b/s_b, bias/(s_a·s_b) rounded
    into int32) and rescales. Backward, with a gradient quantizer: u = G_Y·s_w is quantized once
    and G_X = s_u·(u_int ⊛ W_int), G_W = s_u·s_x/s_w·(X_int ⊛ u_int) run through the same tiled
    accumulator with `grad_acc_bits`; without one, the backward matmuls are exact in float.
    The accumulator is straight-through (acc_grad="ste") or passes no gradient to outputs that
    overflowed ("zero_saturated"). With a grid's quantizer disabled it is the plain float op.
    Overflow statistics are int64 buffers per phase (train, eval, grad); `reset_overflow_stats()`.
    """

    PHASES = ("train", "eval", "grad")

    def __init__(self, kind: str, layer: str, grids: tuple, *, acc_bits: int | None, tile: int | None,
                 overflow: str, grad_acc_bits: int | None, acc_grad: str, grad_output_quant=None,
                 channels: int = 1, stride=1, padding=0, dilation=1, groups: int = 1):
        super().__init__()
        if kind not in ("conv1d", "conv2d", "linear", "matmul"):
            raise ValueError(f"NarrowAccOp kind {kind!r}: choose conv1d, conv2d, linear or matmul")
        _check_mode(acc_bits, tile, overflow)
        _check_mode(grad_acc_bits, tile, overflow)
        self.kind, self.layer = kind, layer
        self.acc_bits, self.tile, self.overflow = acc_bits, tile, overflow
        self.grad_acc_bits, self.acc_grad = grad_acc_bits, acc_grad
        self.grids = tuple(grids)              # the operands' quantizers (registered elsewhere in the graph)
        self.grad_output_quant = grad_output_quant
        if kind == "conv1d":
            stride, padding, dilation = (1, _pair1(stride)), (0, _pair1(padding)), (1, _pair1(dilation))
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.track_exact = False               # set by the log barrier: keep the exact accumulator of the last step
        self._pending = None
        for phase in self.PHASES:
            for what in ("events", "overflowed", "outputs"):
                self.register_buffer(f"{what}_{phase}", torch.zeros((), dtype=torch.int64))
        self.register_buffer("bound_whole", torch.full((channels,), float("nan"), dtype=torch.float64))
        self.register_buffer("bound_tile", torch.full((channels,), float("nan"), dtype=torch.float64))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pending"] = None               # autograd graphs are not state
        return state

    def extra_repr(self) -> str:
        return (f"{self.kind}, acc_bits={self.acc_bits}, tile={self.tile}, overflow={self.overflow}, "
                f"grad_acc_bits={self.grad_acc_bits}, acc_grad={self.acc_grad}")

    # ---- geometry --------------------------------------------------------------------
    def channel_axis(self, ndim: int) -> int:
        return 1 if self.kind in ("conv1d", "conv2d") else ndim - 1

    def out_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return _channel_view(t, ndim, self.channel_axis(ndim))

    def operand_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grids[0].scale.detach().clone(), self.grids[1].scale.detach().clone()

    def input_absmax(self, index: int = 0) -> float:
        """max |x − z| over the grid of operand `index` (the input range in integer units)."""
        q = self.grids[index]
        qmin, qmax = q.qrange
        z = q.zero_point.detach()
        return float(torch.maximum((qmin - z).abs(), (qmax - z).abs()).max())

    # ---- integer forward / backward -------------------------------------------------
    def _conv_args(self):
        return self.stride, self.padding, self.dilation, self.groups

    def forward_int(self, a, b, bias) -> AccResult:
        mode = dict(acc_bits=self.acc_bits, tile=self.tile, overflow=self.overflow,
                    absmax=(self.input_absmax(0), self.input_absmax(1)))
        if self.kind == "conv2d":
            return tiled_conv2d(a, b, bias, *self._conv_args(), **mode)
        if self.kind == "conv1d":
            return _squeeze2(tiled_conv2d(a.unsqueeze(2), b.unsqueeze(2), bias, *self._conv_args(), **mode))
        if self.kind == "linear":
            return tiled_linear(a, b, bias, **mode)
        return tiled_matmul(a, b, None, **mode)

    def backward_int(self, a, b, u, need_a: bool, need_b: bool):
        """(G_a, G_b) AccResults of the backward matmuls on integer operands, with grad_acc_bits."""
        mode = dict(acc_bits=self.grad_acc_bits, tile=self.tile, overflow=self.overflow)
        q = self.grad_output_quant
        umax = float(torch.maximum((q.qrange[0] - q.zero_point).abs(), (q.qrange[1] - q.zero_point).abs()))
        amax, bmax = self.input_absmax(0), self.input_absmax(1)
        ga = gb = None
        if self.kind in ("conv2d", "conv1d"):
            sq = self.kind == "conv1d"
            a4, b4, u4 = (t.unsqueeze(2) for t in (a, b, u)) if sq else (a, b, u)
            if need_a:
                ga = tiled_conv2d_input_grad(u4, b4, a4.shape[-2:], *self._conv_args(), **mode, absmax=(umax, bmax))
            if need_b:
                gb = tiled_conv2d_weight_grad(a4, u4, b4.shape, *self._conv_args(), **mode, absmax=(amax, umax))
            ga, gb = (_squeeze2(r) if sq and r is not None else r for r in (ga, gb))
        elif self.kind == "linear":
            u2, a2 = u.reshape(-1, u.shape[-1]), a.reshape(-1, a.shape[-1])
            if need_a:
                ga = _reshape(tiled_matmul(u2, b, None, **mode, absmax=(umax, bmax)), a.shape)
            if need_b:
                gb = tiled_matmul(u2.t(), a2, None, **mode, absmax=(umax, amax))
        else:
            if need_a:
                ga = tiled_matmul(u, b.transpose(-1, -2), None, **mode, absmax=(umax, bmax))
            if need_b:
                a_t = a.reshape(-1, a.shape[-1]).t() if b.dim() == 2 else a.transpose(-1, -2)
                u_ = u.reshape(-1, u.shape[-1]) if b.dim() == 2 else u
                gb = tiled_matmul(a_t, u_, None, **mode, absmax=(amax, umax))
        for r in (ga, gb):
            if r is not None:
                self.record("grad", r)
        return ga, gb

    def backward_float(self, a, b, g, need_a: bool, need_b: bool):
        """The exact float backward of the op (used when gradients are not quantized)."""
        ga = gb = None
        if self.kind in ("conv2d", "conv1d"):
            sq = self.kind == "conv1d"
            a4, b4, g4 = (t.unsqueeze(2) for t in (a, b, g)) if sq else (a, b, g)
            if need_a:
                ga = torch.nn.grad.conv2d_input(a4.shape, b4, g4, *self._conv_args())
            if need_b:
                gb = torch.nn.grad.conv2d_weight(a4, b4.shape, g4, *self._conv_args())
            ga, gb = (t.squeeze(2) if sq and t is not None else t for t in (ga, gb))
        elif self.kind == "linear":
            if need_a:
                ga = g @ b
            if need_b:
                gb = g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
        else:
            if need_a:
                ga = g @ b.transpose(-1, -2)
            if need_b:
                gb = (a.reshape(-1, a.shape[-1]).t() @ g.reshape(-1, g.shape[-1]) if b.dim() == 2
                      else a.transpose(-1, -2) @ g)
        return ga, gb

    # ---- statistics and bounds ------------------------------------------------------
    @torch.no_grad()
    def record(self, phase: str, res: AccResult) -> None:
        getattr(self, f"events_{phase}").add_(res.events)
        getattr(self, f"overflowed_{phase}").add_(res.overflowed.sum())
        getattr(self, f"outputs_{phase}").add_(res.overflowed.numel())

    def reset_overflow_stats(self) -> None:
        for phase in self.PHASES:
            for what in ("events", "overflowed", "outputs"):
                getattr(self, f"{what}_{phase}").zero_()

    def overflow_stats(self) -> dict:
        """{phase: {"events", "overflowed", "outputs", "rate"}} with rate = overflowed / outputs."""
        out = {}
        for phase in self.PHASES:
            ev, ov, n = (int(getattr(self, f"{w}_{phase}")) for w in ("events", "overflowed", "outputs"))
            out[phase] = {"events": ev, "overflowed": ov, "outputs": n, "rate": ov / n if n else 0.0}
        return out

    @torch.no_grad()
    def remember_bounds(self, b_int, bias_int) -> None:
        """Cache the worst-case accumulator magnitudes per output channel for the operands just used."""
        self.bound_whole, self.bound_tile = (t.to(torch.float64) for t in self.worst_case(b_int, bias_int))

    def worst_case(self, b_int, bias_int):
        """(whole-reduction, largest-tile) worst-case |acc| per output channel: Σ|w_int|·max|x_int| + |bias_int|
        (matmul: K·max|a_int|·max|b_int|, one value). Differentiable in b_int and bias_int."""
        if self.kind == "matmul":
            K = b_int.shape[-2]
            w_abs = torch.full((1, K), self.input_absmax(1), dtype=torch.float64, device=b_int.device)
            return l1_bounds(w_abs, self.input_absmax(0), None, self.tile)
        w_abs = b_int.abs().reshape(b_int.shape[0], -1)
        return l1_bounds(w_abs, self.input_absmax(0), None if bias_int is None else bias_int.abs(), self.tile)

    def describe(self) -> str:
        st = self.overflow_stats()
        parts = [f"acc{self.acc_bits or '∞'}/tile {self.tile or 'all'}/{self.overflow}"]
        for phase in self.PHASES:
            s = st[phase]
            if s["outputs"]:
                parts.append(f"{phase}: {s['events']} events, {100 * s['rate']:.3g}% outputs overflowed")
        if self.acc_bits is not None and not bool(torch.isnan(self.bound_whole).any()):
            worst = float(self.bound_whole.max())
            hi = acc_range(self.acc_bits)[1]
            parts.append(f"overflow-free margin {hi - worst:+.0f} ({self.acc_bits - min_acc_bits(worst):+d} bits; "
                         f"worst case {worst:.0f} vs {hi})")
        return " | ".join(parts)

    # ---- forward --------------------------------------------------------------------
    def forward(self, a, b, bias=None):
        if not all(q.enabled for q in self.grids):
            return self.float_op(a, b, bias)
        y, exact = _NarrowAccFunction.apply(a, b, bias, self)
        if self.track_exact and self.training and torch.is_grad_enabled():
            self._pending = {"exact": exact, "b": b, "bias": bias}
        return y

    def float_op(self, a, b, bias=None):
        if self.kind == "conv2d":
            return F.conv2d(a, b, bias, *self._conv_args())
        if self.kind == "conv1d":
            return F.conv2d(a.unsqueeze(2), b.unsqueeze(2), bias, *self._conv_args()).squeeze(2)
        if self.kind == "linear":
            return F.linear(a, b, bias)
        return torch.matmul(a, b)

    def pop_pending(self):
        """What the last training forward saw (exact accumulator, b operand, bias), with its graph; once."""
        p, self._pending = self._pending, None
        return p


def _pair1(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def _squeeze2(r: AccResult) -> AccResult:
    return AccResult(r.acc.squeeze(2), r.exact.squeeze(2), r.overflowed.squeeze(2), r.events)


def _reshape(r: AccResult, shape) -> AccResult:
    return AccResult(r.acc.reshape(shape), r.exact.reshape(shape), r.overflowed.reshape(shape), r.events)
