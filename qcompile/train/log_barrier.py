"""The log-barrier loss of LogBTQ: soft constraints that keep narrow accumulators from overflowing.

ψ_t is the log-barrier extension of a constraint z <= 0 (Kervadec et al. 2019):
    ψ_t(z) = −(1/t)·log(−z)                    if z <= −1/t²
           = t·z − (1/t)·log(1/t²) + 1/t        otherwise,
continuous with a continuous slope (t at z = −1/t²), finite everywhere and linear past the
barrier, so a violated constraint gives a bounded, constant pull and never an inf. As t grows
it approaches the hard constraint. Constraints are normalized, z = |value|/A − 1 with
A = 2^(b−1) − 1 the accumulator's largest value, so z ∈ [−1, ∞) and ψ_t(z) >= 0 = ψ_t(−1).

Per accumulator op (see docs/narrow_accumulators.md for the derivation), with the weights of the
op's own layer (`QConfig.overrides` can set them per layer):
  (a) tail term, weight `barrier_weight`: the mean of ψ_t(|S|/A − 1) over the exact accumulators
      S = bias_int + Σ w_int·x_int of the last training batch (the realized values whose tail
      overflows); its gradient reaches the weights and, through the activations, earlier layers;
  (b) bound term, weight `barrier_bound_weight`: the mean over output channels of
      ψ_t((Σ|w_int|·max|x_int| + |bias_int|)/A − 1), the worst case for the current input range,
      <= 0 exactly when no input can overflow the channel. With a "current" symmetric weight
      grid, w_int = w·qmax/max|w| is taken with its scale, so the term is scale invariant and
      reshapes (sparsifies) a channel instead of shrinking it.
t = barrier_t0 · barrier_growth^⌊step / barrier_interval⌋, step = training forwards of the graph so far.

Wiring (the `regularize` pass; the barrier holds no reference to another module): one node of
the graph, after every accumulator op, calls `regularizers.log_barrier` with one tuple per op
that keeps its exact accumulator,
    (exact, b, bias, a_scale, a_zero_point, b_scale)
— exact = getitem(op, 1), the op's own b and bias operands and the get_attr nodes of its
operands' scale / zero-point buffers (the same nodes the op reads). What is fixed at compile
time (per op: layer, kind, acc_bits, tile, the input grid's code range, the weight grid's qmax,
whether it is a "current" symmetric grid and per channel) is a `BarrierSite`, a constructor
argument. In a training forward (training mode, gradients on) the node computes the loss term
and counts a step; `take()` (what `qm.regularization()` calls) hands that term over once — one
term per training forward, 0 when the last one has been taken or none ran.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcompile.core.accumulator import acc_range
from qcompile.train.tiled import grid_absmax, worst_case

PEAK_FLOOR = 1e-8   # a channel whose weights all vanish has no integer grid to speak of


def psi(z: torch.Tensor, t) -> torch.Tensor:
    """The log-barrier extension ψ_t(z) of the constraint z <= 0 (elementwise)."""
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    edge = 1.0 / t ** 2
    inside = -torch.log(torch.clamp(-z, min=edge)) / t
    outside = t * z - torch.log(edge) / t + 1.0 / t
    return torch.where(z <= -edge, inside, outside)


@dataclass(frozen=True)
class BarrierSite:
    """What the barrier knows of one accumulator op at compile time (`regularize` takes it from the
    op node's meta["qc_accumulator"], which `narrow_acc` recorded)."""
    layer: str
    kind: str                          # conv1d / conv2d / linear / matmul (matmul: no bound term)
    acc_bits: int
    tile: int | None
    a_qrange: tuple[int, int]          # code range of the input (a) grid
    weight_qmax: int                   # largest code of the weight (b) grid
    weight_current: bool               # the weight grid is a "current" symmetric one (scale from w itself)
    weight_per_channel: bool           # ... with one scale per output channel
    weight: float                      # λ of this op's tail term (the layer's `barrier_weight`)
    bound_weight: float                # λ of this op's bound term (the layer's `barrier_bound_weight`)


class LogBarrier(nn.Module):
    """The log-barrier loss over the accumulator ops of `sites` (in the order of the node's arguments).

    forward(*seen), one tuple (exact, b, bias, a_scale, a_zero_point, b_scale) per site, is called
    by a node of the graph: in a training forward it computes the term, keeps it for `take()` and
    counts a step (the schedule); otherwise it does nothing and returns None. An op that ran as the
    float op (quantization off) passes exact=None and adds nothing."""

    def __init__(self, sites, t0: float, growth: float, interval: int):
        super().__init__()
        self.sites = tuple(sites)
        self.t0, self.growth, self.interval = float(t0), float(growth), int(interval)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.pending = None                # the term of the last training forward, until take()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["pending"] = None            # autograd graphs are not state
        return state

    def extra_repr(self) -> str:
        weights = sorted({(s.weight, s.bound_weight) for s in self.sites})
        shown = ", ".join(f"weight={w:g}, bound_weight={b:g}" for w, b in weights)
        return f"{len(self.sites)} ops, {shown}, t={self.t:.4g} (t0={self.t0}, ×{self.growth} every {self.interval} steps)"

    @property
    def t(self) -> float:
        return self.t0 * self.growth ** (int(self.step) // self.interval)

    def tail_term(self, site: BarrierSite, exact, t) -> torch.Tensor:
        A = acc_range(site.acc_bits)[1]
        return psi(exact.abs() / A - 1.0, t).mean()

    def bound_term(self, site: BarrierSite, b, bias, a_scale, a_zero_point, b_scale, t) -> torch.Tensor:
        A = acc_range(site.acc_bits)[1]
        w = b
        if site.weight_current:
            absw = w.abs().reshape(w.shape[0], -1)
            peak = absw.amax(1) if site.weight_per_channel else absw.amax().expand(w.shape[0])
            sw = torch.clamp(peak, min=PEAK_FLOOR) / site.weight_qmax
        else:
            sw = b_scale.detach().expand(w.shape[0]) if b_scale.dim() == 0 else b_scale.detach()
        w_int = w.reshape(w.shape[0], -1) / sw.unsqueeze(1)
        bias_int = None
        if bias is not None:  # in accumulator units, unsaturated, as the op adds it
            bias_int = bias / (a_scale.detach() * sw)
        whole, _ = worst_case(site.kind, w_int, bias_int, grid_absmax(site.a_qrange, a_zero_point), None, site.tile)
        return psi(whole / A - 1.0, t).mean()

    def forward(self, *seen):
        if len(seen) != len(self.sites):
            raise ValueError(f"LogBarrier over {len(self.sites)} ops called with {len(seen)} argument tuples")
        if not (self.training and torch.is_grad_enabled()):
            return None
        t = self.t
        total = None
        for site, (exact, b, bias, a_scale, a_zero_point, b_scale) in zip(self.sites, seen):
            if exact is None:
                continue
            term = site.weight * self.tail_term(site, exact, t)
            if site.kind != "matmul" and site.bound_weight:
                term = term + site.bound_weight * self.bound_term(site, b, bias, a_scale, a_zero_point, b_scale, t)
            total = term if total is None else total + term
        self.step += 1
        self.pending = total if total is not None else self.step.new_zeros((), dtype=torch.float32)
        return self.pending

    def take(self) -> torch.Tensor:
        """The term the graph computed in the last training forward, once; then 0 until the next one."""
        term, self.pending = self.pending, None
        return term if term is not None else self.step.new_zeros((), dtype=torch.float32)
