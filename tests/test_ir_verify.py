"""ir.verify: lowered graphs meet the IR specification; broken ones are rejected naming the op."""
import copy
import dataclasses

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
    assert all(type(op.attrs) is ir.SPEC[op.kind] for op in zoo_graph.ops)


def test_the_attrs_classes_are_the_specification():
    """Required fields have no default; the optional ones default to the exact, saturating accumulator."""
    conv = {f.name: f for f in dataclasses.fields(ir.Conv2d)}
    assert conv["multiplier"].default is dataclasses.MISSING and conv["act_min"].default is dataclasses.MISSING
    assert (conv["acc_bits"].default, conv["tile"].default, conv["overflow"].default) == (None, None, "saturate")
    assert conv["weight_scale"].default is None
    assert "global_pool" in {f.name for f in dataclasses.fields(ir.AvgPool2d)}
    with pytest.raises(TypeError):
        ir.Requantize(multiplier=1 << 30, shift=1, act_min=0)          # act_max is required


def _first(graph, kind):
    return next(op for op in graph.ops if op.kind == kind)


def _set(op, **values):
    for name, value in values.items():
        setattr(op.attrs, name, value)


@pytest.mark.parametrize("breakage, message", [
    (lambda g: delattr(_first(g, "conv2d").attrs, "multiplier"), r"'(\S+)' \(conv2d\): missing attribute 'multiplier'"),
    (lambda g: _set(_first(g, "conv2d"), multiplier=None),
     r"\(conv2d\): attribute 'multiplier' = None has the wrong type or shape: expected an integer numpy array of 1"),
    (lambda g: _set(_first(g, "conv2d"), frobnicate=1), r"\(conv2d\): attributes \['frobnicate'\]"),
    (lambda g: setattr(_first(g, "mul"), "attrs", ir.Add(**vars(_first(g, "mul").attrs), left_shift=20,
                                                            multiplier_a=1 << 30, shift_a=1, multiplier_b=1 << 30,
                                                            shift_b=1)),
     r"\(mul\): attrs is a Add, expected ir.Mul"),
    (lambda g: setattr(_first(g, "mul"), "attrs", vars(_first(g, "mul").attrs)), r"\(mul\): attrs is a dict"),
    (lambda g: _set(_first(g, "conv2d"), stride=3), r"\(conv2d\): attribute 'stride'"),
    (lambda g: _set(_first(g, "conv2d"), overflow="clip"),
     r"\(conv2d\): attribute 'overflow' = 'clip'.*one of \['saturate', 'wrap', 'pairwise'\]"),
    (lambda g: _set(_first(g, "avg_pool2d"), global_pool=1), r"\(avg_pool2d\): attribute 'global_pool'.*a bool"),
    (lambda g: _set(_first(g, "conv2d"), bias=_first(g, "conv2d").attrs.bias[:-1]), r"\(conv2d\): bias has shape"),
    (lambda g: _set(_first(g, "requantize"), multiplier=12345), r"\(requantize\): requantization multiplier 12345"),
    (lambda g: _set(_first(g, "add"), act_min=10 ** 6), r"\(add\): act_min\.\.act_max"),
    (lambda g: _set(_first(g, "conv2d"), acc_bits=16, tile=0), r"\(conv2d\): tile=0"),
    (lambda g: _set(_first(g, "lut"), table=_first(g, "lut").attrs.table[..., :10]), r"\(lut\): table has 10"),
    (lambda g: g.ops.reverse(), r"is not a graph input nor the output of an earlier op"),
    (lambda g: setattr(_first(g, "mul"), "kind", "gather"), r"\(gather\): unknown kind"),
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
    _first(g, "conv2d").attrs.shift = np.zeros(1, dtype=np.int64)
    with pytest.raises(IRError, match="shift has shape"):
        onnx_backend.to_onnx(g)
