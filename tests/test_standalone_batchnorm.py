"""Per-channel affine ops lower to integer per-channel requantization plus a per-channel offset, on 8- and
16-bit inputs: a BatchNorm that folds into no conv (DenseNet's norm after a concat, a BatchNorm1d after a
flatten) and a LayerScale multiply."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.backends import parity, reference

from lowering_models import assert_deploys


class DenseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 5, 3, padding=1)
        self.norm = nn.BatchNorm2d(9)         # reads the concat of two grids: a 16-bit intermediate
        self.c3 = nn.Conv2d(9, 6, 1)
        self.norm1d = nn.BatchNorm1d(96)      # after a flatten: per-sample shape (C,)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.c1(x)), self.c2(x)], 1)
        y = self.c3(F.relu(self.norm(y)))
        return self.fc(self.norm1d(torch.flatten(F.max_pool2d(y, 2), 1)))


def test_standalone_batchnorms_lower_to_per_channel_requantization(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = qcompile.compile(DenseBlock(), x[:2], grad_bits=8, seed=0)
    qm.calibrate([x])
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    for _ in range(5):                   # moves the running statistics and the affine parameters
        loss = F.cross_entropy(qm(x), torch.arange(16) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    graph = qcompile.lower(qm)
    norms = {op.name: op for op in graph.ops if op.name in ("norm", "norm1d") and op.kind == "conv2d"}
    assert set(norms) == {"norm", "norm1d"} and not any(op.kind == "lut" for op in graph.ops)
    assert graph.tensor(norms["norm"].inputs[0]).bits == 16            # the table form could not take this input
    for op in norms.values():
        a = op.attrs
        assert a.groups == a.weight.shape[0] and a.weight.shape[1:] == (1, 1, 1)
        assert set(np.abs(a.weight).ravel()) <= {127} and a.bias.any()  # ±127 codes, a per-channel offset
        assert len(set(a.multiplier.tolist())) > 1                        # one multiplier per channel
    # the normalized values equal the trained graph's (the quantizer after norm → relu), to a step
    env = reference.run(graph, x, keep=True)
    seen = {}
    qm.c3.input_quant.register_forward_hook(lambda m, i, o: seen.update(y=o.detach()))
    with torch.no_grad():
        out = qm(x)
    t = graph.tensor("norm")
    ours = np.maximum(env["norm"].astype(np.float64) - t.zero_point, 0) * t.scale
    assert np.round(np.abs(ours - seen["y"].double().numpy()) / t.scale).max() <= 1    # float32 values: round
    steps = (reference.dequantize(graph, env[graph.outputs[0]]) - out.double().numpy()) \
        / graph.tensor(graph.outputs[0]).scale
    assert np.abs(steps).max() <= 2 + 1e-6         # through the 16-bit concat grid, a conv and a linear
    cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq", "c"), workdir=tmp_path)
    assert cmp.max_lsb("reference", "c") == 0 and cmp.max_lsb("reference", "onnx:qdq") <= 1   # ORT: conv ties


class LayerScale(nn.Module):
    def __init__(self, scale_shape=(6, 1, 1)):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(scale_shape) * 2 - 0.5)      # per channel, some negative
        self.c2 = nn.Conv2d(6, 4, 1)
        self.s = nn.Parameter(torch.tensor(0.7))                           # one scalar
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = y + self.gamma * y
        return self.fc(torch.flatten(self.s * self.c2(y), 1))


def test_layer_scale_multiplies_lower_to_per_channel_requantization(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    qm = qcompile.compile(LayerScale(), x[:2], grad_bits=8, seed=0)
    qm.calibrate([x])
    qm.eval()
    graph = qcompile.lower(qm)
    muls = [op for op in graph.ops if op.name.startswith("mul")]
    assert [op.kind for op in muls] == ["conv2d", "conv2d"] and [op.attrs.groups for op in muls] == [6, 4]
    signs = np.sign(muls[0].attrs.weight.ravel())
    assert (signs == np.sign(qm.gamma.detach().numpy().ravel())).all() and not muls[0].attrs.bias.any()
    assert_deploys(qm, graph, x, tmp_path)


def test_a_multiplier_that_is_not_per_channel_is_refused():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    qm = qcompile.compile(LayerScale(scale_shape=(1, 1, 4)), x[:2], seed=0)
    qm.calibrate([x])
    qm.eval()
    with pytest.raises(qcompile.ir.lower.LoweringError, match=r"constant of shape \(1, 1, 4\); only one value per"):
        qcompile.lower(qm)

