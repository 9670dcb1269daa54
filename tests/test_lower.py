"""passes/lower and runtime/reference: the integer IR of a trained graph and its interpreter."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.errors import CalibrationError, UnsupportedOpError
from qcompile.models import get
from qcompile.ir.lower import LoweringError, lower
from qcompile.backends import reference as ref
from qcompile.core.requant import requantize

from lowering_models import assert_deploys, trained, trained_once


def steps_apart(graph, codes, y_torch):
    """|dequantized reference − qm.eval()| in whole output quantization steps."""
    d = np.abs(ref.dequantize(graph, codes) - y_torch.detach().double().numpy()) / graph.tensor(graph.outputs[0]).scale
    return np.rint(d)


@pytest.fixture(scope="module")
def zoo():
    return trained_once("OpZoo", (8, 3, 16, 16))


def test_lenet_reference_matches_eval_within_one_step(mnist):
    """Each op agrees with the float eval graph up to rounding near ties; a flipped code can grow to
    two steps a few layers on, so the bound is on the share of outputs within one step."""
    from qcompile.tools.training import train_classifier
    torch.manual_seed(0)
    qm = qcompile.compile(get("models:lenet5"), (mnist.x_train[:2],), grad_bits=8, seed=0)
    qm.calibrate([mnist.x_train[:256]])
    train_classifier(qm, mnist.x_train[:640], mnist.y_train[:640], epochs=1, batch_size=64, lr=0.05)
    qm.eval()
    g = lower(qm)
    assert [g.tensor(n).bits for n in g.inputs] == [8]
    assert {op.kind for op in g.ops} == {"conv2d", "max_pool2d", "reshape", "linear"}   # ReLUs fused as clamps
    x = mnist.x_test[:500]
    codes = ref.run(g, x)
    assert codes.dtype == np.int64 and codes.shape == (500, 10)
    d = steps_apart(g, codes, qm(x))
    assert (d <= 1).mean() >= 0.99
    assert d.max() <= 2
    assert (codes.argmax(1) == qm(x).argmax(1).numpy()).mean() >= 0.98


def test_every_op_kind_lowered_and_matches_eval(zoo):
    g = lower(zoo)
    kinds = {op.kind for op in g.ops}
    assert {"conv2d", "linear", "lut", "add", "mul", "concat", "slice", "transpose", "reshape", "avg_pool2d",
            "max_pool2d", "requantize"} <= kinds
    standalone = [op for op in g.ops if op.kind == "conv2d" and op.name == "bn0"]    # the standalone BatchNorm:
    assert standalone and standalone[0].attrs.groups == 8 and standalone[0].attrs.weight.shape == (8, 1, 1, 1)
    assert set(np.abs(standalone[0].attrs.weight).ravel()) <= {0, 127}             # a depthwise 1×1 conv
    assert any(t.bits == 16 for t in g.tensors.values())                              # SiLU / sigmoid before the mul
    for op in g.ops:   # integers only: every array attr is an integer array
        for k, v in vars(op.attrs).items():
            if isinstance(v, np.ndarray):
                assert np.issubdtype(v.dtype, np.integer), (op.name, k)
    x = torch.randn(16, 3, 16, 16)
    d = steps_apart(g, ref.run(g, x), zoo(x))
    assert d.max() <= 1


def test_pow2_scales_give_power_of_two_grids_and_multipliers():
    torch.manual_seed(0)
    qm = trained_once("OpZoo", (8, 3, 16, 16), pow2_scales=True)
    g = lower(qm)
    for t in g.tensors.values():
        assert math.log2(t.scale) == round(math.log2(t.scale)), t.name
    for op in g.ops:
        if op.name == "bn0":      # a standalone BatchNorm multiplies by γ/σ: not a power of two (lower_batchnorm)
            continue
        for key in ("multiplier", "multiplier_a", "multiplier_b", "multipliers"):
            if hasattr(op.attrs, key):
                assert set(np.atleast_1d(getattr(op.attrs, key)).tolist()) <= {0, 1 << 30}, (op.name, key)
    x = torch.randn(16, 3, 16, 16)
    assert steps_apart(g, ref.run(g, x), qm(x)).max() <= 1


def test_reference_conv_is_exact_integer_arithmetic(zoo):
    """The first conv's codes equal clamp(zy + requantize(bias + Σ (x − zx)·w)) computed independently."""
    g = lower(zoo)
    op = next(o for o in g.ops if o.kind == "conv2d")
    x = torch.randn(2, 3, 16, 16)
    env = ref.run(g, x, keep=True)
    xin = env[op.inputs[0]] - g.tensor(op.inputs[0]).zero_point
    acc = F.conv2d(torch.from_numpy(xin).double(), torch.from_numpy(op.attrs.weight.astype(np.float64)),
                   torch.from_numpy(op.attrs.bias.astype(np.float64)), padding=op.attrs.padding)
    acc = acc.round().long().numpy()
    r = requantize(acc, op.attrs.multiplier.reshape(1, -1, 1, 1), op.attrs.shift.reshape(1, -1, 1, 1))
    y = np.clip(g.tensor(op.output).zero_point + r, op.attrs.act_min, op.attrs.act_max)
    assert np.array_equal(env[op.output], y)


def test_graph_meta_records_version_and_config(zoo):
    g = lower(zoo)
    assert g.meta["qcompile_version"] == qcompile.__version__
    assert g.meta["config"]["act_bits"] == zoo.config.act_bits


def test_training_mode_is_rejected(zoo):
    zoo.train()
    try:
        with pytest.raises(LoweringError, match="training mode.*qm.eval"):
            lower(zoo)
    finally:
        zoo.eval()


def test_uncalibrated_graph_is_rejected(small_net):
    qm = qcompile.compile(small_net, (torch.randn(2, 3, 8, 8),)).eval()
    with pytest.raises(CalibrationError, match="input_quant.*calibrate"):
        lower(qm)


def test_dynamic_activation_estimator_is_rejected(small_net):
    torch.manual_seed(0)
    qm = trained(small_net, torch.randn(4, 3, 8, 8), act_range="current")
    with pytest.raises(LoweringError, match="'current'.*act_range"):
        lower(qm)


class Elu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.elu(self.conv(x)).flatten(1)


def test_unsupported_op_names_the_node():
    torch.manual_seed(0)
    qm = trained(Elu(), torch.randn(4, 3, 8, 8))
    with pytest.raises(UnsupportedOpError, match="node 'elu'"):
        lower(qm)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["models:lenet5", "models:resnet20", "torchvision:resnet18"])
def test_reference_equals_eval_exactly_with_pow2_scales(name):
    """With pow2 scales every requantization is exact and the trained graph rounds its biases (folded
    BatchNorm shifts included) onto the grid S_x·S_w, as the integer graph does: the reference
    equals qm.eval() code for code."""
    shape = (8, 1, 28, 28) if name.endswith("lenet5") else (8, 3, 32, 32)
    qm = trained_once(name, shape, steps=3, pow2_scales=True)
    assert any(float(m.running_mean.abs().max()) > 0 for m in qm.modules() if getattr(m, "running_mean", None) is not None) \
        or any(n.endswith("bias") and float(p.detach().abs().max()) > 0 for n, p in qm.named_parameters())
    g = lower(qm)
    x = torch.randn(4, *shape[1:])
    assert steps_apart(g, ref.run(g, x), qm(x)).max() == 0


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(32, 32)
        self.gelu_tanh = nn.GELU(approximate="tanh")
        self.fc3 = nn.Linear(32, 32)
        self.fc4 = nn.Linear(32, 5)

    def forward(self, x):
        y = self.gelu_tanh(self.fc2(self.gelu(self.fc1(x))))
        return self.fc4(torch.tanh(self.fc3(y)))


def test_gelu_and_tanh_are_tables_over_the_input_codes(tmp_path):
    """GELU (both forms) and tanh lower like the other elementwise activations: a table computed with
    the trained graph's own function on every input code."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    qm = qcompile.compile(Activations(), x[:2], seed=0)
    assert {n.kwargs.get("approximate") for n in qm.graph.nodes if n.target is F.gelu} == {"none", "tanh"}
    qm.calibrate([x])
    qm.eval()
    graph = qcompile.lower(qm)
    assert [op.kind for op in graph.ops].count("lut") == 3
    assert_deploys(qm, graph, x, tmp_path)
