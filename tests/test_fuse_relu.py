"""The fuse_relu pass: a relu next to an activation quantizer becomes the quantizer call's relu= argument,
and nothing the graph computes changes (training, eval, the integer graph)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.backends import reference
from qcompile.errors import VerificationError
from qcompile.passes import fuse_relu, pipeline


class Net(nn.Module):
    """conv-BN-relu (relu after the output quantizer), add → relu → conv (relu before the next input
    quantizer; the sum read twice), and a relu before average pooling (no quantizer next to it)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        s = self.bn2(self.conv2(a)) + a
        t = self.conv3(F.relu(s)) + s
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(t), 1), 1))


def _compile(model, x, fuse: bool, monkeypatch):
    with monkeypatch.context() as mp:
        if not fuse:
            mp.setattr(pipeline, "PIPELINE", tuple(p for p in pipeline.PIPELINE if p[0] != "fuse_relu"))
        return qcompile.compile(copy.deepcopy(model), (x[:2],), qcompile.QConfig(grad_bits=8, seed=0))


def _relu_calls(qm):
    places = [n.kwargs.get("relu") for n in qm.graph.nodes if n.op == "call_module"]
    relus = sum(1 for n in qm.graph.nodes if n.op == "call_function" and n.target is F.relu)
    return places.count("before"), places.count("after"), relus


def test_fused_relus_change_no_number_in_training_eval_or_the_integer_graph(monkeypatch):
    """Net and ResNet-20 with the pass and without it: both relu forms are fused (the relu before pooling
    stays); 3 SGD steps give the same losses, gradients and state bit for bit (the one-pass C step on
    both sides, its first batch on torch's path); then eval outputs and the lowered integer graph (ops,
    attributes, the reference's output codes) are the same."""
    from qcompile.models.resnet_cifar import ResNet20

    torch.manual_seed(0)
    for model, x in ((Net(), torch.randn(8, 3, 12, 12)), (ResNet20(num_classes=5, width=8), torch.randn(8, 3, 16, 16))):
        y = torch.randint(0, 5, (8,))
        fused, plain = _compile(model, x, True, monkeypatch), _compile(model, x, False, monkeypatch)
        before, after, left = _relu_calls(fused)
        assert before > 0 and after > 0 and left == 1 and before + after + left == _relu_calls(plain)[2]
        for qm in (fused, plain):
            qm.train()
            opt = torch.optim.SGD(qm.parameters(), lr=0.05)
            qm.losses, qm.grads = [], []
            for _ in range(3):
                opt.zero_grad()
                loss = F.cross_entropy(qm(x), y)
                loss.backward()
                qm.losses.append(loss.item())
                qm.grads.append([p.grad.clone() for p in qm.parameters()])
                opt.step()
        assert fused.losses == plain.losses
        assert all(torch.equal(a, b) for ga, gb in zip(fused.grads, plain.grads) for a, b in zip(ga, gb))
        sa, sb = fused.state_dict(), plain.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        fused.eval()
        plain.eval()
        with torch.no_grad():
            assert torch.equal(fused(x), plain(x))
        ga, gb = qcompile.lower(fused), qcompile.lower(plain)
        assert [(op.kind, op.inputs == [] or len(op.inputs)) for op in ga.ops] == \
            [(op.kind, op.inputs == [] or len(op.inputs)) for op in gb.ops]
        for oa, ob in zip(ga.ops, gb.ops):
            for field in oa.attrs.__dataclass_fields__:
                u, v = getattr(oa.attrs, field), getattr(ob.attrs, field)
                assert np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v, (oa.name, field)
        assert np.array_equal(reference.run(ga, x), reference.run(gb, x))


def test_the_pass_fuses_where_it_may_and_its_verify_refuses_the_rest(monkeypatch):
    """A relu whose quantizer call is read elsewhere too stays a node; the verify refuses a fusable relu
    left in the graph, a relu= value outside None / "before" / "after", and relu= on a weight quantizer;
    a quantizer call refuses relu= on a weight quantizer at run time as well."""
    x = torch.randn(4, 3, 12, 12)
    qm = _compile(Net(), x, True, monkeypatch)
    fuse_relu.verify(qm, qm.config)
    plain = _compile(Net(), x, False, monkeypatch)
    with pytest.raises(VerificationError, match="fuse_relu.*no relu that only an activation quantizer reads"):
        fuse_relu.verify(plain, plain.config)
    call = next(n for n in qm.graph.nodes if n.kwargs.get("relu") == "after")
    call.kwargs = {"relu": "sideways"}
    with pytest.raises(VerificationError, match="relu=None, or 'before' / 'after'"):
        fuse_relu.verify(qm, qm.config)
    with pytest.raises(ValueError, match="relu='sideways'"):
        qm.get_submodule(call.target)(x[:, :1], relu="sideways")
    call.kwargs = {"relu": "after"}
    weight = next(n for n in qm.graph.nodes if n.op == "call_module" and n.target.endswith("weight_quant"))
    weight.kwargs = {"relu": "after"}
    with pytest.raises(VerificationError, match="on an activation quantizer"):
        fuse_relu.verify(qm, qm.config)
    with pytest.raises(ValueError, match="weight quantizer of layer .*relu='after'"):
        qm.get_submodule(weight.target)(qm.conv1.weight, relu="after")

    class Shared(nn.Module):                 # the quantizer call is read by the relu and by the add
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv1(x)
            return self.conv2(F.relu(y)) + y

    shared = _compile(Shared(), x, True, monkeypatch)
    assert _relu_calls(shared) == (0, 0, 1)
    fuse_relu.verify(shared, shared.config)
