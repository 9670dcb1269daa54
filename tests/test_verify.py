"""Each pass's verify() rejects a graph that breaks the pass's invariant, naming the pass and node.

A graph is broken by wrapping one pass of the pipeline with a function that edits its output, then
compiling with verification on: the error must come from that pass's verify, right after it.
That every legitimately compiled model passes all verifies is covered by the whole suite: conftest
sets QCOMPILE_VERIFY=1, so every compile in every test runs them.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile import QConfig
from qcompile.errors import QCompileError, VerificationError
from qcompile.passes import pipeline
from qcompile.train.fused_bn import BatchNormFold
from qcompile.train.quantizers import Quantizer
from qcompile.train.tiled import NarrowAccOp


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


def _sabotage(monkeypatch, pass_name, edit):
    """Make `pass_name` run `edit(gm)` on its output; returns a dict `edit` may record into."""
    seen = {}
    wrapped = []
    for name, run in pipeline.PIPELINE:
        if name == pass_name:
            def run(gm, config, _run=run):
                _run(gm, config)
                edit(gm, seen)
                return gm
        wrapped.append((name, run))
    monkeypatch.setattr(pipeline, "PIPELINE", tuple(wrapped))
    return seen


def _module_nodes(gm, kind):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)]


def _layer_node(gm, layer):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.conv2d, F.linear)
                and n.meta.get("qc_layer") == layer)


def test_quantize_rejects_conv_reading_around_its_input_quantizer(monkeypatch, small_net):
    def edit(gm, seen):
        conv = _layer_node(gm, "conv1")
        q = conv.args[0]
        assert isinstance(gm.get_submodule(q.target), Quantizer)
        conv.update_arg(0, q.args[0])          # the model input, unquantized
        seen["node"] = conv.name

    seen = _sabotage(monkeypatch, "quantize", edit)
    with pytest.raises(VerificationError, match="'quantize'") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), verify=True)
    assert repr(seen["node"]) in str(err.value) and "conv2d" in str(err.value) and "grid" in str(err.value)


def test_quantize_rejects_a_user_reading_a_layer_result_before_its_output_quantizer(monkeypatch, small_net):
    def edit(gm, seen):
        conv = _layer_node(gm, "conv2")
        out_q = next(iter(conv.users))
        for user in list(out_q.users):
            user.replace_input_with(out_q, conv)   # relu now reads the unquantized conv output
        seen["node"] = conv.name

    seen = _sabotage(monkeypatch, "quantize", edit)
    with pytest.raises(VerificationError, match="output activation Quantizer") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), verify=True)
    assert repr(seen["node"]) in str(err.value)


def test_quantize_rejects_an_unquantized_weight(monkeypatch, small_net):
    def edit(gm, seen):
        fc = _layer_node(gm, "fc")
        fc.update_arg(1, fc.args[1].args[0])    # the float get_attr weight
        seen["node"] = fc.name

    seen = _sabotage(monkeypatch, "quantize", edit)
    with pytest.raises(VerificationError, match="weight Quantizer") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), verify=True)
    assert repr(seen["node"]) in str(err.value) and "linear" in str(err.value)


def test_narrow_acc_rejects_a_plain_conv_for_a_layer_with_acc_bits(monkeypatch, small_net):
    def edit(gm, seen):
        node = next(n for n in _module_nodes(gm, NarrowAccOp) if gm.get_submodule(n.target).layer == "conv2")
        op = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_function(F.conv2d, (*node.args, op.stride, op.padding, op.dilation, op.groups))
        conv.meta.update(node.meta)
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        seen["node"] = conv.name

    seen = _sabotage(monkeypatch, "narrow_acc", edit)
    with pytest.raises(VerificationError, match="'narrow_acc'") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), acc_bits=16, verify=True)
    assert repr(seen["node"]) in str(err.value) and "NarrowAccOp" in str(err.value)


def test_narrow_acc_rejects_an_op_reading_the_scale_of_another_grid(monkeypatch, small_net):
    def edit(gm, seen):
        node = next(n for n in _module_nodes(gm, NarrowAccOp) if gm.get_submodule(n.target).layer == "conv2")
        node.update_kwarg("a_scale", node.kwargs["b_scale"])     # the weight's scale for the input's
        seen["node"] = node.name

    seen = _sabotage(monkeypatch, "narrow_acc", edit)
    with pytest.raises(VerificationError, match="'narrow_acc'.*a_scale") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), acc_bits=16, verify=True)
    assert repr(seen["node"]) in str(err.value) and "conv2.weight_quant.scale" in str(err.value)


def test_narrow_acc_rejects_a_user_of_the_result_tuple(monkeypatch, small_net):
    """With log_barrier the op returns (y, exact): a user must read y through getitem(op, 0)."""
    def edit(gm, seen):
        node = next(n for n in _module_nodes(gm, NarrowAccOp) if gm.get_submodule(n.target).layer == "conv2")
        y = next(u for u in node.users if u.args[1] == 0)
        y.replace_all_uses_with(node)
        gm.graph.erase_node(y)
        seen["node"] = node.name

    seen = _sabotage(monkeypatch, "narrow_acc", edit)
    with pytest.raises(VerificationError, match="'narrow_acc'.*getitem") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), acc_bits=16, log_barrier=True, verify=True)
    assert repr(seen["node"]) in str(err.value)


def test_narrow_acc_rejects_a_folded_batchnorm_without_float_statistics(monkeypatch):
    """A BatchNorm folded into a layer with a narrow accumulator must take its batch statistics from a
    float conv (the call's keyword float_statistics=True, set by narrow_acc)."""
    def edit(gm, seen):
        node = next(iter(_module_nodes(gm, BatchNormFold)))
        node.update_kwarg("float_statistics", False)
        seen["node"] = node.name

    seen = _sabotage(monkeypatch, "narrow_acc", edit)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(VerificationError, match="'narrow_acc'.*float_statistics=True") as err:
        qcompile.compile(model, torch.randn(2, 3, 8, 8), acc_bits=16, verify=True)
    assert repr(seen["node"]) in str(err.value)


def test_fold_bn_rejects_a_batchnorm_call_where_folding_applied(monkeypatch):
    def edit(gm, seen):
        fold = _module_nodes(gm, BatchNormFold)[0]
        gm.add_submodule("bn_again", nn.BatchNorm2d(8))
        with gm.graph.inserting_after(fold):
            bn = gm.graph.call_module("bn_again", (fold.args[0],))
        fold.replace_all_uses_with(bn)
        gm.graph.erase_node(fold)
        seen["node"] = bn.name

    seen = _sabotage(monkeypatch, "fold_bn", edit)
    with pytest.raises(VerificationError, match="'fold_bn'") as err:
        qcompile.compile(ConvBN(), torch.randn(2, 3, 8, 8), verify=True)
    assert repr(seen["node"]) in str(err.value) and "BatchNorm2d" in str(err.value)


def test_fold_bn_rejects_a_folded_layer_reading_the_unfolded_weight(monkeypatch):
    def edit(gm, seen):
        conv = _layer_node(gm, "conv1")
        conv.update_arg(1, conv.args[1].args[0])  # fold_weight(W, ...) -> W
        seen["node"] = conv.name

    seen = _sabotage(monkeypatch, "fold_bn", edit)
    with pytest.raises(VerificationError, match="fold_weight") as err:
        qcompile.compile(ConvBN(), torch.randn(2, 3, 8, 8), verify=True)
    assert repr(seen["node"]) in str(err.value)


def test_fold_bn_rejects_a_folded_bias_that_cannot_tell_when_the_fold_cancels(monkeypatch):
    from qcompile.train.fused_bn import folded_bias

    def edit(gm, seen):
        bias = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is folded_bias)
        bias.args = bias.args[:6]                 # without the BatchNormFold module
        seen["node"] = bias.name

    seen = _sabotage(monkeypatch, "fold_bn", edit)
    with pytest.raises(VerificationError, match="'fold_bn'.*the BatchNormFold module 'bn1' as an argument") as err:
        qcompile.compile(ConvBN(), torch.randn(2, 3, 8, 8), verify=True)
    assert repr(seen["node"]) in str(err.value)


def test_normalize_rejects_inplace_and_trace_rejects_missing_shapes(monkeypatch, small_net):
    def inplace(gm, seen):
        relu = next(n for n in gm.graph.nodes if n.target is F.relu)
        relu.kwargs = {"inplace": True}
        seen["node"] = relu.name

    seen = _sabotage(monkeypatch, "normalize", inplace)
    with pytest.raises(VerificationError, match="inplace=True") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), verify=True)
    assert repr(seen["node"]) in str(err.value)

    real_trace = pipeline.trace

    def trace(*args):
        gm = real_trace(*args)
        del next(n for n in gm.graph.nodes if n.op == "placeholder").meta["tensor_meta"]
        return gm

    monkeypatch.setattr(pipeline, "trace", trace)
    with pytest.raises(VerificationError, match="'trace'.*tensor_meta"):
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), verify=True)


def test_regularize_rejects_a_missing_log_barrier(monkeypatch, small_net):
    seen = _sabotage(monkeypatch, "regularize", lambda gm, seen: gm.regularizers.pop("log_barrier"))
    with pytest.raises(VerificationError, match=r"regularizers\['log_barrier'\] is missing"):
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), acc_bits=16, log_barrier=True, verify=True)
    assert seen == {}


def test_regularize_rejects_a_barrier_reading_the_result_for_the_exact_accumulator(monkeypatch, small_net):
    def edit(gm, seen):
        call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "regularizers.log_barrier")
        first = call.args[0]
        op = first[0].args[0]
        y = next(u for u in op.users if u.args[1] == 0)
        call.update_arg(0, (y, *first[1:]))
        seen["node"] = call.name

    seen = _sabotage(monkeypatch, "regularize", edit)
    with pytest.raises(VerificationError, match="'regularize'.*exact accumulator") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), acc_bits=16, log_barrier=True, verify=True)
    assert repr(seen["node"]) in str(err.value)


def test_regularize_rejects_a_second_barrier_node(monkeypatch, small_net):
    def edit(gm, seen):
        call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "regularizers.log_barrier")
        with gm.graph.inserting_after(call):
            seen["node"] = gm.graph.call_module(call.target, call.args).name

    seen = _sabotage(monkeypatch, "regularize", edit)
    with pytest.raises(VerificationError, match="'regularize'.*no second node") as err:
        qcompile.compile(small_net, torch.randn(2, 3, 8, 8), acc_bits=16, log_barrier=True, verify=True)
    assert repr(seen["node"]) in str(err.value)


def test_verification_error_is_a_qcompile_error():
    assert issubclass(VerificationError, QCompileError)


def _record(monkeypatch):
    calls = []
    for name, check in list(pipeline.VERIFIERS.items()):
        def recorder(gm, config, _name=name, _check=check):
            calls.append(_name)
            _check(gm, config)
        monkeypatch.setitem(pipeline.VERIFIERS, name, recorder)
    return calls


def test_qconfig_verify_runs_every_verify_after_its_pass(monkeypatch, small_net):
    monkeypatch.delenv("QCOMPILE_VERIFY", raising=False)
    calls = _record(monkeypatch)
    qcompile.compile(small_net, torch.randn(2, 3, 8, 8))
    assert calls == []                              # off by default
    qm = qcompile.compile(small_net, torch.randn(2, 3, 8, 8), QConfig(verify=True))
    assert calls == ["trace"] + [name for name, _ in pipeline.PIPELINE]
    assert [s.name for s in qm.pass_snapshots] == calls


def test_environment_variable_turns_verification_on(monkeypatch, small_net):
    monkeypatch.setenv("QCOMPILE_VERIFY", "1")
    calls = _record(monkeypatch)
    qcompile.compile(small_net, torch.randn(2, 3, 8, 8))
    assert calls == ["trace"] + [name for name, _ in pipeline.PIPELINE]
    monkeypatch.setenv("QCOMPILE_VERIFY", "0")
    calls.clear()
    qcompile.compile(small_net, torch.randn(2, 3, 8, 8))
    assert calls == []


def test_verify_field_is_validated():
    with pytest.raises(ValueError, match="QConfig.verify"):
        QConfig(verify="yes")
    assert QConfig.from_dict({"verify": True}).verify is True
