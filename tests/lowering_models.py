"""Small models and a train-then-eval helper shared by the lowering and ONNX export tests."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.models import get


class OpZoo(nn.Module):
    """One of each op kind lowering handles: standalone BatchNorm, relu/relu6/hardswish/silu/sigmoid/
    hardsigmoid, cat, chunk + channel shuffle, add, squeeze-excite multiply, avg/max pooling, mean."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv5 = nn.Conv2d(16, 16, 1)
        self.conv6 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.bn0(x)
        a = F.relu6(self.bn2(self.conv2(x)))
        b = F.hardswish(self.conv3(x))
        c = torch.cat([a, b], 1)
        s = torch.sigmoid(self.conv5(F.adaptive_avg_pool2d(c, 1)))
        y = F.silu(self.conv4(c)) * s
        y = y + self.conv6(c)
        n, ch, h, w = y.shape
        y = y.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, ch, h, w)
        y1, y2 = y.chunk(2, dim=1)
        y = torch.cat([F.hardsigmoid(y1), y2], 1)
        y = F.avg_pool2d(y, 2)
        return self.fc(y.mean((2, 3)))


def trained(model: nn.Module, x: torch.Tensor, steps: int = 2, seed: int = 0, **config):
    """compile(model) (traced in eval mode), `steps` SGD steps (cross-entropy on fixed random labels)
    on x, then eval mode."""
    torch.manual_seed(seed)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qcompile.compile(model, (x[:2],), seed=seed, **config)
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    labels = None
    for _ in range(steps):
        y = qm(x)
        if labels is None:
            labels = torch.randint(0, y.shape[1], (len(x),), generator=torch.Generator().manual_seed(seed))
        loss = F.cross_entropy(y, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qm.eval()


class Conv1dNet(nn.Module):
    """conv1d → relu → conv1d (strided, grouped) → flatten → linear, on (N, 4, 32) sequences."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 16, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


_TRAINED: dict = {}


def trained_once(spec: str, shape, steps: int = 2, seed: int = 0, **config) -> nn.Module:
    """`trained` of the model `spec` ("OpZoo", "Conv1dNet" or a qcompile.models name, 10 classes) on a
    seeded random batch of `shape`, compiled and trained once per test session; every call returns
    its own deep copy, so a test may change it freely."""
    key = (spec, tuple(shape), steps, seed, tuple(sorted(config.items())))
    if key not in _TRAINED:
        torch.manual_seed(seed)
        model = {"OpZoo": OpZoo, "Conv1dNet": Conv1dNet}[spec]() if ":" not in spec else get(spec, num_classes=10)
        _TRAINED[key] = trained(model, torch.randn(*shape), steps, seed, **config)
    return copy.deepcopy(_TRAINED[key])


def assert_deploys(qm, graph, x, workdir, max_steps: float = 1) -> None:
    """The integer graph of eval-mode `qm` within `max_steps` output steps of qm(x), the C runtime
    bit-exact with the reference, and onnxruntime (QDQ) within 1 LSB of it (its convs round some
    requantization ties the other way)."""
    import numpy as np
    from qcompile.backends import parity, reference
    with torch.no_grad():
        out = qm(x)
    steps = (reference.dequantize(graph, reference.run(graph, x)) - out.double().numpy()) \
        / graph.tensor(graph.outputs[0]).scale
    assert np.abs(steps).max() <= max_steps + 1e-6
    cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq", "c"), workdir=workdir)
    assert cmp.max_lsb("reference", "c") == 0 and cmp.max_lsb("reference", "onnx:qdq") <= 1

