"""The integer reference interpreter of the IR (`qcompile.ir`): the oracle every backend matches.

Independent of training: plain numpy int64 code sharing only `qcompile.core` arithmetic (torch only
runs core's float→code rounding of the graph input). Narrow
accumulators (acc_bits set) cut the reduction into its tiles in IR order, compute each tile's exact
partial sum with an int64 matmul over that slice of the reduction, and fold the tiles with
`qcompile.core.accumulator.accumulate_tiles` (saturate after every tile, or wrap).

Invariant: after the graph input is quantized (`quantize_input`), every value is an int64
numpy array of codes and every op is integer arithmetic exactly as the IR docstring
states; requantization is `qcompile.core.requant.requantize` (round half to even). Arrays
carry the batch as axis 0; the IR's per-sample axes are shifted by one.
"""
from __future__ import annotations

import numpy as np
import torch

from qcompile import ir
from qcompile.core.accumulator import accumulate_tiles, check_mode, tile_plan
from qcompile.core.grids import quantize_codes
from qcompile.core.requant import requantize
from qcompile.core.rowwise import layer_norm_rows, softmax_rows


def quantize_input(graph: ir.Graph, x, name: str | None = None) -> np.ndarray:
    """Codes of a float input, rounded by the grid's one rule (`qcompile.core.grids.quantize_codes`:
    float32 x·(1/S), half to even, + z, clamp), as the trained graph's input quantizer rounds."""
    t = graph.tensor(name or graph.inputs[0])
    x = torch.as_tensor(np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32))
    codes = quantize_codes(x, torch.tensor(t.scale, dtype=torch.float32), torch.tensor(float(t.zero_point)),
                           (t.qmin, t.qmax))
    return codes.numpy().astype(np.int64)


def dequantize(graph: ir.Graph, codes: np.ndarray, name: str | None = None) -> np.ndarray:
    """Real values scale·(q − zero_point) of an output (float64; the boundary back to float)."""
    t = graph.tensor(name or graph.outputs[0])
    return (np.asarray(codes, dtype=np.int64) - t.zero_point) * np.float64(t.scale)


def _clamp(graph, op, r):
    t = graph.tensor(op.output)
    return np.clip(t.zero_point + r, op.attrs.act_min, op.attrs.act_max)


def _pair_pad(x, pad, value):
    ph, pw = pad
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(x, kernel, stride, dilation=(1, 1)):
    """(N, C, OH, OW, kh, kw) view of the windows of x (N, C, H, W)."""
    kh, kw = kernel
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (eh, ew), axis=(2, 3))
    win = win[:, :, ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]
    return win


def _tiled(op, lhs, rhs, start):
    """The accumulator of lhs (..., M, K) @ rhs (..., K, N) + start in the op's accumulator mode: the
    reduction over K, in index order, cut into tiles (one when acc_bits is None); each tile's sum is
    an exact int64 matmul of the tile's slice of K; the tiles fold with `accumulate_tiles`."""
    a = op.attrs
    acc_bits, tile, overflow = a.acc_bits, a.tile, a.overflow
    check_mode(acc_bits, tile, overflow)
    K = lhs.shape[-1]
    tl, T = tile_plan(K, None if acc_bits is None else tile)
    partials = (np.matmul(lhs[..., t * tl:(t + 1) * tl], rhs[..., t * tl:(t + 1) * tl, :]) for t in range(T))
    return accumulate_tiles(partials, start, acc_bits, overflow)


def conv2d(graph, op, x):
    a = op.attrs
    zx = graph.tensor(op.inputs[0]).zero_point
    w = a.weight.astype(np.int64)
    o, cg, kh, kw = w.shape
    g = a.groups
    xs = _pair_pad(x - zx, a.padding, 0)
    win = _windows(xs, (kh, kw), a.stride, a.dilation)         # (N, C, OH, OW, kh, kw)
    n, c, oh, ow = win.shape[:4]
    # columns ordered (c_in/groups, ky, kx) per group, as the IR's reduction order
    cols = win.reshape(n, g, cg, oh, ow, kh, kw).transpose(0, 1, 3, 4, 2, 5, 6).reshape(n, g, oh * ow, cg * kh * kw)
    wg = w.reshape(g, o // g, cg * kh * kw)
    bias = a.bias.astype(np.int64).reshape(g, o // g)
    acc = _tiled(op, cols, wg.transpose(0, 2, 1), bias[None, :, None, :])      # (N, G, P, O/G)
    acc = acc.transpose(0, 1, 3, 2).reshape(n, o, oh, ow)
    r = requantize(acc, a.multiplier.reshape(1, o, 1, 1), a.shift.reshape(1, o, 1, 1))
    return _clamp(graph, op, r)


def linear(graph, op, x):
    a = op.attrs
    zx = graph.tensor(op.inputs[0]).zero_point
    w, bias = a.weight.astype(np.int64), a.bias.astype(np.int64)
    acc = _tiled(op, x - zx, w.T, bias)
    return _clamp(graph, op, requantize(acc, a.multiplier, a.shift))


def matmul(graph, op, a, b):
    za, zb = (graph.tensor(i).zero_point for i in op.inputs)
    acc = _tiled(op, a - za, b - zb, 0)
    return _clamp(graph, op, requantize(acc, op.attrs.multiplier, op.attrs.shift))


def add(graph, op, a, b):
    at = op.attrs
    za, zb = (graph.tensor(i).zero_point for i in op.inputs)
    ls = at.left_shift
    ra = requantize((a - za) << ls, at.multiplier_a, at.shift_a)
    rb = requantize((b - zb) << ls, at.multiplier_b, at.shift_b)
    return _clamp(graph, op, requantize(ra + rb, at.multiplier, at.shift))


def mul(graph, op, a, b):
    za, zb = (graph.tensor(i).zero_point for i in op.inputs)
    return _clamp(graph, op, requantize((a - za) * (b - zb), op.attrs.multiplier, op.attrs.shift))


def concat(graph, op, *xs):
    parts = [requantize(x - graph.tensor(name).zero_point, m, s)
             for x, name, m, s in zip(xs, op.inputs, op.attrs.multipliers, op.attrs.shifts)]
    return _clamp(graph, op, np.concatenate(parts, axis=op.attrs.axis + 1))


def requantize_op(graph, op, x):
    zx = graph.tensor(op.inputs[0]).zero_point
    return _clamp(graph, op, requantize(x - zx, op.attrs.multiplier, op.attrs.shift))


def max_pool2d(graph, op, x):
    a = op.attrs
    low = np.iinfo(np.int64).min
    xp = _pair_pad(x, a.padding, low)
    if a.ceil_mode:
        xp = _ceil_pad(xp, a.kernel, a.stride, low, a.padding)
    return _windows(xp, a.kernel, a.stride).max(axis=(4, 5))


def _ceil_pad(x, kernel, stride, value, padding):
    """Extra bottom/right padding so ceil_mode windows exist (a window must start inside input + left padding)."""
    extra = []
    for d, (k, s, p) in enumerate(zip(kernel, stride, padding)):
        size = x.shape[2 + d]
        out = -(-(size - k) // s) + 1
        if (out - 1) * s >= size - p:
            out -= 1
        extra.append(max(0, (out - 1) * s + k - size))
    return np.pad(x, ((0, 0), (0, 0), (0, extra[0]), (0, extra[1])), constant_values=value)


def avg_pool2d(graph, op, x):
    a = op.attrs
    zx = graph.tensor(op.inputs[0]).zero_point
    if a.global_pool:
        s = (x - zx).sum(axis=(2, 3), keepdims=True)
    else:
        s = _windows(_pair_pad(x - zx, a.padding, 0), a.kernel, a.stride).sum(axis=(4, 5))
    return _clamp(graph, op, requantize(s, a.multiplier, a.shift))


def adaptive_avg_pool2d(graph, op, x):
    a = op.attrs
    xc = x.astype(np.int64) - graph.tensor(op.inputs[0]).zero_point
    s = np.stack([np.stack([xc[:, :, hs:he, ws:we].sum(axis=(2, 3)) for ws, we in zip(a.w_start, a.w_end)], -1)
                  for hs, he in zip(a.h_start, a.h_end)], -2)
    shape = (len(a.h_start), len(a.w_start))
    return _clamp(graph, op, requantize(s, a.multiplier.reshape(shape), a.shift.reshape(shape)))


def lut(graph, op, x):
    return op.attrs.table[x - graph.tensor(op.inputs[0]).qmin]


def softmax(graph, op, x):
    rows = x if x.ndim > 2 else x[:, None]          # a per-sample vector is one row (not the batch's rows)
    r = softmax_rows(rows, op.attrs.table, op.attrs.out_multiplier, op.attrs.causal, op.attrs.visible)
    return _clamp(graph, op, r.reshape(x.shape))


def layer_norm(graph, op, x):
    a = op.attrs
    centre = None if a.centered else graph.tensor(op.inputs[0]).zero_point
    return _clamp(graph, op, requantize(layer_norm_rows(x, a.weight, a.bias, a.eps, centre), a.multiplier, a.shift))


def embedding(graph, op, ids):
    table = op.attrs.table.astype(np.int64)
    return table[np.minimum(ids, len(table) - 1)]


def constant(graph, op, batch):
    return np.broadcast_to(op.attrs.value.astype(np.int64), (batch,) + op.attrs.value.shape)


def reshape(graph, op, x):
    return x.reshape((x.shape[0],) + tuple(op.attrs.shape))


def transpose(graph, op, x):
    return x.transpose((0,) + tuple(p + 1 for p in op.attrs.perm))


def slice_op(graph, op, x):
    idx = [slice(None)] * x.ndim
    idx[op.attrs.axis + 1] = slice(op.attrs.start, op.attrs.stop)
    return x[tuple(idx)]


KERNELS = {
    "conv2d": conv2d, "linear": linear, "matmul": matmul, "add": add, "mul": mul, "concat": concat,
    "requantize": requantize_op, "max_pool2d": max_pool2d, "avg_pool2d": avg_pool2d,
    "adaptive_avg_pool2d": adaptive_avg_pool2d, "lut": lut, "softmax": softmax, "layer_norm": layer_norm,
    "constant": constant, "embedding": embedding, "reshape": reshape, "transpose": transpose, "slice": slice_op,
}


def run_codes(graph: ir.Graph, *codes: np.ndarray, keep: bool = False):
    """Run on input codes; returns the output codes (a list when the graph has several outputs),
    or, with keep=True, the dict of every tensor's codes."""
    ir.verify(graph)
    env = {name: np.asarray(c, dtype=np.int64) for name, c in zip(graph.inputs, codes)}
    batch = len(codes[0])
    for op in graph.ops:
        args = [env[i] for i in op.inputs] if op.inputs else [batch]     # a constant is repeated per sample
        env[op.output] = KERNELS[op.kind](graph, op, *args).astype(np.int64)
    if keep:
        return env
    outs = [env[name] for name in graph.outputs]
    return outs[0] if len(outs) == 1 else outs


def run(graph: ir.Graph, x_float, keep: bool = False):
    """Quantize the float input onto the graph's input grid, then run the integer graph."""
    return run_codes(graph, quantize_input(graph, x_float), keep=keep)
