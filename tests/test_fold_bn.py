"""fold_bn: BatchNorm folded into the preceding conv/linear (simulated folding), the
BN-rectification loss and the noise-amplification diagnostics."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import qcompile
from qcompile.core.batchnorm import tap_coverage
from qcompile.train.bn_rectification import BNRectificationLoss, noise_amplification, weight_gradient_error
from qcompile.train.fused_bn import BatchNormFold, bn_affine, fold_weight
from qcompile.train.quantizers import Quantizer


class ConvBNNet(nn.Module):
    """conv2d(bias)+BN+ReLU, conv2d+BN (no ReLU), conv1d+BN1d, linear+BN1d+ReLU, a standalone BN."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv1d(8, 6, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(6 * 16, 12, bias=False)
        self.bn4 = nn.BatchNorm1d(12, momentum=None)
        self.bn5 = nn.BatchNorm1d(12)            # after an add: no conv/linear to fold into
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x)).flatten(2)   # (N, 8, 16)
        x = F.relu(self.bn3(self.conv3(x))).flatten(1)
        x = F.relu(self.bn4(self.fc1(x)))
        return self.fc2(self.bn5(x + x))


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.2 + torch.rand(m.num_features, generator=g))
    return model


@pytest.fixture
def net():
    torch.manual_seed(0)
    return _randomize_bn(ConvBNNet())


def _bn_calls(qm):
    return [n for n in qm.graph.nodes if n.op == "call_module" and isinstance(qm.get_submodule(n.target), _BatchNorm)]


def _fused_calls(qm):
    return [n for n in qm.graph.nodes if n.op == "call_module" and isinstance(qm.get_submodule(n.target), BatchNormFold)]


def test_graph_quantizes_the_folded_weight_and_reads_the_output_after_the_correction(net):
    qm = qcompile.compile(net, torch.randn(2, 3, 8, 8), grad_bits=8, seed=0)
    fused = _fused_calls(qm)
    assert sorted(n.target for n in fused) == ["bn1", "bn2", "bn3", "bn4"]
    assert [n.target for n in _bn_calls(qm)] == ["bn5"]             # standalone: stays a per-channel affine op
    assert _bn_calls(qm)[0].meta["qc_bn"] == "affine"
    for node in fused:
        layer, x, weight, _, eval_bias = node.args
        wq = layer.args[1]
        assert qm.get_submodule(eval_bias.target).__class__.__name__ == "BiasQuant"   # the folded bias, rounded
        assert isinstance(qm.get_submodule(wq.target), Quantizer) and qm.get_submodule(wq.target).kind == "weight"
        assert wq.args[0].target is fold_weight and wq.args[0].args[0] is weight and weight.op == "get_attr"
        assert layer.args[2] is None                                 # the bias moved into the fold
        assert x is layer.args[0]                                    # same (gradient-quantized) activation
        users = list(node.users)
        assert len(users) == 1 and qm.get_submodule(users[0].target).kind == "activation"
        assert users[0].target.endswith("output_quant")
        assert not any(u.op == "call_module" and u.target.endswith("output_quant") for u in layer.users)
    grad_reads = [n for n in fused if n.args[1].op == "call_module"
                  and qm.get_submodule(n.args[1].target).kind == "gradient"]
    assert {n.target for n in grad_reads} == {"bn2", "bn3", "bn4"}  # bn1's conv reads the graph input
    assert set(net.state_dict()) <= set(qm.state_dict())
    loaded = qm.load_state_dict(net.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all("_quant" in k for k in loaded.missing_keys)


def test_eval_equivalence_with_quantization_off(net):
    x = torch.randn(16, 3, 8, 8)
    qm = qcompile.compile(net, x[:2], grad_bits=8, seed=0)
    net.eval(), qm.eval()
    with torch.no_grad(), qm.quantization_disabled():
        expected, got = net(x), qm(x)
    assert torch.linalg.vector_norm(got - expected) <= 1e-5 * torch.linalg.vector_norm(expected)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    scale, shift = bn_affine(qm.get_submodule("bn1"))
    bn = net.bn1
    assert torch.allclose(scale, bn.weight / torch.sqrt(bn.running_var + bn.eps))
    assert torch.allclose(qm.get_submodule("bn1").folded_bias(net.conv1.bias),
                          bn.bias + (net.conv1.bias - bn.running_mean) * scale)


def test_twenty_sgd_steps_track_float_conv_bn(net):
    # float64: the fused arithmetic is a reassociation of conv+BN, so in float32 the two runs drift
    # apart by rounding once a ReLU input crosses zero; in float64 they must agree to rounding
    net = net.double()
    torch.manual_seed(1)
    data = [(torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (16,))) for _ in range(20)]
    float_net = copy.deepcopy(net).train()
    qm = qcompile.compile(net, data[0][0][:2], grad_bits=4, seed=0).train()
    opt_f = torch.optim.SGD(float_net.parameters(), lr=0.05, momentum=0.9)
    opt_q = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
    losses_f, losses_q = [], []
    with qm.quantization_disabled():
        for x, y in data:
            for model, opt, losses in ((float_net, opt_f, losses_f), (qm, opt_q, losses_q)):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    assert min(losses_f[-5:]) < losses_f[0]                          # it trained
    assert losses_q == pytest.approx(losses_f, rel=1e-10)
    q_state = qm.state_dict()
    for k, v in float_net.state_dict().items():
        assert torch.allclose(q_state[k].double(), v.double(), rtol=1e-9, atol=1e-12), k


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (5, 2, 2, 1), (3, 1, "same", 2), (3, 2, 0, 1)])
def test_tap_coverage_counts_taps_that_read_the_input(kernel, stride, padding, dilation):
    x_shape, w_shape = (1, 1, 7, 6), (1, 1, kernel, kernel)
    cov = tap_coverage(F.conv2d, (stride, padding, dilation, 1), x_shape, w_shape)
    expected = torch.empty(kernel, kernel)
    for i in range(kernel):
        for j in range(kernel):
            tap = torch.zeros(w_shape)
            tap[0, 0, i, j] = 1.0
            expected[i, j] = F.conv2d(torch.ones(x_shape), tap, None, stride, padding, dilation).mean()
    if cov is None:
        assert torch.equal(expected, torch.ones(kernel, kernel))
    else:
        assert torch.allclose(cov, expected)


def test_freeze_after_n_steps_uses_running_statistics(net):
    x = torch.randn(8, 3, 8, 8)
    qm = qcompile.compile(net, x[:2], bn_freeze_steps=3).train()
    qm.get_submodule("bn5").eval()          # the standalone BatchNorm: running statistics throughout
    bn1 = qm.get_submodule("bn1")

    def running():
        return [b.clone() for n, b in qm.named_buffers() if "running" in n]

    def train_and_eval_outputs():
        out = qm(x)
        qm.eval()
        ref = qm(x)
        qm.train()
        qm.get_submodule("bn5").eval()
        return out, ref

    with torch.no_grad(), qm.quantization_disabled():
        for _ in range(2):
            qm(torch.randn(8, 3, 8, 8))
        assert not bn1.frozen
        out, ref = train_and_eval_outputs()                          # step 3: batch statistics
        assert not torch.allclose(out, ref, atol=1e-3)
        assert bn1.frozen and int(bn1.num_batches_tracked) == 3
        stats = running()
        out, ref = train_and_eval_outputs()                          # step 4: frozen
        assert torch.allclose(out, ref, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(stats, running()))


def test_config_and_unfoldable_batchnorms_stay_batchnorm():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.bn_nostats(self.conv2(y))

    x = torch.randn(2, 3, 6, 6)
    qm = qcompile.compile(Shared(), x)
    reasons = {n.target: n.meta["qc_bn_reason"] for n in _bn_calls(qm)}
    assert "other users" in reasons["bn"] and "track_running_stats" in reasons["bn_nostats"]
    assert not _fused_calls(qm)
    off = qcompile.compile(qcompile.models.get("models:lenet5_bn"), torch.randn(2, 1, 28, 28), fold_bn=False)
    assert len(_bn_calls(off)) == 3 and not _fused_calls(off)
    partial = qcompile.compile(qcompile.models.get("models:lenet5_bn"), torch.randn(2, 1, 28, 28),
                               overrides={"bn3": {"fold_bn": False}})
    assert [n.target for n in _bn_calls(partial)] == ["bn3"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_conv_bn_relu_models_fold_and_train(name):
    torch.manual_seed(0)
    model = qcompile.models.get(f"torchvision:{name}", num_classes=10)
    n_bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    qm = qcompile.compile(model, x[:1], grad_bits=8, seed=0, bn_rectification=0.1)
    assert not _bn_calls(qm) and len(_fused_calls(qm)) == n_bn
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    before = [p.detach().clone() for p in qm.parameters()]
    loss = F.cross_entropy(qm(x), y) + qm.regularization()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, qm.parameters()))
    assert all(int(qm.get_submodule(n.target).num_batches_tracked) == 1 for n in _fused_calls(qm))


# ---- rectification ---------------------------------------------------------------------------

def _block(scale_w=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, bias=False),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 4))
    with torch.no_grad():
        model[2].weight.mul_(scale_w)
    return model


def test_gain_is_invariant_to_rescaling_w_and_matches_white_noise_amplification():
    x = torch.randn(32, 3, 6, 6)
    gains = []
    for s in (1.0, 7.0):
        qm = qcompile.compile(_block(s), x[:2], grad_bits=8)
        qm.train()
        with qm.quantization_disabled():
            qm(x)
        gains.append(qm.get_submodule("3").gain_sq.detach())
    assert torch.allclose(gains[0], gains[1], rtol=1e-3)            # up to BatchNorm's eps in σ
    # the prediction is the expected ‖Jᵀε‖/‖ε‖ for white noise ε at the block output
    qm.train()
    block = qm.get_submodule("3")
    node = _fused_calls(qm)[0]
    from qcompile.train.bn_rectification import _Recorder
    with qm.quantization_disabled():
        rec = _Recorder(qm, [node, node.args[1]])
        rec.run(x.requires_grad_())
    out, inp = rec.values[node], rec.values[node.args[1]]
    noise = torch.randn(64, *out.shape, generator=torch.Generator().manual_seed(0))
    ratios = [torch.autograd.grad(out, inp, e, retain_graph=True)[0].norm() ** 2 / e.norm() ** 2 for e in noise]
    measured = float(torch.stack(ratios).mean().sqrt())
    predicted = float(block.gain_sq.mean().sqrt())
    assert measured == pytest.approx(predicted, rel=0.05)


def test_rectification_loss_penalizes_only_gain_above_one_and_lowers_it():
    x = torch.randn(32, 3, 6, 6)
    qm = qcompile.compile(_block(), x[:2], grad_bits=8, bn_rectification=0.5)
    assert isinstance(qm.regularizers["bn_rectification"], BNRectificationLoss)
    assert "bn_rectification" not in dict(qm.named_modules())["regularizers"].state_dict()
    with pytest.raises(RuntimeError, match="has not run yet"):
        qm.regularization()
    block = qm.get_submodule("3")
    qm.train()
    with torch.no_grad():
        block.weight.fill_(5.0)
    qm(x)
    gain_sq = block.gain_sq.mean().item()
    assert gain_sq > 1 and qm.regularization().item() == pytest.approx(0.5 * (gain_sq - 1), rel=1e-5)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    for _ in range(5):
        qm(x)
        opt.zero_grad()
        qm.regularization().backward()
        opt.step()
    qm(x)
    assert block.gain_sq.mean().item() < gain_sq
    with torch.no_grad():
        block.weight.fill_(0.05)
    qm(x)
    assert qm.regularization().item() == 0.0
    off = qcompile.compile(_block(), x[:2], grad_bits=8)
    assert "bn_rectification" not in off.regularizers and not off.get_submodule("3").rectification


def test_input_layer_gets_no_rectification_term():
    qm = qcompile.compile(qcompile.models.get("models:lenet5_bn"), torch.randn(2, 1, 28, 28), grad_bits=8,
                          bn_rectification=0.1)
    assert [n for n, _ in qm.regularizers["bn_rectification"].blocks] == ["bn2", "bn3"]


def test_noise_amplification_measures_without_side_effects(mnist):
    torch.manual_seed(0)
    qm = qcompile.compile(qcompile.models.get("models:lenet5_bn"), mnist.x_train[:2], grad_bits=4, seed=0)
    x, y = mnist.x_train[:64], mnist.y_train[:64]
    qm.train()
    qm(x)
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    gen_state = qm.get_submodule("fc1.grad_quant").generator.get_state()
    result = noise_amplification(qm, x, y)
    err = weight_gradient_error(qm, x, y, "conv1")
    assert set(result) == {"bn2", "bn3"}
    for r in result.values():
        assert r["error_norm"] > 0 and r["measured"] == pytest.approx(r["predicted"], rel=0.25)
    assert 0 < err["rel"] and err["abs"] > 0
    assert all(torch.equal(state[k], v) for k, v in qm.state_dict().items())
    assert torch.equal(gen_state, qm.get_submodule("fc1.grad_quant").generator.get_state())
    assert f"measured {result['bn2']['measured']:.3f}" in qm.summary()
    assert all(r["signal"] > 0 for r in result.values())
    with pytest.raises(ValueError, match="grad_bits"):
        noise_amplification(qcompile.compile(qcompile.models.get("models:lenet5_bn"), x[:2]), x, y)


def test_lowered_graph_has_no_batchnorm_and_matches_eval(mnist):
    import numpy as np
    from qcompile.ir.lower import lower
    from qcompile.backends import reference as ref
    from qcompile.tools.training import train_classifier
    torch.manual_seed(0)
    qm = qcompile.compile(qcompile.models.get("models:lenet5_bn"), mnist.x_train[:2], grad_bits=8, seed=0)
    qm.calibrate([mnist.x_train[:256]])
    train_classifier(qm, mnist.x_train[:640], mnist.y_train[:640], epochs=1, batch_size=64, lr=0.05)
    qm.eval()
    graph = lower(qm)
    assert {op.kind for op in graph.ops} == {"conv2d", "max_pool2d", "reshape", "linear"}
    x = mnist.x_test[:300]
    with torch.no_grad():
        y = qm(x)
    codes = ref.run(graph, x)
    steps = np.rint(np.abs(ref.dequantize(graph, codes) - y.double().numpy()) / graph.tensor(graph.outputs[0]).scale)
    assert (steps <= 1).mean() >= 0.99
    assert (codes.argmax(1) == y.argmax(1).numpy()).mean() >= 0.98


def test_narrow_accumulator_layers_take_batch_statistics_from_a_float_conv():
    """A narrow accumulator may overflow the folded output, so its BatchNorm's batch statistics come
    from a float conv; with quantization off both paths are float conv+BN in train mode, gradients included."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 10, 10)
    ref_model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU())
    with torch.no_grad():
        ref_model[1].weight.uniform_(0.5, 2.0)
        ref_model[1].bias.uniform_(-1, 1)
    assert all(n.kwargs.get("float_statistics") for n in _fused_calls(qcompile.compile(ref_model, x[:2], acc_bits=16)))
    outs, grads = [], []
    for float_statistics in (False, True):
        qm = qcompile.compile(ref_model, x[:2])
        (fold,) = _folds(qm)
        (call,) = _fused_calls(qm)
        assert "float_statistics" not in call.kwargs
        _float_statistics(qm, float_statistics)
        qm.train()
        with qm.quantization_disabled():
            out = qm(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(fold.weight.grad.clone())
    expected = ref_model.train()(x)
    expected.square().sum().backward()
    for out, grad in zip(outs, grads):
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(grad, ref_model[1].weight.grad, rtol=1e-3, atol=1e-4)


def _folds(qm):
    return [m for m in qm.modules() if isinstance(m, BatchNormFold)]


def _float_statistics(qm, on: bool) -> None:
    """Call every folded BatchNorm with float_statistics=`on` (what narrow_acc sets for narrow layers)."""
    for call in _fused_calls(qm):
        call.update_kwarg("float_statistics", on)
    qm.recompile()


def test_overflow_does_not_reach_the_batch_statistics_gradient():
    """With a wrapping narrow accumulator the folded output differs from the float statistics' conv; the
    gradient of γ (through μ_B, σ_B and the normalized values) is BatchNorm's on those statistics: the
    same as with an exact accumulator for the same upstream gradient, however far the output wrapped."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 10, 10)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
    g = torch.randn(8, 6, 10, 10)
    outs, grads = [], []
    for acc in (dict(acc_bits=9, tile=4, overflow="wrap"), dict()):
        qm = qcompile.compile(copy.deepcopy(model), x[:2], **acc)
        _float_statistics(qm, True)                       # the same statistics (float weights) in both
        qm.train()
        out = qm(x)
        (out * g).sum().backward()
        outs.append(out.detach())
        grads.append(_folds(qm)[0].weight.grad)
    assert (outs[0] - outs[1]).abs().max() > 1.0          # the 9-bit accumulator wrapped
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_folded_weight_storage_never_changes_a_tensor_still_held():
    """A folded weight is written into storage kept for its weight (qcompile.train.reused_storage): reused
    once nothing else holds it, never while an earlier output is alive (held by the caller, or saved by a
    graph not yet run backward: two forwards then one backward give the input and weight gradients of two
    separate backward passes, bit for bit). Its bits and gradient (also with create_graph) equal the product
    W·γ/σ's."""
    from qcompile.core.batchnorm import bn_scale
    from qcompile.train.estimators import CurrentMinMax

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen)
    gamma, var = torch.rand(16, generator=gen) + 0.5, torch.rand(16, generator=gen) + 0.1
    first = fold_weight(w, gamma, var, 1e-5)
    kept = first.clone()
    second = fold_weight(w, gamma * 2, var, 1e-5)
    assert torch.equal(first, kept) and first.data_ptr() != second.data_ptr()
    ptr = second.data_ptr()
    del first, second
    assert fold_weight(w, gamma, var, 1e-5).data_ptr() == ptr          # nothing else holds it: reused
    a = w.clone().requires_grad_()
    got = fold_weight(a, gamma, var, 1e-5)
    want = w.clone().requires_grad_()
    expected = want * bn_scale(gamma, var, 1e-5).reshape(-1, 1, 1, 1)
    assert torch.equal(got.detach().view(torch.int32), expected.detach().view(torch.int32))
    g = torch.randn(w.shape, generator=gen)
    got.backward(g)
    expected.backward(g)
    assert torch.equal(a.grad, want.grad)
    gg = g.clone().requires_grad_()                            # create_graph: the gradient is differentiable
    gw, = torch.autograd.grad(fold_weight(a, gamma, var, 1e-5), a, gg, create_graph=True)
    gw.sum().backward()
    assert torch.equal(gw, a.grad) and torch.equal(gg.grad, bn_scale(gamma, var, 1e-5).reshape(-1, 1, 1, 1).expand_as(g))

    def input_grads(together: bool):
        layer = torch.nn.Conv2d(8, 16, 3, bias=False)
        layer.weight.data.copy_(w)
        wq = Quantizer("weight", 8, True, CurrentMinMax(shape=(16,), axis=0), axis=0, layer="conv").train()
        xs = [torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(i)).requires_grad_() for i in range(2)]
        losses = (torch.nn.functional.conv2d(x, wq(fold_weight(layer.weight, gamma * (i + 1), var, 1e-5))).square().sum()
                  for i, x in enumerate(xs))
        if together:           # the first graph's Q and folded weight are alive when the second is made
            sum(losses).backward()
        else:
            for loss in losses:
                loss.backward()
        return [x.grad for x in xs] + [layer.weight.grad]

    for got, want in zip(input_grads(together=True), input_grads(together=False)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("min_values", [None, 0])
def test_batch_statistics_of_the_unfolded_output_match_batchnorm_of_it(native_on, min_values, monkeypatch):
    """In training with batch statistics, BatchNormFold(y) is BatchNorm(z) for z = y/(γ/σ_r): its output, the
    gradients of y (z's divided by the fold), γ and β, the running statistics and the recorded batch variance,
    with γ negative, zero (the fold floored at FOLD_EPS) and positive, momentum or a cumulative average. With
    the C kernel (QCOMPILE_NATIVE on) and y of at least UNFOLDED_MIN_VALUES values (min_values: that bound,
    or 0), z is never formed (the moments of y give z's); else torch's BatchNorm runs on z."""
    from qcompile.train import fused_bn
    if not native_on:
        monkeypatch.setenv("QCOMPILE_NATIVE", "0")
    if min_values is not None:
        monkeypatch.setattr(fused_bn, "UNFOLDED_MIN_VALUES", min_values)
    gen = torch.Generator().manual_seed(1)
    for shape, momentum in (((8, 16, 5, 7), 0.1), ((16, 12), None), ((4, 20, 30, 30), 0.1)):
        c = shape[1]
        bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(c, momentum=momentum)
        with torch.no_grad():
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.weight[0] = 0.0
            bn.bias.copy_(torch.randn(c, generator=gen))
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        ref = copy.deepcopy(bn)
        fused = BatchNormFold(bn, "layer", F.conv2d if len(shape) == 4 else F.linear).train()
        y = torch.randn(shape, generator=gen) * 3 + 2
        g = torch.randn(shape, generator=gen)
        unfolded = native_on and y.numel() >= fused_bn.UNFOLDED_MIN_VALUES
        for step in range(2):                              # momentum None: the cumulative average's second step too
            fold = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)      # the running variance moves
            fold = torch.where(fold.abs() < fused_bn.FOLD_EPS, torch.full_like(fold, fused_bn.FOLD_EPS), fold)
            fold = fold.reshape(1, -1, *[1] * (len(shape) - 2))
            yy, z = y.clone().requires_grad_(), (y / fold).requires_grad_()
            bn.weight.grad = bn.bias.grad = ref.weight.grad = ref.bias.grad = None
            out, want = fused(yy, torch.zeros(1), torch.zeros(1)), ref(z)
            assert type(out.grad_fn).__name__ == ("_NormalizeUnfoldedBackward" if unfolded else "NativeBatchNormBackward0")
            torch.testing.assert_close(out, want)
            out.backward(g)
            want.backward(g)
            torch.testing.assert_close(yy.grad, z.grad / fold)
            for a, b in ((bn.weight.grad, ref.weight.grad), (bn.bias.grad, ref.bias.grad),
                         (bn.running_mean, ref.running_mean), (bn.running_var, ref.running_var)):
                # to float32 rounding of the largest entry: γ's gradient is a sum of n·hw terms that can cancel
                torch.testing.assert_close(a, b, rtol=1.3e-6, atol=2e-6 * float(b.abs().max()))
            var = fused._gain_inputs[0]                            # the variance, or a function giving it
            torch.testing.assert_close(var() if callable(var) else var, torch.var(z.detach(), dim=[0, *range(2, z.dim())],
                                                                        unbiased=False))


def test_the_fold_cancels_while_batchnorm_uses_batch_statistics(net, monkeypatch):
    """With the default weight quantizer (symmetric per-channel current min-max: it commutes with per-row
    scaling), a training step with batch statistics forms no folded weight and no eval bias: the layer reads Q(W)
    and BatchNorm normalizes its output as it is. Once the statistics freeze, and in eval, both are formed. The losses,
    gradients, running statistics and eval outputs equal those of the same model made to fold every step."""
    from qcompile.train import fused_bn

    products, base = [], fused_bn._FoldWeight

    class CountedFold(base):
        @staticmethod
        def forward(ctx, weight, scale, storage):
            products.append(tuple(weight.shape))
            return base.forward(ctx, weight, scale, storage)

    monkeypatch.setattr(fused_bn, "_FoldWeight", CountedFold)
    biases, affine = [], fused_bn.affine
    monkeypatch.setattr(fused_bn, "affine", lambda *a: biases.append(1) or affine(*a))   # folded_bias's arithmetic
    torch.manual_seed(2)
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(4)]
    qm = qcompile.compile(net, data[0][0][:2], grad_bits=8, seed=0, bn_freeze_steps=3).train()
    folds = [m for m in qm.modules() if isinstance(m, BatchNormFold)]
    assert len(folds) == 4 and all(m.fold_cancels for m in folds)
    twin = copy.deepcopy(qm)
    for m in twin.modules():
        if isinstance(m, BatchNormFold):
            m.fold_cancels = False
    counts, losses = {}, {}
    for name, model in (("cancelled", qm), ("folded", twin)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        losses[name], counts[name] = [], []
        for x, y in data:
            products.clear(), biases.clear()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
            counts[name].append((len(products), len(biases)))
    assert counts == {"cancelled": [(0, 0)] * 3 + [(4, 4)], "folded": [(4, 4)] * 4}    # step 4: frozen statistics
    assert losses["cancelled"] == pytest.approx(losses["folded"], rel=1e-5)
    state, twin_state = qm.state_dict(), twin.state_dict()
    for k in net.state_dict():
        torch.testing.assert_close(state[k], twin_state[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    qm.eval(), twin.eval()
    products.clear(), biases.clear()
    with torch.no_grad():
        torch.testing.assert_close(qm(data[0][0]), twin(data[0][0]), rtol=1e-4, atol=1e-4)
    assert len(products) == len(biases) == 8


def test_the_fold_cancels_only_where_the_weight_grid_commutes_with_row_scaling(net):
    """Per-row symmetric current min-max quantization commutes with a per-row scale of either sign (the codes of
    W·d are ± those of W); a power-of-two step or a per-tensor grid does not, and those configs, a quantized
    weight gradient or a narrow accumulator keep the fold. The quantize pass's check refuses the flag set
    where the weight quantizer does not commute."""
    from qcompile.errors import VerificationError
    from qcompile.passes import quantize as quantize_pass
    from qcompile.train.estimators import CurrentMinMax

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen)
    d = (torch.rand(16, generator=gen) * 3 + 0.2) * torch.where(torch.arange(16) % 3 == 0, -1.0, 1.0)
    d = d.reshape(-1, 1, 1, 1)

    def quantizer(pow2: bool) -> Quantizer:
        return Quantizer("weight", 4, True, CurrentMinMax(shape=(16,), axis=0), axis=0, pow2=pow2, layer="c").train()

    plain, pow2 = quantizer(False), quantizer(True)
    assert plain.commutes_with_row_scaling() and not pow2.commutes_with_row_scaling()
    torch.testing.assert_close(plain(w * d), plain(w) * d, rtol=1e-6, atol=0)
    assert not torch.allclose(pow2(w * d), pow2(w) * d, rtol=1e-3)

    x = torch.randn(2, 3, 8, 8)
    for config, cancels in (({}, True), ({"quantize_weights": False}, True), ({"pow2_scales": True}, False),
                            ({"weight_granularity": "per_tensor"}, False), ({"weight_range": "hindsight"}, False),
                            ({"grad_bits": 8, "quantize_weight_grad": True}, False),
                            ({"grad_bits": 8, "acc_bits": 12}, False)):
        qm = qcompile.compile(net, x, **config)
        assert {m.fold_cancels for m in qm.modules() if isinstance(m, BatchNormFold)} == {cancels}, config
    qm = qcompile.compile(net, x, pow2_scales=True)
    qm.get_submodule("bn2").fold_cancels = True
    with pytest.raises(VerificationError, match="commutes with per-row scaling"):
        quantize_pass.verify(qm, qcompile.QConfig(pow2_scales=True))
