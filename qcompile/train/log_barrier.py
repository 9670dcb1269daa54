"""The log-barrier loss of LogBTQ: soft constraints that keep narrow accumulators from overflowing.

ψ_t is the log-barrier extension of a constraint z <= 0 (Kervadec et al. 2019):
    ψ_t(z) = −(1/t)·log(−z)                    if z <= −1/t²
           = t·z − (1/t)·log(1/t²) + 1/t        otherwise,
continuous with a continuous slope (t at z = −1/t²), finite everywhere and linear past the
barrier, so a violated constraint gives a bounded, constant pull and never an inf. As t grows
it approaches the hard constraint. Constraints are normalized, z = |value|/A − 1 with
A = 2^(b−1) − 1 the accumulator's largest value, so z ∈ [−1, ∞) and ψ_t(z) >= 0 = ψ_t(−1).

Per accumulator op (see docs/narrow_accumulators.md for the derivation):
  (a) tail term, weight `barrier_weight`: the mean of ψ_t(|S|/A − 1) over the exact accumulators
      S = bias_int + Σ w_int·x_int of the last training batch (the realized values whose tail
      overflows); its gradient reaches the weights and, through the activations, earlier layers;
  (b) bound term, weight `barrier_bound_weight`: the mean over output channels of
      ψ_t((Σ|w_int|·max|x_int| + |bias_int|)/A − 1), the worst case for the current input range,
      <= 0 exactly when no input can overflow the channel. With a "current" symmetric weight
      grid, w_int = w·qmax/max|w| is taken with its scale, so the term is scale invariant and
      reshapes (sparsifies) a channel instead of shrinking it.
t = barrier_t0 · barrier_growth^⌊step / barrier_interval⌋, step = training calls of the loss.
"""
from __future__ import annotations

import torch
from torch import nn

from qcompile.core.accumulator import acc_range

PEAK_FLOOR = 1e-8   # a channel whose weights all vanish has no integer grid to speak of


def psi(z: torch.Tensor, t) -> torch.Tensor:
    """The log-barrier extension ψ_t(z) of the constraint z <= 0 (elementwise)."""
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    edge = 1.0 / t ** 2
    inside = -torch.log(torch.clamp(-z, min=edge)) / t
    outside = t * z - torch.log(edge) / t + 1.0 / t
    return torch.where(z <= -edge, inside, outside)


class LogBarrier(nn.Module):
    """The log-barrier loss over a set of NarrowAccOp modules (held by reference: they live in the
    graph). forward() takes no argument and consumes what each op saw in its last training forward."""

    def __init__(self, ops, weight: float, bound_weight: float, t0: float, growth: float, interval: int):
        super().__init__()
        self.ops = tuple(ops)
        self.weight, self.bound_weight = float(weight), float(bound_weight)
        self.t0, self.growth, self.interval = float(t0), float(growth), int(interval)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"{len(self.ops)} ops, weight={self.weight}, bound_weight={self.bound_weight}, "
                f"t={self.t:.4g} (t0={self.t0}, ×{self.growth} every {self.interval} steps)")

    @property
    def t(self) -> float:
        return self.t0 * self.growth ** (int(self.step) // self.interval)

    def tail_term(self, op, seen, t) -> torch.Tensor:
        A = acc_range(op.acc_bits)[1]
        return psi(seen["exact"].abs() / A - 1.0, t).mean()

    def bound_term(self, op, seen, t) -> torch.Tensor:
        A = acc_range(op.acc_bits)[1]
        w = seen["b"]
        wq, xq = op.grids[1], op.grids[0]
        if wq.estimator.name == "current" and wq.symmetric:
            absw = w.abs().reshape(w.shape[0], -1)
            peak = absw.amax(1) if wq.axis is not None else absw.amax().expand(w.shape[0])
            sw = torch.clamp(peak, min=PEAK_FLOOR) / wq.qrange[1]
        else:
            sw = wq.scale.detach().expand(w.shape[0]) if wq.scale.dim() == 0 else wq.scale.detach()
        w_int = w.reshape(w.shape[0], -1) / sw.unsqueeze(1)
        bias = seen["bias"]
        bias_int = None
        if bias is not None:  # int32, as the op stores it (a clamped bias passes no gradient)
            bias_int = torch.clamp(bias / (xq.scale.detach() * sw), -2 ** 31, 2 ** 31 - 1)
        whole, _ = op.worst_case(w_int, bias_int)
        return psi(whole / A - 1.0, t).mean()

    def forward(self) -> torch.Tensor:
        t = self.t
        total = None
        for op in self.ops:
            seen = op.pop_pending()
            if seen is None:
                continue
            term = self.weight * self.tail_term(op, seen, t)
            if op.kind != "matmul" and self.bound_weight:
                term = term + self.bound_weight * self.bound_term(op, seen, t)
            total = term if total is None else total + term
        if self.training and torch.is_grad_enabled():
            self.step += 1
        if total is None:
            return self.step.new_zeros((), dtype=torch.float32)
        return total
