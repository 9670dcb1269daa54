"""Plain integer loops of the accumulator semantics (`qcompile.core.accumulator`): one output at a
time, Python ints, no tiling tricks. The independent check of both the training kernel
(`qcompile.train.tiled`, tests/test_narrow_acc.py) and the reference interpreter
(`qcompile.backends.reference`, tests/test_reference.py)."""
import itertools

import torch

from qcompile.core.accumulator import acc_range


def loop_accumulate(products, bias, acc_bits, tile, overflow):
    """(acc, events) of one output: the accumulator semantics written as a Python loop over ints."""
    acc, events = int(bias), 0
    step = max(1, len(products)) if tile is None else tile
    for i in range(0, len(products), step):
        part = sum(products[i:i + step])
        if acc_bits is None:
            acc += part
            continue
        lo, hi = acc_range(acc_bits)
        if overflow == "pairwise":          # the pair's sum saturates first
            events += not lo <= part <= hi
            part = min(max(part, lo), hi)
        v = acc + part
        if overflow in ("saturate", "pairwise"):
            acc = min(max(v, lo), hi)
            events += acc != v
        else:
            acc = (v - lo) % 2 ** acc_bits + lo
    if overflow == "wrap" and acc_bits is not None:
        events = int(acc != int(bias) + sum(products))
    return acc, events


def loop_conv2d(x, w, b, stride, pad, dil, groups, acc_bits, tile, overflow, per_output=False):
    N, C, H, W = x.shape
    O, cg, kh, kw = w.shape
    og = O // groups
    Ho, Wo = (H + 2 * pad - dil * (kh - 1) - 1) // stride + 1, (W + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    out, events = torch.zeros(N, O, Ho, Wo, dtype=torch.int64), 0
    hit = torch.zeros(N, O, Ho, Wo, dtype=torch.bool)
    for n, o, i, j in itertools.product(range(N), range(O), range(Ho), range(Wo)):
        prods = []
        for c, ky, kx in itertools.product(range(cg), range(kh), range(kw)):
            y, xx = i * stride - pad + ky * dil, j * stride - pad + kx * dil
            v = int(x[n, (o // og) * cg + c, y, xx]) if 0 <= y < H and 0 <= xx < W else 0
            prods.append(v * int(w[o, c, ky, kx]))
        out[n, o, i, j], e = loop_accumulate(prods, 0 if b is None else b[o], acc_bits, tile, overflow)
        events += e
        hit[n, o, i, j] = e > 0
    return (out, events, hit) if per_output else (out, events)


def loop_matmul(a, b, bias, acc_bits, tile, overflow):
    """a (B, M, K) @ b (B, K, N), reduction over K in order."""
    B, M, K = a.shape
    out, events = torch.zeros(B, M, b.shape[-1], dtype=torch.int64), 0
    for z, m, n in itertools.product(range(B), range(M), range(b.shape[-1])):
        prods = [int(a[z, m, k]) * int(b[z, k, n]) for k in range(K)]
        out[z, m, n], e = loop_accumulate(prods, 0 if bias is None else bias[n], acc_bits, tile, overflow)
        events += e
    return out, events
