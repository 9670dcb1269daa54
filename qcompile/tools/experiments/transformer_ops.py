"""Approximation error of the integer softmax, LayerNorm and GELU (`qcompile.core.rowwise`, tables) against
float, each op alone in an integer graph run by the reference interpreter.

    python -m qcompile.tools.experiments.transformer_ops

For each op, inputs are codes of an 8-bit grid drawn from a realistic distribution (attention logits
~ N(0, σ²), residual-stream rows with per-row offsets and scales); "ideal" is the float op on the
dequantized input, rounded onto the same output grid. Reported: the share of output codes that
differ from ideal and the largest difference, in output steps. LayerNorm is compared with its
affine weight on the op's 8-bit weight grid (the integer arithmetic alone) and with the float weight
(adding the weight's quantization).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from qcompile import ir
from qcompile.backends import reference
from qcompile.core.requant import quantize_multiplier
from qcompile.core.rowwise import NORM_BITS, exp_table, layer_norm_eps, softmax_multiplier


def tensor(name, shape, scale, zero_point=0, bits=8, signed=False) -> ir.Tensor:
    return ir.Tensor(name, tuple(shape), bits, signed, float(scale), int(zero_point))


def clamp(t: ir.Tensor) -> dict:
    return {"act_min": t.qmin, "act_max": t.qmax}


def softmax_op(name, x: ir.Tensor, y: ir.Tensor, scale: float = 1.0, causal: bool = False,
               visible: np.ndarray | None = None) -> ir.Op:
    """softmax(scale·x) over x's last axis onto y's grid (hidden entries: causal, and visible == 0)."""
    return ir.Op("softmax", name, [x.name], y.name, ir.Softmax(table=exp_table(x.scale * scale),
                                                              out_multiplier=softmax_multiplier(y.scale),
                                                              causal=causal, visible=visible, **clamp(y)))


def gamma_codes(gamma: np.ndarray, bits: int = 8) -> tuple[np.ndarray, float]:
    """(codes, scale) of a LayerNorm weight on a symmetric per-tensor grid."""
    qmax = 2 ** (bits - 1) - 1
    scale = float(np.abs(gamma).max()) / qmax
    return np.clip(np.round(gamma / scale), -qmax, qmax).astype(np.int64), scale


def layer_norm_op(name, x: ir.Tensor, y: ir.Tensor, gamma: np.ndarray, beta: np.ndarray, eps=1e-5,
                  gamma_bits=8, centered: bool = True) -> ir.Op:
    """LayerNorm (RMSNorm when not `centered`) over x's last axis with float gamma/beta, gamma on a
    symmetric per-tensor grid."""
    n = x.shape[-1]
    codes, s_g = gamma_codes(gamma, gamma_bits)
    unit = s_g * math.sqrt(n) / 2 ** NORM_BITS
    m, s = quantize_multiplier(unit / y.scale)
    return ir.Op("layer_norm", name, [x.name], y.name, ir.LayerNorm(
        weight=codes, bias=np.round(beta / unit).astype(np.int64), eps=layer_norm_eps(eps, n, x.scale),
        multiplier=m, shift=s, centered=centered, **clamp(y)))


def _one_op(op: ir.Op, x: ir.Tensor, y: ir.Tensor) -> ir.Graph:
    return ir.verify(ir.Graph([x.name], [y.name], {x.name: x, y.name: y}, [op]))


def _errors(codes: np.ndarray, ideal: torch.Tensor, y: ir.Tensor) -> dict:
    want = np.clip(np.round(ideal.numpy() / y.scale) + y.zero_point, y.qmin, y.qmax)
    diff = np.abs(codes - want)
    return {"mismatch": float((diff > 0).mean()), "max_steps": int(diff.max())}


def softmax_errors(sigma: float, length: int = 64, out_bits: int = 8, causal: bool = False, rows: int = 4096,
                   seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, sigma, (rows // length, length, length))
    scale = 6 * sigma / 255                                           # the ±3σ range on 8 bits
    x = tensor("x", (length, length), scale, 128)
    y = tensor("y", (length, length), 1 / (2 ** out_bits - 1), 0, bits=out_bits)
    codes = np.clip(np.round(logits / scale) + 128, 0, 255).astype(np.int64)
    out = reference.run_codes(_one_op(softmax_op("softmax", x, y, causal=causal), x, y), codes)
    real = torch.tensor((codes - 128) * scale)
    if causal:
        real = real.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return _errors(out, torch.softmax(real, -1), y)


def layer_norm_errors(n: int, rows: int = 2048, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h = rng.normal(0, 1, (rows, n)) * rng.uniform(0.5, 2, (rows, 1)) + rng.normal(0, 1, (rows, 1))
    h[:, rng.integers(0, n, 2)] *= 6                                 # outlier channels, as residual streams have
    scale = float(np.abs(h).max()) / 127
    x = tensor("x", (n,), scale, 128)
    gamma, beta = rng.normal(1, 0.3, n), rng.normal(0, 0.2, n)
    codes = np.clip(np.round(h / scale) + 128, 0, 255).astype(np.int64)
    hq = torch.tensor((codes - 128) * scale)
    g_codes, s_g = gamma_codes(gamma)
    float_out = F.layer_norm(hq, (n,), torch.tensor(g_codes * s_g), torch.tensor(beta), 1e-5)
    y = tensor("y", (n,), float(float_out.abs().max()) / 127, 0, signed=True)
    out = reference.run_codes(_one_op(layer_norm_op("ln", x, y, gamma, beta), x, y), codes)
    with_float_weight = F.layer_norm(hq, (n,), torch.tensor(gamma), torch.tensor(beta), 1e-5)
    return {**_errors(out, float_out, y), "vs float weight": _errors(out, with_float_weight, y)}


def gelu_errors(in_scale: float = 8 / 255) -> dict:
    """GELU is a table computed by the trained graph's own function on every input code: ideal by construction."""
    x = tensor("x", (256,), in_scale, 128)
    real = (torch.arange(256, dtype=torch.float32) - 128) * torch.tensor(in_scale, dtype=torch.float32)
    ideal = F.gelu(real)
    y = tensor("y", (256,), float(ideal.abs().max()) / 127, 0, signed=True)
    table = np.clip(np.round(ideal.numpy() / y.scale), y.qmin, y.qmax).astype(np.int64)
    graph = _one_op(ir.Op("lut", "gelu", ["x"], "y", ir.Lut(table=table)), x, y)
    return _errors(reference.run_codes(graph, np.arange(256)[None]), ideal, y)


def main() -> None:
    print("softmax over rows of 64 (8-bit input on ±3σ, output grid 1/(2^b − 1)):")
    print("| logits σ | causal | output bits | codes ≠ ideal | max steps |\n|---:|:---:|---:|---:|---:|")
    for sigma in (0.5, 2.0, 8.0):
        for causal in (False, True):
            for bits in (8, 16):
                e = softmax_errors(sigma, out_bits=bits, causal=causal)
                print(f"| {sigma} | {'yes' if causal else 'no'} | {bits} | {100 * e['mismatch']:.3f} % | {e['max_steps']} |")
    print("\nLayerNorm (8-bit input with outlier channels, 8-bit output; weight on its 8-bit grid / float):")
    print("| N | codes ≠ ideal | max steps | vs float weight: ≠ | max steps |\n|---:|---:|---:|---:|---:|")
    for n in (64, 384, 768):
        e = layer_norm_errors(n)
        f = e["vs float weight"]
        print(f"| {n} | {100 * e['mismatch']:.3f} % | {e['max_steps']} | {100 * f['mismatch']:.3f} % | {f['max_steps']} |")
    e = gelu_errors()
    print(f"\nGELU (table over the 256 input codes on ±4): codes ≠ ideal {100 * e['mismatch']:.3f} %, "
          f"max {e['max_steps']} steps")


if __name__ == "__main__":
    main()
