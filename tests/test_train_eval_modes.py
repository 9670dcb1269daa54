"""A model compiled in train mode (as constructed) keeps its train-only behaviour: stochastic depth and
dropout traced with the model's mode as a constant become modules that follow qm.train()/eval()."""
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

import qcompile
from qcompile.backends import parity
from qcompile.train.modes import EvalOutput, StochasticDepth


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop_path = TorchvisionStochasticDepth(0.5, "row")
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = x + self.drop_path(F.relu(self.conv(x)))
        return self.fc(F.dropout(torch.flatten(x, 1), 0.3, self.training))


def _twice(qm, x):
    with torch.no_grad():
        return qm(x), qm(x)


def test_dropout_and_stochastic_depth_follow_the_graph_modules_mode():
    torch.manual_seed(0)
    model = Block()                               # train mode: the constants are True
    x = torch.randn(16, 4, 8, 8)
    qm = qcompile.compile(model, x[:2], seed=0, verify=True)
    kinds = {type(m) for m in qm.modules()}
    assert StochasticDepth in kinds and nn.Dropout in kinds
    assert not [n for n in qm.graph.nodes if n.op == "call_function"
                and (n.target is F.dropout or getattr(n.target, "__name__", "") == "stochastic_depth")]
    assert qm.get_submodule("drop_path").p == 0.5        # named as in the float model
    qm.calibrate([x])
    qm.train()
    a, b = _twice(qm, x)
    assert not torch.equal(a, b)                          # paths and units dropped at random
    qm.eval()
    a, b = _twice(qm, x)
    assert torch.equal(a, b)
    qm.set_quantization(False)                            # in float, eval is exactly the float model's eval
    model.eval()
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))
    qm.set_quantization(True)
    graph = qcompile.lower(qm)
    assert {op.kind for op in graph.ops} == {"conv2d", "add", "reshape", "linear"}


def test_efficientnet_b0_trains_with_stochastic_depth_and_exports(tmp_path):
    """The issue's case: efficientnet_b0 as constructed (train mode), W8A8G8: its 9 stochastic-depth
    layers drop paths in train mode, eval is deterministic, and ONNX = reference = C after export."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    qm = qcompile.compile(model, x[:2], grad_bits=8, seed=0)
    assert sum(isinstance(m, StochasticDepth) for m in qm.modules()) == 9
    qm.calibrate([x])
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    for _ in range(2):
        loss = F.cross_entropy(qm(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    a, b = _twice(qm, x)
    assert not torch.equal(a, b)
    qm.eval()
    a, b = _twice(qm, x)
    assert torch.equal(a, b)
    graph = qcompile.lower(qm)
    cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq", "c"), workdir=tmp_path)
    # onnxruntime's QLinearConv rounds some requantization ties the other way: 1 LSB where that happens
    assert cmp.max_lsb("reference", "onnx:qdq") <= 1 and cmp.max_lsb("reference", "c") == 0


class AuxNet(nn.Module):
    """A main head and a training-only auxiliary head, returned as a namedtuple in train mode (as
    GoogLeNet and Inception do), the main logits alone in eval."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Linear(4 * 7 * 7, 10)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if self.training:
            aux = self.aux(torch.flatten(F.adaptive_avg_pool2d(x, 7), 1))
            return torchvision.models.GoogLeNetOutputs(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)),
                                                       aux, aux)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_auxiliary_outputs_in_train_mode_and_gone_in_eval_and_from_the_ir(tmp_path):
    torch.manual_seed(0)
    model = AuxNet()
    x = torch.randn(8, 3, 12, 12)
    qm = qcompile.compile(model, x[:2], grad_bits=8, seed=0, verify=True)
    assert isinstance(qm.eval_output, EvalOutput) and qm.eval_output.index == 0
    qm.calibrate([x])
    qm.train()
    out = qm(x)
    assert type(out) is torchvision.models.GoogLeNetOutputs and [o.shape for o in out] == [(8, 10)] * 3
    sum(F.cross_entropy(o, torch.arange(8)) for o in out).backward()
    assert qm.aux.weight.grad is not None and qm.aux.weight.grad.abs().sum() > 0     # the aux head trains
    qm.eval()
    with torch.no_grad():
        y = qm(x)
    assert isinstance(y, torch.Tensor) and y.shape == (8, 10)
    qm.set_quantization(False)
    model.eval()
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))                  # in float, eval is the float model's eval
    qm.set_quantization(True)
    graph = qcompile.lower(qm)
    assert len(graph.outputs) == 1 and [op.kind for op in graph.ops].count("linear") == 1   # no aux head
    cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq", "c"), workdir=tmp_path)
    assert cmp.max_lsb("reference", "c") == 0 and cmp.max_lsb("reference", "onnx:qdq") <= 1   # ORT: conv ties


def test_googlenet_compiled_in_train_mode_returns_its_aux_outputs_and_exports_without_them(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=True)
    x = torch.randn(4, 3, 64, 64)
    qm = qcompile.compile(model, x[:2], grad_bits=8, seed=0)
    qm.calibrate([x])
    out = qm(x)
    with torch.no_grad():
        ref = model(x)
    assert type(out) is type(ref) and out._fields == ref._fields
    assert [o.shape for o in out] == [r.shape for r in ref]
    qm.eval()
    graph = qcompile.lower(qm)
    assert len(graph.outputs) == 1 and [op.kind for op in graph.ops].count("linear") == 1   # aux heads: 2 each
    cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq", "c"), workdir=tmp_path)
    assert cmp.max_lsb("reference", "onnx:qdq") <= 1 and cmp.max_lsb("reference", "c") == 0


def test_qcompile_train_trains_the_auxiliary_heads_of_googlenet(tmp_path, monkeypatch):
    """`qcompile train` on a model with auxiliary outputs: the loss is the logits' cross-entropy plus
    AUX_WEIGHT times each auxiliary head's. Without weight decay an aux head moves only through that
    term: with AUX_WEIGHT 0 it keeps its initial weights, with the default it does not."""
    from test_range_estimators import _fake_folder
    from qcompile import trainer
    from qcompile.tools import trainer as trainer_module
    from qcompile.tools.run_config import TrainConfig
    from qcompile.tools.trainer import main_and_aux

    out = torchvision.models.GoogLeNetOutputs(torch.zeros(2, 3), torch.ones(2, 3), None)
    logits, aux = main_and_aux(out, nn.Identity())
    assert logits is out.logits and len(aux) == 1 and aux[0] is out.aux_logits2
    data = _fake_folder(tmp_path / "data", train=16, val=6)
    cfg = TrainConfig(model="torchvision:googlenet", data=str(data), epochs=1, batch_size=8, image_size=64, workers=0,
                      lr=0.05, weight_decay=0.0)

    def aux_weight_after(name):
        result = trainer.run(cfg, qcompile.QConfig(grad_bits=8), tmp_path / name, log=lambda s: None,
                             progress_bar=False)
        assert np.isfinite(result.metrics[-1]["train_loss"])
        return result.model.get_parameter("aux1.fc2.weight").detach().clone()

    trained = aux_weight_after("with_aux")
    monkeypatch.setattr(trainer_module, "AUX_WEIGHT", 0.0)
    untouched = aux_weight_after("without_aux")
    assert not torch.equal(trained, untouched)
