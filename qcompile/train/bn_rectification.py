"""BN rectification: the noise gain of a fused conv/linear-BN block, the loss that keeps it
at most 1, and its measurement on a probe batch. Derivation: docs/bn_rectification.md.

For a block out = BN(z), z = W∗x, BatchNorm's backward per channel c (its m values) is
∂L/∂z_c = (γ_c/σ_c)·P·g_c with P = I − 11ᵀ/m − x̂_c x̂_cᵀ/m, a projection of rank m − 2.
Gradient-quantization noise ε (independent, zero mean, variance v per element) arriving
with g leaves the block into the previous layer as Wᵀ∗((γ/σ)·P·ε), with expected energy
Σ_c (γ_c/σ_c)²·‖W_c‖²·(m − 2)·v against C·m·v arriving. The block's noise gain is

    A² = (1/C) Σ_c a_c²,      a_c² = (γ_c·‖W_c‖/σ_c)² · (1 − 2/m)

(factor 1 instead of 1 − 2/m with frozen / running statistics, where there is no P). For a
conv with padding, ‖W_c‖² is weighted per kernel tap by the fraction of output positions at
which that tap reads inside the input (taps on padding carry no gradient back).
σ_c = std(W_c·x) scales with W_c, so a_c does not change when W is rescaled: the network
cannot lower it by growing W under the BN. The loss is the mean over the blocks whose
gradient reaches an earlier layer of λ·max(0, A² − 1) (a mean, so λ means the same for a
shallow and a deep network).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.train.fused_bn import BatchNormFold
from qcompile.train.quantizers import Quantizer


def fused_blocks(qm: nn.Module) -> list[tuple[str, BatchNormFold]]:
    return [(n, m) for n, m in qm.named_modules() if isinstance(m, BatchNormFold)]


class BNRectificationLoss(nn.Module):
    """mean over the blocks of λ_b·max(0, A_b² − 1), from the gains of the last forward pass.

    The blocks are referenced, not owned (a plain list), so they are not registered twice; λ_b is
    each block's own `rectification` (set when `fold_bn` made it)."""

    def __init__(self, blocks: list[tuple[str, BatchNormFold]]):
        super().__init__()
        if not blocks:
            raise ValueError("BNRectificationLoss needs at least one BatchNormFold block")
        self.blocks = list(blocks)

    def extra_repr(self) -> str:
        return ", ".join(f"{n} (λ={b.rectification:g})" for n, b in self.blocks)

    def forward(self) -> torch.Tensor:
        terms = []
        for name, block in self.blocks:
            if block.gain_sq is None:
                raise RuntimeError(f"BN rectification: block {name!r} has not run yet; call the model on a batch "
                                   "before qm.regularization()")
            terms.append(block.rectification * torch.relu(block.gain_sq.mean() - 1.0))
        return torch.stack(terms).mean()


def add_bn_rectification(qm: nn.Module) -> None:
    """Register the BN-rectification loss in `qm.regularizers["bn_rectification"]` over the fused blocks
    with λ > 0 (`fold_bn` sets each block's λ from `bn_rectification` of its config, 0 for a block whose
    input is a graph input: no gradient leaves it). Reads the blocks, changes none; nothing is
    registered (and a stale term is removed) when no block has a term."""
    terms = [(name, block) for name, block in fused_blocks(qm) if block.rectification > 0]
    if terms:
        qm.regularizers["bn_rectification"] = BNRectificationLoss(terms)
    elif "bn_rectification" in qm.regularizers:
        del qm.regularizers["bn_rectification"]


# ---- diagnostics -------------------------------------------------------------------------------

@contextlib.contextmanager
def _state_restored(qm: nn.Module):
    """Run probes without side effects: buffers (ranges, BN statistics), quantizer switches and the
    random generators stochastic rounding draws from are restored on exit."""
    buffers = [(b, b.clone()) for b in qm.buffers()]
    quantizers = [m for m in qm.modules() if isinstance(m, Quantizer)]
    switches = [(q, q.enabled, q.observing) for q in quantizers]
    generators = {id(q.generator): (q.generator, q.generator.get_state()) for q in quantizers if q.generator}
    cpu_rng = torch.get_rng_state()
    blocks = fused_blocks(qm)
    gains = [(b, b.gain_sq) for _, b in blocks]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for q, enabled, observing in switches:
            q.enabled, q.observing = enabled, observing
        for gen, state in generators.values():
            gen.set_state(state)
        torch.set_rng_state(cpu_rng)
        for b, g in gains:
            b.gain_sq = g


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of the nodes in `watch`."""

    def __init__(self, gm: fx.GraphModule, watch):
        super().__init__(gm)
        self.watch, self.values = set(watch), {}

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.watch:
            self.values[n] = value
        return value


def _gradient_quantizers(qm) -> list[Quantizer]:
    qs = [m for m in qm.modules() if isinstance(m, Quantizer) and m.kind == "gradient" and m.enabled]
    if not qs:
        raise ValueError("noise diagnostics need enabled gradient quantizers: compile with grad_bits set")
    return qs


def _set(quantizers, enabled: bool) -> None:
    for q in quantizers:
        q.enabled = enabled


def _fused_nodes(qm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in qm.graph.nodes if n.op == "call_module" and isinstance(qm.get_submodule(n.target), BatchNormFold)]


def _backward(out: torch.Tensor, inp: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Jᵀ·grad_out: the gradient `grad_out` at `out` carried back to `inp` (graph kept)."""
    return torch.autograd.grad(out, inp, grad_outputs=grad_out, retain_graph=True)[0]


def noise_amplification(qm: fx.GraphModule, inputs: torch.Tensor, target: torch.Tensor, loss_fn=F.cross_entropy,
                        ) -> dict[str, dict[str, float]]:
    """Per fused block (by BN path) whose gradient reaches an earlier layer: the measured noise gain
    ‖Jᵀe‖/‖e‖ ("measured"), with e the gradient error at the block's output (gradient quantizers on
    minus off, same forward pass) and Jᵀ the block's backward into its input; the predicted gain A
    ("predicted"); the gain of the float gradient g itself, ‖Jᵀg‖/‖g‖ ("signal"); and ‖e‖.
    measured/signal > 1 means the block raises the relative gradient error.

    Runs in train mode on one probe batch; the model's state is left exactly as it was, and each
    block keeps its measured gain for `qm.summary()`."""
    grad_qs = _gradient_quantizers(qm)
    nodes = [n for n in _fused_nodes(qm) if qm.get_submodule(n.target).propagates_gradient]
    if not nodes:
        return {}
    was_training = qm.training
    qm.train()
    try:
        with _state_restored(qm):
            _set(grad_qs, False)
            out = _Recorder(qm, nodes)
            grads_f = torch.autograd.grad(loss_fn(out.run(inputs), target), [out.values[n] for n in nodes])
        with _state_restored(qm):
            _set(grad_qs, True)
            rec = _Recorder(qm, nodes + [n.args[1] for n in nodes])
            loss = loss_fn(rec.run(inputs), target)
            outs = [rec.values[n] for n in nodes]
            grads_q = torch.autograd.grad(loss, outs, retain_graph=True)
            result = {}
            for n, o, gq, gf in zip(nodes, outs, grads_q, grads_f):
                block = qm.get_submodule(n.target)
                err_out = gq - gf
                x_in = rec.values[n.args[1]]
                err_in, sig_in = _backward(o, x_in, err_out), _backward(o, x_in, gf)
                result[n.target] = {"measured": float(err_in.norm() / err_out.norm().clamp_min(1e-30)),
                                    "predicted": float(block.gain_sq.detach().mean().sqrt()),
                                    "signal": float(sig_in.norm() / gf.norm().clamp_min(1e-30)),
                                    "error_norm": float(err_out.norm())}
        for name, r in result.items():
            qm.get_submodule(name).measured_gain = (r["measured"], r["signal"])
        return result
    finally:
        qm.train(was_training)


def weight_gradient_error(qm: fx.GraphModule, inputs: torch.Tensor, target: torch.Tensor, layer: str,
                          loss_fn=F.cross_entropy) -> dict[str, float]:
    """‖∇W(quantized gradients) − ∇W(float gradients)‖ of `layer`'s weight on one probe batch (same
    forward pass; absolute and relative to the float gradient's norm). State is left unchanged."""
    grad_qs = _gradient_quantizers(qm)
    weight = qm.get_parameter(f"{layer}.weight")
    was_training = qm.training
    qm.train()
    try:
        grads = []
        for quantized in (False, True):
            with _state_restored(qm):
                _set(grad_qs, quantized)
                grads.append(torch.autograd.grad(loss_fn(qm(inputs), target), weight)[0])
    finally:
        qm.train(was_training)
    err = float((grads[1] - grads[0]).norm())
    return {"abs": err, "rel": err / max(float(grads[0].norm()), 1e-30)}
