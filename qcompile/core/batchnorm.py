"""BatchNorm arithmetic, written once: the per-channel scale γ/σ and the noise gain of a fused
conv/linear-BN block (derivation: docs/bn_rectification.md and `qcompile.train.bn_rectification`).

Invariant: pure functions of tensors; the fused training layer, the rectification loss and
lowering take γ/σ and the gain from here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bn_scale(gamma: torch.Tensor | None, var: torch.Tensor, eps: float) -> torch.Tensor:
    """γ/σ per channel with σ = sqrt(var + eps) (γ = 1 for a BatchNorm without affine)."""
    inv_std = torch.rsqrt(var + eps)
    return inv_std if gamma is None else gamma * inv_std


def _coverage_1d(size: int, k: int, stride: int, pad_left: int, out: int, dilation: int) -> list[float]:
    """Per kernel tap, the fraction of the `out` output positions where it reads inside [0, size)."""
    return [sum(0 <= o * stride - pad_left + t * dilation < size for o in range(out)) / out for t in range(k)]


def tap_coverage(layer_fn, layer_args: tuple, input_shape, weight_shape) -> torch.Tensor | None:
    """Fraction of output positions at which each kernel tap of a conv reads a real input (not padding),
    shaped like the kernel (None for a linear layer or when no tap ever reads padding)."""
    if layer_fn is F.linear:
        return None
    spatial = len(weight_shape) - 2
    stride, padding, dilation = (list(layer_args) + [1, 0, 1])[:3]
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * spatial  # noqa: E731
    stride, dilation = as_tuple(stride), as_tuple(dilation)
    sizes, kernel = input_shape[2:], weight_shape[2:]
    if padding == "valid":
        padding = 0
    if padding == "same":
        pads = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
        outs = tuple(sizes)
    else:
        pads = as_tuple(padding)
        outs = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, p, d, k, s in zip(sizes, pads, dilation, kernel, stride))
    if all(p == 0 for p in pads):
        return None
    cov = torch.ones(())
    for n, k, s, p, o, d in zip(sizes, kernel, stride, pads, outs, dilation):
        cov = cov.unsqueeze(-1) * torch.tensor(_coverage_1d(n, k, s, p, o, d))
    return cov


def channel_gain_sq(gamma: torch.Tensor | None, var: torch.Tensor, eps: float, weight: torch.Tensor,
                    count: int | None, coverage: torch.Tensor | None = None) -> torch.Tensor:
    """a_c² = (γ_c/σ_c)²·‖W_c‖²·(1 − 2/count) per output channel, with ‖W_c‖² weighted by the tap
    `coverage` (see `tap_coverage`) when given; `count` None: no projection (running statistics)."""
    w_sq = weight.pow(2) if coverage is None else weight.pow(2) * coverage.to(weight.dtype)
    gain = bn_scale(gamma, var, eps).pow(2) * w_sq.flatten(1).sum(1)
    return gain if count is None else gain * (1.0 - 2.0 / count)
