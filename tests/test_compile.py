"""The one-call compiler: placement, gradient quantization, modes, state and errors."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile import QConfig
from qcompile.train.quantizers import Quantizer


def quantizer_nodes(qm, kind):
    return [n for n in qm.graph.nodes if n.op == "call_module"
            and isinstance(qm.get_submodule(n.target), Quantizer) and qm.get_submodule(n.target).kind == kind]


def test_placement_of_weight_activation_and_gradient_quantizers(small_net):
    x = torch.randn(2, 3, 8, 8)
    qm = qcompile.compile(small_net, (x,), QConfig(grad_bits=8))
    assert isinstance(qm, torch.fx.GraphModule) and isinstance(qm, qcompile.QuantizedGraphModule)
    layers = ["conv1", "conv2", "fc"]
    for layer in layers:
        node = next(n for n in qm.graph.nodes if n.meta.get("qc_layer") == layer and n.op == "call_function"
                    and n.target in (F.conv2d, F.linear))
        w = node.args[1]
        assert w.op == "call_module" and w.target == f"{layer}.weight_quant"
        (user,) = node.users
        assert user.target == f"{layer}.output_quant"
    # the model input is quantized, and gets no gradient quantizer (nothing flows there)
    first = next(iter(qm.graph.nodes)).next
    assert first.target == "conv1.input_quant"
    assert [n.target for n in quantizer_nodes(qm, "gradient")] == ["conv2.grad_quant", "fc.grad_quant"]
    # relu + maxpool keep conv1's output on its grid: no second quantizer before conv2
    assert "conv2.input_quant" not in dict(qm.named_modules())
    assert len(quantizer_nodes(qm, "weight")) == 3


def test_input_model_is_not_mutated(small_net):
    before = copy.deepcopy(small_net.state_dict())
    modules_before = [type(m) for m in small_net.modules()]
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8), grad_bits=8)
    qm.train()
    loss = qm(torch.randn(4, 3, 8, 8)).sum()
    loss.backward()
    assert [type(m) for m in small_net.modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in small_net.state_dict().items())
    assert small_net.conv1.weight.grad is None


def test_gradients_reaching_earlier_layers_are_quantized(mnist):
    model = qcompile.models.get("models:lenet5")
    captured = {}
    for bits in (4, None):
        qm = qcompile.compile(model, mnist.x_train[:2], grad_bits=bits, seed=0)
        qm.calibrate([mnist.x_train[:64]])
        out_q = qm.get_submodule("conv1.output_quant")

        def keep(module, inputs, output):
            output.retain_grad()
            captured["t"] = output

        handle = out_q.register_forward_hook(keep)
        loss = F.cross_entropy(qm(mnist.x_train[:64]), mnist.y_train[:64])
        loss.backward()
        handle.remove()
        distinct = len(torch.unique(captured["t"].grad))
        if bits is None:
            assert distinct > 2 ** 8
        else:
            assert 2 < distinct <= 2 ** bits


def test_weight_gradient_quantization(small_net):
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8), grad_bits=4, quantize_weight_grad=True)
    assert "fc.weight_grad_quant" in dict(qm.named_modules())
    qm(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    assert qm.get_submodule("fc.weight_grad_quant").estimator.initialized


def test_eval_freezes_estimators_and_no_grad_works(small_net):
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8), grad_bits=8)
    with torch.no_grad():
        qm(torch.randn(8, 3, 8, 8))           # train mode under no_grad: estimators update
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    qm.eval()
    with torch.no_grad():
        a = qm(torch.randn(8, 3, 8, 8) * 10)
    assert all(torch.equal(state[k], v) for k, v in qm.state_dict().items() if not k.endswith(("scale", "zero_point")))
    assert torch.isfinite(a).all()


def test_uncalibrated_eval_is_a_clear_error(small_net):
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8)).eval()
    with pytest.raises(qcompile.CalibrationError, match="conv1"):
        qm(torch.randn(1, 3, 8, 8))


def test_calibrate_observes_without_quantizing(small_net):
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        expected = small_net(x)
        qm.eval()
        with qm.quantization_disabled():
            assert torch.equal(qm(x), expected)
        qm.train()
    assert qm.calibrate([x, (x,)]) == 2
    assert all(bool(q.estimator.initialized) for _, q in qm.quantizers() if q.kind == "activation")
    assert all(q.enabled for _, q in qm.quantizers())


def test_state_dict_reproduces_outputs_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = qcompile.models.get("models:resnet20", num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    cfg = QConfig(grad_bits=8, seed=0)
    qm = qcompile.compile(model, x[:2], cfg)
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(qm(x), torch.arange(4)).backward()
        opt.step()
    qm.save_checkpoint(tmp_path / "ckpt.pt")
    fresh = qcompile.compile(model, x[:2], cfg)
    fresh.load_checkpoint(tmp_path / "ckpt.pt")
    buf = io.BytesIO()
    torch.save(qm.state_dict(), buf)
    buf.seek(0)
    assert set(torch.load(buf, weights_only=True)) == set(qm.state_dict())
    qm.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(qm(x), fresh(x))


def test_corrupt_or_mismatched_checkpoint_loses_no_state(tmp_path, small_net):
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(qcompile.CheckpointError, match="bad.pt"):
        qm.load_checkpoint(tmp_path / "bad.pt")
    state = dict(before)
    state["conv1.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(qcompile.CheckpointError, match="conv1.weight"):
        qm.load_checkpoint(tmp_path / "wrong.pt")
    assert all(torch.equal(before[k], v) for k, v in qm.state_dict().items())


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class WithBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_model_names_module_and_line():
    with pytest.raises(qcompile.TraceError) as info:
        qcompile.compile(WithBranch(), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "'gate'" in msg and "if x.sum() > 0" in msg and "leaf" in msg
    with pytest.warns(UserWarning, match="gate"):
        qm = qcompile.compile(WithBranch(), torch.randn(1, 3, 8, 8), leaf_modules=["gate"])
    assert qm(torch.randn(2, 3, 8, 8)).shape == (2, 4, 6, 6)


class WithElu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.elu(self.fc1(x)).cumsum(-1))


def test_float_fallbacks_are_listed_in_one_warning_and_strict_refuses():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qcompile.compile(WithElu(), torch.randn(2, 4))
    msgs = [str(w.message) for w in caught if "no quantized form" in str(w.message)]
    assert len(msgs) == 1 and "elu" in msgs[0] and "cumsum" in msgs[0]
    with pytest.raises(qcompile.UnsupportedOpError, match="elu"):
        qcompile.compile(WithElu(), torch.randn(2, 4), strict=True)


def test_nonfinite_gradient_raises_names_layer_and_keeps_state(small_net):
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8), grad_bits=8)
    x = torch.randn(4, 3, 8, 8)
    qm(x).sum().backward()
    gq = qm.get_submodule("fc.grad_quant").estimator
    before = (gq.lo.clone(), gq.hi.clone())
    with pytest.raises(qcompile.NonFiniteError, match="'fc'"):
        (qm(x) * float("nan")).sum().backward()
    assert torch.equal(gq.lo, before[0]) and torch.equal(gq.hi, before[1]) and int(gq.nonfinite) == 1
    skip = qcompile.compile(small_net, torch.randn(2, 3, 8, 8), grad_bits=8, on_nonfinite="skip")
    (skip(x) * float("inf")).sum().backward()
    assert int(skip.get_submodule("fc.grad_quant").estimator.nonfinite) == 1


def test_summary_lists_every_quantizer(small_net):
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8), grad_bits=8)
    qm(torch.randn(4, 3, 8, 8)).sum().backward()
    text = qm.summary()
    for name, q in qm.quantizers():
        row = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert q.kind in row and ("static" if q.estimator.static else "dynamic") in row
    assert "conv1.weight_quant" in text and "current" in text and "hindsight" in text


def test_snapshots_after_every_pass(small_net):
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8))
    names = [s.name for s in qm.pass_snapshots]
    assert names[0] == "trace" and "normalize" in names and "quantize" in names
    assert not any(n.op == "call_module" and "quant" in str(n.target) for n in qm.pass_snapshots[0].graph.nodes)
