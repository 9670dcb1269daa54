"""Overflow-free weight grids (`overflow_free_weights`, A2Q's ℓ1 constraint with the bias): the scale
search, the guarantee on the worst input, the graph wiring, lowering to every backend, and errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.backends import parity, reference
from qcompile.core.accumulator import acc_range, overflow_free_scale
from qcompile.core.grids import bias_codes, max_code_magnitude, quantize_codes, qparams
from qcompile.errors import UnsupportedOpError
from qcompile.tools.analysis import accumulator_bounds
from qcompile.train.quantizers import OverflowFreeWeights
from qcompile.train.tiled import NarrowAccOp

QR = (-127, 127)


def _total(w, s, bias, input_scale, X):
    """Σ|code(w)|·X + |bias code| per output channel at weight scale `s` (per channel)."""
    w2 = w.reshape(w.shape[0], -1)
    t = quantize_codes(w2, s, torch.zeros(w.shape[0]), QR, axis=0).abs().sum(1).double() * X
    return t + bias_codes(bias, input_scale, s)[0].abs() if bias is not None else t


@pytest.mark.parametrize("acc_bits,X", [(16, 222), (14, 255), (12, 127), (8, 255)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scale_is_the_smallest_that_holds(acc_bits, X, with_bias):
    gen = torch.Generator().manual_seed(acc_bits + X)
    w = torch.randn(12, 3, 5, 5, generator=gen) * torch.rand(12, 1, 1, 1, generator=gen)
    bias = torch.randn(12, generator=gen) * 0.2 if with_bias else None
    xs = torch.tensor(0.0127)
    base, _ = qparams(-w.abs().reshape(12, -1).amax(1), w.abs().reshape(12, -1).amax(1), QR, True)
    s = overflow_free_scale(w, base, QR, bias, xs, X, acc_bits)
    A = acc_range(acc_bits)[1]
    assert s.dtype == torch.float32 and bool((s >= base).all())
    assert bool((_total(w, s, bias, xs, X) <= A).all())
    raised = s > base
    assert raised.any()                                  # these widths do bind for these weights
    below = torch.nextafter(s, torch.zeros_like(s))      # one float32 step smaller breaks a raised channel
    assert bool((_total(w, below, bias, xs, X)[raised] > A).all())
    one = overflow_free_scale(w, base.max(), QR, bias, xs, X, acc_bits)   # per tensor: one scale, all hold
    assert one.dim() == 0 and bool((_total(w, one.expand(12), bias, xs, X) <= A).all())
    p2 = overflow_free_scale(w, base, QR, bias, xs, X, acc_bits, pow2=True)
    assert bool((torch.log2(p2) == torch.log2(p2).round()).all()) and bool((_total(w, p2, bias, xs, X) <= A).all())
    assert bool((_total(w, p2 / 2, bias, xs, X)[p2 / 2 >= base] > A).all())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def _trained(acc_bits=12, steps=6, **cfg):
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 12, 12) * 2, torch.randint(0, 10, (64,))
    qm = qcompile.compile(Net(), x[:2], acc_bits=acc_bits, tile=8, overflow_free_weights=True, grad_bits=8,
                          seed=0, verify=True, **cfg)
    qm.calibrate([x])
    opt = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
    for i in range(steps):
        loss = F.cross_entropy(qm(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8]) + qm.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qm, x


def test_training_never_overflows_and_the_worst_input_reaches_the_bound():
    qm, x = _trained(log_barrier=True)
    ops = [m for m in qm.modules() if isinstance(m, NarrowAccOp)]
    assert all(op.overflow_stats()["train"]["events"] == 0 for op in ops)
    assert isinstance(qm.conv.weight_quant, OverflowFreeWeights) and isinstance(qm.fc.weight_quant, OverflowFreeWeights)
    qm.eval()
    for op in ops:
        op.reset_overflow_stats()
    with torch.no_grad():
        qm(x)
    rows = {r["layer"]: r for r in accumulator_bounds(qm)}
    assert all(rows[layer]["margin"] >= 0 for layer in ("conv", "fc"))     # no input on the grid can overflow
    # the input that aligns with channel 0's signs, at the largest code magnitude: exactly its bound
    q = qm.conv.input_quant
    s, z = float(q.scale), float(q.zero_point)
    X = int(max_code_magnitude(q.qrange, z))
    sign = torch.sign(qm.conv.weight.detach()[0, 0])
    hi_code, lo_code = z + X if z + X <= q.qrange[1] else z - X, z - X if z - X >= q.qrange[0] else z + X
    codes = torch.where(sign >= 0, torch.tensor(float(hi_code)), torch.tensor(float(lo_code)))
    worst = ((codes - z) * s).reshape(1, 1, 5, 5)
    with torch.no_grad():
        _, exact = qm.conv.accumulator(worst, qm.conv.weight_quant(qm.conv.weight, q.scale, q.zero_point, qm.conv.bias),
                                       None, a_scale=q.scale, a_zero_point=q.zero_point,
                                       b_scale=qm.conv.weight_quant.scale, b_zero_point=qm.conv.weight_quant.zero_point)
    assert qm.conv.accumulator.overflow_stats()["eval"]["events"] == 0
    assert float(exact.abs().max()) <= acc_range(12)[1]


def test_weight_grid_is_computed_from_the_input_grid_of_the_same_forward():
    qm, x = _trained(steps=3)
    q, wq = qm.conv.input_quant, qm.conv.weight_quant
    lo, hi = qparams(-qm.conv.weight.detach().abs().reshape(8, -1).amax(1),
                     qm.conv.weight.detach().abs().reshape(8, -1).amax(1), QR, True)
    qm(x[:8])                       # a training forward: the input grid moves, the weight grid follows it
    expected = overflow_free_scale(qm.conv.weight, lo, QR, qm.conv.bias, q.scale,
                                   max_code_magnitude(q.qrange, q.zero_point), 12)
    assert torch.equal(wq.scale, expected)
    order = [n.target for n in qm.graph.nodes if n.op == "call_module"]
    assert order.index("conv.input_quant") < order.index("conv.weight_quant") < order.index("conv.bias_quant")


def test_lowered_graph_is_overflow_free_and_backends_agree(tmp_path):
    qm, x = _trained(log_barrier=True)
    qm.eval()
    graph = qcompile.lower(qm)
    with torch.no_grad():
        out = qm(x)
    steps = (reference.dequantize(graph, reference.run(graph, x)) - out.double().numpy()) \
        / graph.tensor(graph.outputs[0]).scale
    assert abs(steps).max() <= 1.0 + 1e-6
    layers = [op for op in graph.ops if op.kind in ("conv2d", "linear")]
    assert len(layers) == 2
    for op in layers:
        w = op.attrs.weight.reshape(op.attrs.weight.shape[0], -1).astype("int64")
        bound = abs(w).sum(1) * graph.tensor(op.inputs[0]).magnitude + abs(op.attrs.bias.astype("int64"))
        assert op.attrs.acc_bits == 12 and bound.max() <= acc_range(12)[1], op.name
    cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq", "c"), workdir=tmp_path)
    assert cmp.differ("reference", "c") == 0 and cmp.max_lsb("reference", "c") == 0
    assert cmp.max_lsb("reference", "onnx:qdq") <= 1


def test_errors_name_the_option_and_the_layer():
    with pytest.raises(ValueError, match="overflow_free_weights=True needs acc_bits"):
        qcompile.QConfig(overflow_free_weights=True)

    class Attn(nn.Module):
        def forward(self, a, b):
            return a @ b

    with pytest.raises(UnsupportedOpError, match="multiplies two activations"):
        qcompile.compile(Attn(), (torch.randn(2, 4, 8), torch.randn(2, 8, 4)), acc_bits=16, overflow_free_weights=True)


class FoldedBlock(nn.Module):
    """Convs with folded BatchNorms (one conv with a bias of its own) and a residual add."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(F.relu(self.bn2(self.conv2(y)) + y).flatten(1))


def test_folded_batchnorm_layers_are_bounded_with_their_eval_bias(tmp_path):
    """With a folded BatchNorm the deployed accumulator starts from the fold's eval bias (the conv's own
    bias included): the bound holds for it, and so nothing overflows in training or in eval, for inputs
    far outside the calibration range too."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8) * 2
    qm = qcompile.compile(FoldedBlock(), x[:2], acc_bits=12, tile=8, overflow_free_weights=True, grad_bits=8,
                          seed=0, verify=True)
    assert qm.conv.weight_quant.__class__ is OverflowFreeWeights
    qm.calibrate([x])
    opt = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        loss = F.cross_entropy(qm(x), torch.arange(32) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ops = [m for m in qm.modules() if isinstance(m, NarrowAccOp)]
    assert all(op.overflow_stats()["train"]["events"] == 0 for op in ops)
    qm.eval()
    with torch.no_grad():
        qm(torch.randn(64, 3, 8, 8) * 5)
    assert all(op.overflow_stats()["eval"]["events"] == 0 for op in ops)
    graph = qcompile.lower(qm)
    lowered = []
    for op in graph.ops:
        if op.kind in ("conv2d", "linear"):
            w = op.attrs.weight.reshape(op.attrs.weight.shape[0], -1).astype("int64")
            bound = abs(w).sum(1) * graph.tensor(op.inputs[0]).magnitude + abs(op.attrs.bias.astype("int64"))
            assert op.attrs.bias.any() and bound.max() <= acc_range(12)[1], op.name
            lowered.append(int(bound.max()))
    assert [r["bound"] for r in accumulator_bounds(qm)] == lowered     # the analysis counts the fold's bias
    cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq", "c"), workdir=tmp_path)
    assert cmp.max_lsb("reference", "c") == 0 and cmp.max_lsb("reference", "onnx:qdq") <= 1
