"""torch.compile(qm): one graph for the training step and for eval (no graph break: `fullgraph=True`),
the same numbers as eager, and the error checks kept as assertions in the graph."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile


class ResidualNet(nn.Module):
    """Conv-BN-ReLU, a residual conv-BN block and a linear head: folded BN, per-channel weights,
    in-hindsight activations, stochastically rounded gradients."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        return self.fc(F.relu(self.bn2(self.c2(h)) + h).flatten(1))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def _steps(model, forward, x, y, n):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _twins(**config):
    torch.manual_seed(0)
    x, y = _data()
    qm = qcompile.compile(ResidualNet(), (x[:2],), qcompile.QConfig(grad_bits=8, seed=0, **config)).train()
    return qm, copy.deepcopy(qm), x, y


@pytest.fixture
def twin_models():
    return _twins()


# fullgraph: a graph break raises. The narrow-accumulator ops (native kernels) and the DSGC search
# (Python control flow on measured cosines) run eagerly, one graph break each.
@pytest.mark.parametrize("config, fullgraph", [({}, True), ({"acc_bits": 12, "tile": 8}, False),
                                               ({"grad_range": "dsgc", "dsgc_interval": 2}, False)],
                         ids=["default", "narrow-acc", "dsgc"])
def test_compiled_training_and_eval_give_eager_numbers(config, fullgraph):
    qm, twin, x, y = _twins(**config)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=fullgraph)
    eager_losses = _steps(qm, qm, x, y, 4)
    compiled_losses = _steps(twin, compiled, x, y, 4)
    assert torch.equal(eager_losses, compiled_losses)
    a, b = qm.state_dict(), twin.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"state after 4 steps differs in {different}"   # estimators, BN statistics, weights
    qm.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(qm(x), compiled(x))


def test_one_inductor_train_step_and_eval_match_eager(twin_models):
    qm, twin, x, y = twin_models
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    eager_losses = _steps(qm, qm, x, y, 2)
    compiled_losses = _steps(twin, compiled, x, y, 2)
    # inductor reorders float reductions (BN statistics, gradient sums): equal to rounding, not bit for bit
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (name, u), v in zip(qm.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    qm.eval(), twin.eval()
    with torch.no_grad():
        eager_out, compiled_out = qm(x), compiled(x)
    step = qm.get_submodule("fc.output_quant").scale
    assert float((eager_out - compiled_out).abs().max()) <= float(step) * 1.001   # at most one code apart


def test_compiled_graph_keeps_the_nonfinite_and_calibration_checks(twin_models):
    qm, _, x, y = twin_models
    torch._dynamo.reset()
    compiled = torch.compile(qm, backend="aot_eager")   # (with fullgraph=True, dynamo masks an error raised at run time)
    _steps(qm, compiled, x, y, 1)
    est = qm.get_submodule("c1.input_quant").estimator
    before = (est.lo.clone(), est.hi.clone(), int(est.nonfinite))
    with pytest.raises(RuntimeError, match="activation quantizer of layer 'c1': NaN or Inf"):
        compiled(torch.full_like(x, float("nan")))
    assert torch.equal(est.lo, before[0]) and torch.equal(est.hi, before[1])
    fresh = qcompile.compile(ResidualNet(), (x[:2],), qcompile.QConfig(grad_bits=8)).eval()
    with pytest.raises(RuntimeError, match="no range yet"):
        torch.compile(fresh, backend="aot_eager")(x)
