"""The log-barrier loss: ψ_t's properties, its place in qm.regularization(), its schedule, and the
property it exists for — driving overflow events down."""
import copy
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile.errors import QCompileError
from qcompile.passes.quantize import grid_source
from qcompile.train.log_barrier import LogBarrier, psi
from qcompile.core.accumulator import acc_range
from qcompile.train.tiled import NarrowAccOp, grid_absmax

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


def _barrier_inputs(qm):
    """Record what the barrier's graph node passes it: one (exact, b, bias, a_scale, a_zp, b_scale) per op."""
    seen = {}
    qm.regularizers["log_barrier"].register_forward_pre_hook(lambda m, args: seen.update(args=args))
    return seen


def test_barrier_is_registered_and_summed_by_regularization():
    qm = _compile(log_barrier=True, barrier_weight=0.5, barrier_bound_weight=0.25)
    barrier = qm.regularizers["log_barrier"]
    assert isinstance(barrier, LogBarrier) and [s.layer for s in barrier.sites] == ["fc1", "fc2"]
    x, y = _data()
    seen = _barrier_inputs(qm)
    qm.train()
    t = barrier.t
    qm(x[:32])
    expected = sum(0.5 * barrier.tail_term(site, args[0], t) + 0.25 * barrier.bound_term(site, *args[1:], t)
                   for site, args in zip(barrier.sites, seen["args"]))
    reg = qm.regularization()
    torch.testing.assert_close(reg, expected)
    reg.backward()
    assert qm.fc1.weight.grad is not None and qm.fc1.weight.grad.abs().sum() > 0
    assert float(qm.regularization()) == 0.0          # taken: one term per training forward
    assert "log_barrier" not in _compile().regularizers


def test_barrier_weights_per_layer_through_overrides():
    qm = _compile(log_barrier=True, barrier_weight=0.5, barrier_bound_weight=0.25,
                  overrides={"fc1": {"barrier_weight": 0.1, "barrier_bound_weight": 2.0}})
    barrier = qm.regularizers["log_barrier"]
    assert [(s.layer, s.weight, s.bound_weight) for s in barrier.sites] == [("fc1", 0.1, 2.0), ("fc2", 0.5, 0.25)]
    x, _ = _data()
    seen = _barrier_inputs(qm)
    qm.train()
    t = barrier.t
    qm(x[:32])
    (a1, a2) = seen["args"]
    s1, s2 = barrier.sites
    expected = (0.1 * barrier.tail_term(s1, a1[0], t) + 2.0 * barrier.bound_term(s1, *a1[1:], t)
                + 0.5 * barrier.tail_term(s2, a2[0], t) + 0.25 * barrier.bound_term(s2, *a2[1:], t))
    torch.testing.assert_close(qm.regularization(), expected)
    assert "weight=0.1, bound_weight=2" in repr(barrier) and "weight=0.5, bound_weight=0.25" in repr(barrier)


def test_barrier_reads_the_ops_through_graph_edges():
    """Passes talk only through the graph: the barrier node reads each op's exact accumulator
    (getitem(op, 1)), its b and bias operands and the get_attr nodes of its grids; neither module
    holds another module of the graph."""
    qm = _compile(log_barrier=True)
    call, = [n for n in qm.graph.nodes if n.op == "call_module" and n.target == "regularizers.log_barrier"]
    ops = [n for n in qm.graph.nodes if n.op == "call_module" and isinstance(qm.get_submodule(n.target), NarrowAccOp)]
    assert not call.users and len(call.args) == len(ops) == 2
    for op, args in zip(ops, call.args):
        exact, b, bias, a_scale, a_zp, b_scale = args
        assert exact.target is operator.getitem and exact.args == (op, 1)
        assert (b, bias) == (op.args[1], op.args[2])
        assert (a_scale, a_zp, b_scale) == (op.kwargs["a_scale"], op.kwargs["a_zero_point"], op.kwargs["b_scale"])
        assert a_scale.op == "get_attr" and a_scale.target == grid_source(op.args[0], qm).target + ".scale"
        assert qm.get_submodule(op.target).keep_exact
    for m in [qm.regularizers["log_barrier"]] + [qm.get_submodule(n.target) for n in ops]:
        held = [v for k, v in vars(m).items() if k != "_modules" and isinstance(v, (nn.Module, tuple, list))]
        assert not any(isinstance(v, nn.Module) or (isinstance(v, (tuple, list)) and
                                                    any(isinstance(i, nn.Module) for i in v)) for v in held)


def test_one_term_per_training_forward_and_none_in_eval():
    qm = _compile(log_barrier=True)
    barrier = qm.regularizers["log_barrier"]
    x, _ = _data()
    qm.train()
    qm.calibrate([x[:32]])                   # quantization off, no gradients: no term, no step
    assert int(barrier.step) == 0 and float(qm.regularization()) == 0.0
    qm.eval()
    qm(x[:8])
    assert int(barrier.step) == 0 and float(qm.regularization()) == 0.0
    qm.train()
    with torch.no_grad():
        qm(x[:8])
    assert int(barrier.step) == 0 and float(qm.regularization()) == 0.0
    qm(x[:8])
    first = qm.regularization()
    assert int(barrier.step) == 1 and float(first.detach()) > 0 and first.requires_grad
    assert float(qm.regularization()) == 0.0 and int(barrier.step) == 1
    with qm.quantization_disabled():         # the ops run the float op: no exact accumulator, no term
        qm(x[:8])
    assert float(qm.regularization()) == 0.0
    clone = copy.deepcopy(qm)                # no pending autograd graph is copied; the copy still works
    clone(x[:8])
    assert float(clone.regularization().detach()) > 0 and int(clone.regularizers["log_barrier"].step) == int(barrier.step) + 1


def test_bound_term_is_zero_side_exactly_when_no_input_can_overflow():
    """z_b <= 0 ⇔ Σ|w_int|·max|x_int| + |bias_int| <= A: then no input on the grid overflows."""
    qm = _compile(log_barrier=True, weight_bits=3, act_bits=3, tile=4)
    x, _ = _data()
    seen = _barrier_inputs(qm)
    qm.train()
    qm(x)
    for site, (exact, b, bias, a_scale, a_zp, b_scale) in zip(qm.regularizers["log_barrier"].sites, seen["args"]):
        w_int = torch.round(b.detach() / b_scale.view(-1, 1))
        whole = w_int.abs().sum(1) * grid_absmax(site.a_qrange, a_zp)
        A = acc_range(site.acc_bits)[1]
        assert float(whole.max()) <= A                    # 3-bit operands into 14 bits: feasible
        # every input on the grid, including the adversarial one, stays in range
        extremes = torch.where(w_int >= 0, site.a_qrange[1] - a_zp, site.a_qrange[0] - a_zp)
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
        ops = [m for m in qm.modules() if isinstance(m, NarrowAccOp)]
        assert all(op.overflowed_train == op.outputs_train for op in ops)   # every output saturated
        task_grad, = torch.autograd.grad(task, qm.fc2.weight, retain_graph=True)
        assert (task_grad.abs().sum() == 0) == (acc_grad == "zero_saturated")
        barrier_grad[acc_grad], = torch.autograd.grad(qm.regularization(), qm.fc2.weight)
    assert barrier_grad["zero_saturated"].abs().sum() > 0
    torch.testing.assert_close(barrier_grad["zero_saturated"], barrier_grad["ste"])


def test_barrier_without_accumulators_is_an_error():
    with pytest.raises(QCompileError, match="acc_bits"):
        qcompile.compile(MLP(), (torch.randn(2, 32),), log_barrier=True)


def test_barrier_model_lowers_deploys_and_is_analysed(tmp_path):
    """The (y, exact) outputs and the barrier node are training-only: lowering, the reference, the
    memory-traffic analysis and the diagrams see the plain narrow-accumulator layers."""
    from qcompile.backends import reference
    from qcompile.tools.analysis import memory_traffic
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    qm = qcompile.compile(qcompile.models.get("models:lenet5"), x[:2], acc_bits=16, tile=64, log_barrier=True,
                          acc_grad="zero_saturated", seed=0)
    qm.calibrate([x])
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    for _ in range(2):
        loss = F.cross_entropy(qm(x), y) + qm.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    graph = qcompile.lower(qm)
    assert sum(isinstance(op.attrs, qcompile.ir.Accumulator) and op.attrs.acc_bits == 16 for op in graph.ops) == 5
    with torch.no_grad():
        out = qm(x)
    steps = (reference.dequantize(graph, reference.run(graph, x)) - out.double().numpy()) / graph.tensor(graph.outputs[0]).scale
    assert abs(steps).max() <= 1.0 + 1e-6
    assert {r.b_acc for r in memory_traffic(qm, (2, 1, 28, 28)).layers} == {16}
    drawing = qcompile.draw(qm, tmp_path, passes=["regularize"], format="dot")
    assert [n for n, a in drawing.graphs["regularize"].nodes(data=True) if a["category"] == "regularizer"]
