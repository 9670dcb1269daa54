"""The log-barrier loss: ψ_t's properties, its place in qm.regularization(), its schedule, and the
property it exists for — driving overflow events down."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile.errors import QCompileError
from qcompile.train.log_barrier import LogBarrier, psi
from qcompile.core.accumulator import acc_range
from qcompile.train.tiled import NarrowAccOp

torch.set_num_threads(1)
T_VALUES = st.floats(0.5, 200.0)


@settings(max_examples=60, deadline=None)
@given(T_VALUES, st.floats(-1.0, 1e6))
def test_psi_is_finite_continuous_and_linear_past_the_barrier(t, z):
    zt = torch.tensor([z], dtype=torch.float64)
    value = psi(zt, t)
    assert torch.isfinite(value).all()
    edge = -1.0 / t ** 2
    left, right = psi(torch.tensor([edge - 1e-9], dtype=torch.float64), t), psi(torch.tensor([edge + 1e-9],
                                                                                            dtype=torch.float64), t)
    assert abs(float(left - right)) < 1e-6 * max(1.0, t)
    if z > edge:
        zz = zt.clone().requires_grad_(True)
        psi(zz, t).sum().backward()
        assert math.isclose(float(zz.grad), t, rel_tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.floats(-0.99, -0.01), st.floats(0.01, 10.0))
def test_psi_approaches_the_hard_constraint(z_inside, z_outside):
    """As t grows, ψ_t → 0 on feasible points and → ∞ on violated ones; ψ_t(-1) = 0 (an empty accumulator)."""
    ts = [1.0, 10.0, 100.0, 1000.0]
    inside = [float(psi(torch.tensor(z_inside, dtype=torch.float64), t)) for t in ts if -1 / t ** 2 > z_inside]
    outside = [float(psi(torch.tensor(z_outside, dtype=torch.float64), t)) for t in ts]
    assert all(a >= b - 1e-12 for a, b in zip(inside, inside[1:])) and inside[-1] < 1e-2
    assert all(v >= t * z_outside for v, t in zip(outside, ts)) and outside[-1] > outside[-2]
    assert float(psi(torch.tensor(-1.0), 7.0)) == pytest.approx(0.0, abs=1e-6)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen)
    y = (x[:, :4].argmax(1))
    return x, y


def _train(qm, x, y, steps, use_barrier=True):
    opt = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
    qm.train()
    for i in range(steps):
        idx = slice((i * 32) % 256, (i * 32) % 256 + 32)
        loss = F.cross_entropy(qm(x[idx]), y[idx])
        if use_barrier:
            loss = loss + qm.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _eval_events(qm, x):
    ops = [m for m in qm.modules() if isinstance(m, NarrowAccOp)]
    for op in ops:
        op.reset_overflow_stats()
    qm.eval()
    with torch.no_grad():
        qm(x)
    return sum(op.overflow_stats()["eval"]["events"] for op in ops)


def _compile(**cfg):
    torch.manual_seed(0)
    x, _ = _data()
    cfg = {"acc_bits": 14, "tile": 8, **cfg}
    return qcompile.compile(MLP(), (x[:2],), qcompile.QConfig(seed=0, **cfg))


def test_barrier_is_registered_and_summed_by_regularization():
    qm = _compile(log_barrier=True, barrier_weight=0.5, barrier_bound_weight=0.25)
    barrier = qm.regularizers["log_barrier"]
    assert isinstance(barrier, LogBarrier) and len(barrier.ops) == 2
    x, y = _data()
    qm.train()
    qm(x[:32])
    seen = {op: op._pending for op in barrier.ops}
    t = barrier.t
    expected = sum(0.5 * barrier.tail_term(op, seen[op], t) + 0.25 * barrier.bound_term(op, seen[op], t)
                   for op in barrier.ops)
    reg = qm.regularization()
    torch.testing.assert_close(reg, expected)
    reg.backward()
    assert qm.fc1.weight.grad is not None and qm.fc1.weight.grad.abs().sum() > 0
    assert float(qm.regularization()) == 0.0          # consumed: one loss per training step
    assert "log_barrier" not in _compile().regularizers


def test_bound_term_is_zero_side_exactly_when_no_input_can_overflow():
    """z_b <= 0 ⇔ Σ|w_int|·max|x_int| + |bias_int| <= A: then no input on the grid overflows."""
    qm = _compile(log_barrier=True, weight_bits=3, act_bits=3, tile=4)
    x, _ = _data()
    qm.train()
    qm(x)
    for op in qm.regularizers["log_barrier"].ops:
        seen = op.pop_pending()
        w_int = torch.round(seen["b"].detach() / op.grids[1].scale.view(-1, 1))
        whole = w_int.abs().sum(1) * op.input_absmax(0)
        A = acc_range(op.acc_bits)[1]
        assert float(whole.max()) <= A                    # 3-bit operands into 14 bits: feasible
        # every input on the grid, including the adversarial one, stays in range
        xq = op.grids[0]
        extremes = torch.where(w_int >= 0, xq.qrange[1] - xq.zero_point, xq.qrange[0] - xq.zero_point)
        assert float((w_int * extremes).sum(1).abs().max()) <= A


def test_t_grows_on_schedule_and_only_in_training():
    qm = _compile(log_barrier=True, barrier_t0=2.0, barrier_growth=1.5, barrier_interval=3)
    barrier = qm.regularizers["log_barrier"]
    x, y = _data()
    _train(qm, x, y, 7)
    assert int(barrier.step) == 7 and barrier.t == pytest.approx(2.0 * 1.5 ** 2)
    qm.eval()
    qm.regularization()
    assert int(barrier.step) == 7
    state = qm.state_dict()
    assert "regularizers.log_barrier.step" in state


def test_barrier_cuts_overflow_events_tenfold():
    x, y = _data()
    cfg = dict(weight_bits=6, act_bits=6, acc_bits=11, tile=8)
    plain = _compile(**cfg)
    _train(plain, x, y, 60, use_barrier=False)
    with_barrier = _compile(**cfg, log_barrier=True, barrier_weight=0.05, barrier_bound_weight=1e-2)
    _train(with_barrier, x, y, 60)
    before, after = _eval_events(plain, x), _eval_events(with_barrier, x)
    assert before > 0 and after * 10 <= before


def test_zero_saturated_stops_the_task_gradient_but_not_the_barrier():
    """acc_grad="zero_saturated" zeroes the task loss's gradient at overflowed outputs only: the tail term
    still pulls on them, with the gradient it has under "ste" (the layer's own term, fc2 here)."""
    x, y = _data()
    barrier_grad = {}
    for acc_grad in ("ste", "zero_saturated"):
        qm = _compile(acc_bits=6, acc_grad=acc_grad, log_barrier=True, barrier_bound_weight=0.0)
        qm.train()
        task = F.cross_entropy(qm(x[:32]), y[:32])
        ops = qm.regularizers["log_barrier"].ops
        assert all(op.overflowed_train == op.outputs_train for op in ops)   # every output saturated
        task_grad, = torch.autograd.grad(task, qm.fc2.weight, retain_graph=True)
        assert (task_grad.abs().sum() == 0) == (acc_grad == "zero_saturated")
        barrier_grad[acc_grad], = torch.autograd.grad(qm.regularization(), qm.fc2.weight)
    assert barrier_grad["zero_saturated"].abs().sum() > 0
    torch.testing.assert_close(barrier_grad["zero_saturated"], barrier_grad["ste"])


def test_barrier_without_accumulators_is_an_error():
    with pytest.raises(QCompileError, match="acc_bits"):
        qcompile.compile(MLP(), (torch.randn(2, 32),), log_barrier=True)
