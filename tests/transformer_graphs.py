"""Hand-built integer graphs of the transformer ops (softmax, layer_norm, constant, linear on rows,
batched activation×activation matmul), shared by the reference, C and ONNX tests. Each graph's
constants come from float parameters through `qcompile.core`, as lowering builds them."""
from __future__ import annotations

import math

import numpy as np

from qcompile import ir
from qcompile.core.requant import quantize_multiplier
from qcompile.tools.experiments.transformer_ops import clamp, layer_norm_op, softmax_op, tensor


def attention_graph(seed: int = 0, causal: bool = False, heads: int = 2, length: int = 5, dim: int = 4) -> ir.Graph:
    """x (L, E) → LayerNorm → one linear to q|k|v rows → heads → softmax(q·kᵀ/√d) · v → plus a constant
    → output; every new op kind, on random parameters."""
    rng = np.random.default_rng(seed)
    e = heads * dim
    x = tensor("x", (length, e), 0.05, 128)
    ln = tensor("ln", (length, e), 0.03, 3, signed=True)
    qkv = tensor("qkv", (length, 3 * e), 0.04, -2, signed=True)
    qh, kh, vh = (tensor(n, (length, heads, dim), 0.04, -2, signed=True) for n in ("qh", "kh", "vh"))
    q, v = (tensor(n, (heads, length, dim), 0.04, -2, signed=True) for n in ("q", "v"))
    kt = tensor("kt", (heads, dim, length), 0.04, -2, signed=True)
    scores = tensor("scores", (heads, length, length), 0.1, 5, signed=True)
    probs = tensor("probs", (heads, length, length), 1 / 255, 0)
    ctx = tensor("ctx", (heads, length, dim), 0.02, 0, signed=True)
    const = tensor("const", (heads, length, dim), 0.01, 0, signed=True)
    y = tensor("y", (heads, length, dim), 0.03, 128)
    w = rng.integers(-127, 128, (3 * e, e)).astype(np.int8)
    b = rng.integers(-500, 500, 3 * e).astype(np.int32)
    mq = [quantize_multiplier(float(r)) for r in rng.uniform(2e-4, 6e-4, 3 * e)]
    ma, sa = quantize_multiplier(x.scale / (2 * max(ctx.scale, const.scale)))
    ops = [
        layer_norm_op("ln", x, ln, rng.uniform(-1.5, 1.5, e), rng.uniform(-0.3, 0.3, e)),
        ir.Op("linear", "proj", ["ln"], "qkv", ir.Linear(weight=w, bias=b, multiplier=np.array([m for m, _ in mq]),
                                                       shift=np.array([s for _, s in mq]), **clamp(qkv))),
    ]
    for i, (t, piece) in enumerate(((qh, "qh"), (kh, "kh"), (vh, "vh"))):
        flat = tensor(piece + "_flat", (length, e), 0.04, -2, signed=True)
        ops.append(ir.Op("slice", piece + "_slice", ["qkv"], flat.name, ir.Slice(axis=1, start=i * e, stop=(i + 1) * e)))
        ops.append(ir.Op("reshape", piece, [flat.name], t.name, ir.Reshape(shape=t.shape)))
    ops += [
        ir.Op("transpose", "q", ["qh"], "q", ir.Transpose(perm=(1, 0, 2))),
        ir.Op("transpose", "kt", ["kh"], "kt", ir.Transpose(perm=(1, 2, 0))),
        ir.Op("transpose", "v", ["vh"], "v", ir.Transpose(perm=(1, 0, 2))),
    ]
    m, s = quantize_multiplier(q.scale * kt.scale / scores.scale)
    ops.append(ir.Op("matmul", "qk", ["q", "kt"], "scores", ir.Matmul(multiplier=m, shift=s, **clamp(scores))))
    ops.append(softmax_op("softmax", scores, probs, 1 / math.sqrt(dim), causal))
    m, s = quantize_multiplier(probs.scale * v.scale / ctx.scale)
    ops.append(ir.Op("matmul", "pv", ["probs", "v"], "ctx", ir.Matmul(multiplier=m, shift=s, **clamp(ctx))))
    ops.append(ir.Op("constant", "const", [], "const",
                     ir.Constant(value=rng.integers(-127, 128, const.shape).astype(np.int8))))
    twice = 2 * max(ctx.scale, const.scale)
    ma, sa = quantize_multiplier(ctx.scale / twice)
    mb, sb = quantize_multiplier(const.scale / twice)
    m, s = quantize_multiplier(twice / (2 ** 20 * y.scale))
    ops.append(ir.Op("add", "add", ["ctx", "const"], "y", ir.Add(left_shift=20, multiplier_a=ma, shift_a=sa,
                                                                multiplier_b=mb, shift_b=sb, multiplier=m, shift=s,
                                                                **clamp(y))))
    tensors = {t.name: t for t in (x, ln, qkv, qh, kh, vh, q, kt, v, scores, probs, ctx, const, y)}
    for piece in ("qh", "kh", "vh"):
        tensors[piece + "_flat"] = tensor(piece + "_flat", (length, e), 0.04, -2, signed=True)
    return ir.verify(ir.Graph(["x"], ["y"], tensors, ops))


def embedding_graph(seed: int = 0, vocab: int = 200, ids_bits: int = 8, length: int = 6, dim: int = 8) -> ir.Graph:
    """ids (L,) → embedding (vocab, E) → add a constant positional table → LayerNorm → linear to vocab logits;
    ids past the table (vocab < 2^ids_bits) read its last row."""
    rng = np.random.default_rng(seed)
    ids = tensor("ids", (length,), 1.0, 0, bits=ids_bits)
    tok, pos = tensor("tok", (length, dim), 0.02, 0, signed=True), tensor("pos", (length, dim), 0.01, 0, signed=True)
    h = tensor("h", (length, dim), 0.03, 0, signed=True)
    ln = tensor("ln", (length, dim), 0.03, 0, signed=True)
    logits = tensor("logits", (length, vocab), 0.1, 0, signed=True)
    twice = 2 * max(tok.scale, pos.scale)
    ma, sa = quantize_multiplier(tok.scale / twice)
    mb, sb = quantize_multiplier(pos.scale / twice)
    m, s = quantize_multiplier(twice / (2 ** 20 * h.scale))
    mq = [quantize_multiplier(float(r)) for r in rng.uniform(2e-4, 6e-4, vocab)]
    ops = [
        ir.Op("embedding", "tok", ["ids"], "tok", ir.Embedding(table=rng.integers(-127, 128, (vocab, dim)).astype(np.int8))),
        ir.Op("constant", "pos", [], "pos", ir.Constant(value=rng.integers(-127, 128, (length, dim)).astype(np.int8))),
        ir.Op("add", "h", ["tok", "pos"], "h", ir.Add(left_shift=20, multiplier_a=ma, shift_a=sa, multiplier_b=mb,
                                                    shift_b=sb, multiplier=m, shift=s, **clamp(h))),
        layer_norm_op("ln", h, ln, rng.uniform(-1.5, 1.5, dim), rng.uniform(-0.3, 0.3, dim)),
        ir.Op("linear", "head", ["ln"], "logits", ir.Linear(
            weight=rng.integers(-127, 128, (vocab, dim)).astype(np.int8), bias=rng.integers(-500, 500, vocab).astype(np.int32),
            multiplier=np.array([m for m, _ in mq]), shift=np.array([s for _, s in mq]), **clamp(logits))),
    ]
    return ir.verify(ir.Graph(["ids"], ["logits"], {t.name: t for t in (ids, tok, pos, h, ln, logits)}, ops))
