"""ir.verify: lowered graphs meet the IR specification; broken ones are rejected naming the op."""
import copy

import numpy as np
import pytest
from lowering_models import trained_once

import qcompile
from qcompile import ir
from qcompile.ir.verify import IRError


@pytest.fixture(scope="module")
def zoo_graph():
    return qcompile.lower(trained_once("OpZoo", (8, 3, 16, 16)))


def test_lowered_graph_meets_the_specification(zoo_graph):
    assert ir.verify(zoo_graph) is zoo_graph
    assert {op.kind for op in zoo_graph.ops} <= set(ir.SPEC)


def _first(graph, kind):
    return next(op for op in graph.ops if op.kind == kind)


@pytest.mark.parametrize("breakage, message", [
    (lambda g: _first(g, "conv2d").attrs.pop("multiplier"), r"'(\S+)' \(conv2d\): missing attribute 'multiplier'"),
    (lambda g: _first(g, "conv2d").attrs.update(frobnicate=1), r"\(conv2d\): attributes \['frobnicate'\]"),
    (lambda g: _first(g, "conv2d").attrs.update(stride=3), r"\(conv2d\): attribute 'stride'"),
    (lambda g: _first(g, "conv2d").attrs.update(bias=_first(g, "conv2d").attrs["bias"][:-1]),
     r"\(conv2d\): bias has shape"),
    (lambda g: _first(g, "requantize").attrs.update(multiplier=12345), r"\(requantize\): requantization multiplier 12345"),
    (lambda g: _first(g, "add").attrs.update(act_min=10 ** 6), r"\(add\): act_min\.\.act_max"),
    (lambda g: _first(g, "conv2d").attrs.update(acc_bits=16, tile=0), r"\(conv2d\): tile=0"),
    (lambda g: _first(g, "lut").attrs.update(table=_first(g, "lut").attrs["table"][..., :10]), r"\(lut\): table has 10"),
    (lambda g: g.ops.reverse(), r"is not a graph input nor the output of an earlier op"),
    (lambda g: setattr(_first(g, "mul"), "kind", "softmax"), r"\(softmax\): unknown kind"),
])
def test_broken_graphs_are_rejected_naming_the_op(zoo_graph, breakage, message):
    g = copy.deepcopy(zoo_graph)
    breakage(g)
    with pytest.raises(IRError, match=message):
        ir.verify(g)


def test_tensors_are_checked(zoo_graph):
    g = copy.deepcopy(zoo_graph)
    name = g.inputs[0]
    g.tensors[name].zero_point = 999
    with pytest.raises(IRError, match=f"tensor '{name}': zero point 999"):
        ir.verify(g)


def test_backends_refuse_a_graph_that_breaks_the_specification(zoo_graph, tmp_path):
    from qcompile.backends import onnx as onnx_backend
    g = copy.deepcopy(zoo_graph)
    _first(g, "conv2d").attrs["shift"] = np.zeros(1, dtype=np.int64)
    with pytest.raises(IRError, match="shift has shape"):
        onnx_backend.to_onnx(g)
