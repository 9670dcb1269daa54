"""ONNX export of the transformer ops (softmax, layer_norm, constant, linear on rows, batched matmul):
onnxruntime's codes equal the integer reference's bit for bit, in QDQ and QOperator form, on every
intermediate tensor the graph exposes as an output."""
import dataclasses
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompile import ir
from qcompile.backends import reference as ref
from qcompile.backends.onnx import _Builder, onnxruntime_session, to_onnx
from qcompile.backends.parity import float_to_codes
from qcompile.core.requant import quantize_multiplier
from transformer_graphs import attention_graph, layer_norm_op, softmax_op, tensor

FORMATS = ["qdq", "qop"]
ATTENTION_TENSORS = ["ln", "qkv", "q", "kt", "scores", "probs", "ctx", "const", "y"]


def exposing(graph: ir.Graph, names) -> ir.Graph:
    """The same graph with `names` (intermediate tensors) as its outputs."""
    return ir.verify(dataclasses.replace(graph, outputs=list(names)))


def onnx_codes(graph: ir.Graph, model: onnx.ModelProto, *codes) -> list:
    """Output codes (one array per graph output) of onnxruntime fed the floats that quantize to `codes`."""
    feeds = []
    for c, name in zip(codes, graph.inputs):
        t = graph.tensor(name)
        f = ((np.asarray(c) - t.zero_point) * t.scale).astype(np.float32)
        assert np.array_equal(ref.quantize_input(graph, f, name), c)       # the input grid gives back the codes
        feeds.append(f)
    sess = onnxruntime_session(model.SerializeToString())
    outs = sess.run(None, dict(zip([i.name for i in model.graph.input], feeds)))
    return [float_to_codes(graph, y, name) for y, name in zip(outs, graph.outputs)]


def assert_bit_exact(graph: ir.Graph, fmt: str, *codes, opset=None) -> onnx.ModelProto:
    model = to_onnx(graph, fmt, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    want = ref.run_codes(graph, *codes)
    want = want if isinstance(want, list) else [want]
    for name, got, w in zip(graph.outputs, onnx_codes(graph, model, *codes), want):
        assert got.shape == w.shape, name
        np.testing.assert_array_equal(got, w, err_msg=f"{fmt}: tensor {name!r}")
    return model


def random_codes(t: ir.Tensor, batch: int, rng) -> np.ndarray:
    """Random codes of `t`; with more than two samples, one all at qmin and one all at qmax."""
    codes = rng.integers(t.qmin, t.qmax + 1, (batch, *t.shape))
    if batch > 2:
        codes[0], codes[1] = t.qmin, t.qmax
    return codes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_graph_bit_exact(fmt, causal, seed):
    """Its linear has no weight_scale (the integer form in QDQ too); QDQ's float matmuls and add are exact
    here: the real results q·k·2/125, p·v·2/255 and (2·ctx + const)/3 stay far from ties."""
    graph = exposing(attention_graph(seed, causal), ATTENTION_TENSORS)
    rng = np.random.default_rng(seed)
    model = assert_bit_exact(graph, fmt, random_codes(graph.tensor("x"), 24, rng))
    kinds = {n.op_type for n in model.graph.node}
    assert not kinds & {"Softmax", "LayerNormalization", "Gemm"}      # integer forms; linear without weight_scale
    assert {"ReduceMax", "Gather", "Sqrt", "Expand", "MatMulInteger"} <= kinds
    if causal:
        mask = next(i for i in model.graph.initializer if i.name.startswith("softmax_visible"))
        assert mask.data_type == TensorProto.BOOL and list(mask.dims) == [5, 5]
    # the constant follows the batch size (a dynamic dimension): one sample and seven
    for batch in (1, 7):
        got = onnx_codes(graph, model, random_codes(graph.tensor("x"), batch, rng))[graph.outputs.index("const")]
        assert got.shape == (batch, 2, 5, 4)
        assert (got == graph.ops[[op.kind for op in graph.ops].index("constant")].attrs.value).all()


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_graph_bit_exact_at_older_opsets(fmt, opset):
    """ReduceMax takes axes as an attribute before opset 18; the requantization uses Mod/Div there."""
    graph = exposing(attention_graph(3, True), ATTENTION_TENSORS)
    assert_bit_exact(graph, fmt, random_codes(graph.tensor("x"), 8, np.random.default_rng(3)), opset=opset)


def linear_rows_graph(shape, acc_bits=None, overflow="saturate") -> ir.Graph:
    """x (..., 8) → linear → (..., 6) with power-of-two scales and weight_scale set (QDQ's float Gemm form,
    exact there), optionally with a narrow accumulator."""
    rng = np.random.default_rng(len(shape))
    x = tensor("x", shape, 2 ** -4, 128)
    y = tensor("y", (*shape[:-1], 6), 1.0, 130)
    w = rng.integers(-127, 128, (6, 8)).astype(np.int8)
    m, s = quantize_multiplier(x.scale * 2 ** -6 / y.scale)
    op = ir.Op("linear", "fc", ["x"], "y", ir.Linear(
        weight=w, bias=rng.integers(-3000, 3000, 6).astype(np.int32), multiplier=np.full(6, m),
        shift=np.full(6, s), weight_scale=(2 ** -6,) * 6, acc_bits=acc_bits, tile=4 if acc_bits else None,
        overflow=overflow, act_min=y.zero_point, act_max=y.qmax))               # a fused ReLU
    return ir.verify(ir.Graph(["x"], ["y"], {"x": x, "y": y}, [op]))


@pytest.mark.parametrize("shape", [(8,), (5, 8), (2, 3, 8)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_on_rows(fmt, shape):
    graph = linear_rows_graph(shape)
    model = assert_bit_exact(graph, fmt, random_codes(graph.tensor("x"), 16, np.random.default_rng(0)))
    kinds = [n.op_type for n in model.graph.node]
    assert ("Gemm" if fmt == "qdq" else "MatMulInteger") in kinds
    assert kinds.count("Reshape") == (2 if len(shape) > 1 else 0)


@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
def test_narrow_accumulator_linear_on_rows(overflow):
    graph = linear_rows_graph((5, 8), acc_bits=11, overflow=overflow)
    codes = random_codes(graph.tensor("x"), 16, np.random.default_rng(1))
    exact = ref.run_codes(ir.verify(dataclasses.replace(graph, ops=[dataclasses.replace(
        graph.ops[0], attrs=dataclasses.replace(graph.ops[0].attrs, acc_bits=None, tile=None))])), codes)
    assert (ref.run_codes(graph, codes) != exact).any()                # the accumulator really overflows
    for fmt in FORMATS:
        assert_bit_exact(graph, fmt, codes)


@pytest.mark.parametrize("out_bits", [8, 16])
@pytest.mark.parametrize("rows,cols,causal", [(6, 6, False), (6, 6, True), (3, 7, True), (6, 4, True), (1, 9, False)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_softmax_of_16_bit_signed_input(fmt, rows, cols, causal, out_bits):
    """16-bit signed scores: an exp table of thousands of entries, distances past its end, hidden entries
    above the row's max; causal with cols > rows (a cache) and cols < rows (rows that see nothing)."""
    x = tensor("x", (3, rows, cols), 0.002, -7, bits=16, signed=True)
    y = tensor("y", (3, rows, cols), 1 / 255, 0) if out_bits == 8 else \
        tensor("y", (3, rows, cols), 2 ** -15, -3, bits=16, signed=True)
    op = softmax_op("sm", x, y, 0.7, causal)
    assert len(op.attrs.table) > 1000
    graph = ir.verify(ir.Graph(["x"], ["y"], {"x": x, "y": y}, [op]))
    rng = np.random.default_rng(rows * cols)
    wide = random_codes(x, 8, rng)
    near = np.clip(rng.integers(-20000, 20000, (8, 3, rows, 1)) + rng.integers(-1500, 1500, (8, 3, rows, cols)),
                   x.qmin, x.qmax)                                      # rows whose entries all count
    codes = np.concatenate([wide, near])
    with np.errstate(divide="ignore"):                                  # the reference's 0 // 0 on empty rows
        assert_bit_exact(graph, fmt, codes)
        out = ref.run_codes(graph, codes)
    assert (out[8:] > y.zero_point).sum() > out[8:].size // 4              # not just one-hot rows


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_softmax_with_a_visible_mask(fmt, causal):
    """Swin's shifted-window mask: (windows, 1, N, N) broadcast over heads; one window's rows see nothing
    (an all-zero block, r = 0), with and without causal."""
    x = tensor("x", (3, 2, 6, 6), 0.002, -7, bits=16, signed=True)
    y = tensor("y", (3, 2, 6, 6), 1 / 255, 0)
    rng = np.random.default_rng(5)
    visible = (rng.random((3, 1, 6, 6)) < 0.5).astype(np.int8)
    visible[0] = 0
    graph = ir.verify(ir.Graph(["x"], ["y"], {"x": x, "y": y}, [softmax_op("sm", x, y, 0.7, causal, visible)]))
    codes = np.clip(rng.integers(-20000, 20000, (6, 3, 2, 6, 1)) + rng.integers(-1500, 1500, (6, 3, 2, 6, 6)),
                    x.qmin, x.qmax)
    with np.errstate(divide="ignore"):                                  # the reference's 0 // 0 on empty rows
        assert_bit_exact(graph, fmt, codes)
        out = ref.run_codes(graph, codes)
    hidden = np.broadcast_to(visible == 0, out.shape[1:])
    assert (out[:, hidden] == 0).all() and (out[:, ~hidden] > 0).sum() > out[:, ~hidden].size // 4


@pytest.mark.parametrize("centered", [True, False], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("in_bits", [8, 16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_norm_of_384(fmt, in_bits, centered):
    n = 384
    rng = np.random.default_rng(in_bits)
    x = tensor("x", (4, n), 0.05, 128) if in_bits == 8 else tensor("x", (4, n), 3e-4, 11, bits=16, signed=True)
    y = tensor("y", (4, n), 0.04, -1, signed=True)
    op = layer_norm_op("ln", x, y, rng.uniform(-2, 2, n), rng.uniform(-0.5, 0.5, n), centered=centered)
    graph = ir.verify(ir.Graph(["x"], ["y"], {"x": x, "y": y}, [op]))
    codes = random_codes(x, 6, rng)
    codes[2, 0] = np.where(np.arange(n) % 2, x.qmax, x.qmin)          # the largest Σd²
    codes[2, 1] = x.qmin + 5                                            # a constant row: d = 0, ρ = isqrt(E)
    codes[2, 2] = x.qmax - rng.integers(0, 3, n)
    assert_bit_exact(graph, fmt, codes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_norm_constant_rows_without_eps(fmt):
    """E = 0 and a constant row: ρ = 0, n = 0 (no division by zero), y = requantize(bias)."""
    x, y = tensor("x", (3, 16), 0.05, 128), tensor("y", (3, 16), 0.04, 0, signed=True)
    rng = np.random.default_rng(5)
    op = layer_norm_op("ln", x, y, rng.uniform(-2, 2, 16), rng.uniform(-0.5, 0.5, 16), eps=0.0)
    assert op.attrs.eps == 0
    graph = ir.verify(ir.Graph(["x"], ["y"], {"x": x, "y": y}, [op]))
    codes = random_codes(x, 4, rng)
    codes[3] = 77
    assert_bit_exact(graph, fmt, codes)


def test_isqrt_and_div_round_nodes_are_exact():
    """The exporter's isqrt and div_round node chains against Python's integers, near squares and at 2^62."""
    b = _Builder(ir.Graph([], [], {}, []), "qop", "int8", 21)
    root = b.isqrt("v", "r")
    q = b.div_round("n", "d", "q")
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info(k, TensorProto.INT64, [None])
                                             for k in ("v", "n", "d")],
                              [helper.make_tensor_value_info(k, TensorProto.INT64, [None]) for k in (root, q)],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    sq = rng.integers(0, 2 ** 31, 1000)
    v = np.concatenate([rng.integers(0, 2 ** 62, 1000), np.arange(300), sq * sq, sq * sq - 1, sq * sq + 1,
                        [2 ** 62 - 1, (2 ** 31 - 1) ** 2, (2 ** 31 - 1) ** 2 - 1, 2 ** 62 - 2 ** 31]])
    v = np.clip(v, 0, 2 ** 62 - 1).astype(np.int64)
    ties = [((2 * k + 1) * d // 2, d) for d in (2, 6, 2 ** 17) for k in (-3, -2, -1, 0, 1, 2, 2 ** 20, -2 ** 20)]
    ties += [(-1, 4), (0, 7), (3, 4), (-3, 4), (-5, 2)]
    n = np.concatenate([rng.integers(-2 ** 40, 2 ** 40, v.size - len(ties)), [a for a, _ in ties]]).astype(np.int64)
    d = np.concatenate([rng.integers(1, 2 ** 20, v.size - len(ties)), [c for _, c in ties]]).astype(np.int64)
    got_r, got_q = onnxruntime_session(model.SerializeToString()).run(None, {"v": v, "n": n, "d": d})
    assert [int(r) for r in got_r] == [math.isqrt(int(x)) for x in v]
    assert [int(x) for x in got_q] == [(2 * int(a) + int(c)) // (2 * int(c)) for a, c in zip(n, d)]
