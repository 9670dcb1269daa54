"""qcompile.export_onnx: QDQ and QOperator models checked by onnx and run in onnxruntime against
the integer reference."""
import copy
import json

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile import ir
from qcompile.models import get
from qcompile.backends.onnx import ExportError, onnxruntime_session, to_onnx
from qcompile.backends.parity import onnx_per_op as parity
from qcompile.ir.lower import lower
from qcompile.backends import reference as ref

from lowering_models import trained, trained_once

TORCHVISION = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "efficientnet_b0"]


def assert_identical(graph, x, formats=("qdq", "qop")):
    for fmt in formats:
        r = parity(graph, x, fmt)
        assert r["max_lsb"] == 0 and r["local_max_lsb"] == 0, r


def assert_within_one_lsb(graph, x):
    for fmt in ("qdq", "qop"):
        r = parity(graph, x, fmt)
        assert r["local_max_lsb"] <= 1 and r["local_mismatch"] < 1e-3, r


@pytest.fixture(scope="module")
def zoo_pow2():
    torch.manual_seed(0)
    return trained_once("OpZoo", (8, 3, 16, 16), pow2_scales=True)


def test_export_writes_checked_model_with_metadata(zoo_pow2, tmp_path):
    for fmt in ("qdq", "qop"):
        path = tmp_path / f"zoo_{fmt}.onnx"
        graph = qcompile.export_onnx(zoo_pow2, path, format=fmt)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        props = {p.key: p.value for p in model.metadata_props}
        assert props["qcompile_version"] == qcompile.__version__ and props["format"] == fmt
        assert json.loads(props["config"])["pow2_scales"] is True
        ops = {n.op_type for n in model.graph.node}
        if fmt == "qdq":
            assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
        else:
            assert {"QLinearConv", "MatMulInteger", "Gather"} <= ops
            kinds = [n.op_type for n in model.graph.node]      # integer from the input Q to the output DQ
            assert kinds.count("QuantizeLinear") == 1 and kinds.count("DequantizeLinear") == 1
        x = torch.randn(4, 3, 16, 16)
        y = onnxruntime_session(path).run(None, {"input": x.numpy()})[0]
        assert np.array_equal(y, ref.dequantize(graph, ref.run(graph, x)).astype(np.float32))


def test_every_op_kind_identical_with_pow2_scales(zoo_pow2):
    assert_identical(lower(zoo_pow2), torch.randn(8, 3, 16, 16))


def test_every_op_kind_within_one_lsb_otherwise():
    g = lower(trained_once("OpZoo", (8, 3, 16, 16)))
    torch.manual_seed(1)
    assert_within_one_lsb(g, torch.randn(8, 3, 16, 16))


def test_lenet_both_scale_modes():
    torch.manual_seed(0)
    for pow2 in (True, False):
        g = lower(trained(get("models:lenet5"), torch.randn(8, 1, 28, 28), pow2_scales=pow2))
        x = torch.randn(16, 1, 28, 28)
        (assert_identical if pow2 else assert_within_one_lsb)(g, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_identical_with_pow2_scales(name):
    qm = trained_once(f"torchvision:{name}", (8, 3, 32, 32), steps=3, pow2_scales=True)
    g = lower(qm)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for fmt in ("qdq", "qop"):
        r = parity(g, x, fmt, local=False)
        assert r["max_lsb"] == 0, (name, r)


@pytest.mark.slow
def test_resnet18_within_one_lsb_per_op_without_pow2():
    torch.manual_seed(0)
    g = lower(trained(get("torchvision:resnet18", num_classes=10), torch.randn(4, 3, 32, 32)))
    assert_within_one_lsb(g, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("overflow", ["saturate", "wrap", "pairwise"])
def test_narrow_accumulator_overflow_reproduced(overflow):
    """LeNet trained with 12-bit accumulators (tiles of 16 products; pairwise: pairs, each saturated)
    overflows; onnxruntime's per-tile ConvInteger/MatMulInteger + clamp/modulo graph gives the
    reference's codes, which equal qm.eval()."""
    torch.manual_seed(0)
    qm = trained(get("models:lenet5"), torch.randn(8, 1, 28, 28), acc_bits=12,
                 tile=None if overflow == "pairwise" else 16, overflow=overflow)
    g = lower(qm)
    assert {op.attrs.acc_bits for op in g.ops if op.kind in ("conv2d", "linear")} == {12}
    x = torch.randn(8, 1, 28, 28)
    narrow = ref.run(g, x)
    exact = copy.deepcopy(g)
    for op in exact.ops:
        if isinstance(op.attrs, ir.Accumulator):
            op.attrs.acc_bits = None
    assert (ref.run(exact, x) != narrow).mean() > 0.1          # the accumulators really overflow
    assert_identical(g, x)
    assert sum(n.op_type == "ConvInteger" for n in to_onnx(g, "qop").graph.node) > 2
    d = np.rint(np.abs(ref.dequantize(g, narrow) - qm(x).detach().double().numpy()) / g.tensor(g.outputs[0]).scale)
    assert d.max() <= 1


def test_weight_dtype_uint8_is_identical(zoo_pow2):
    g = lower(zoo_pow2)
    x = torch.randn(4, 3, 16, 16)
    for fmt in ("qdq", "qop"):
        assert parity(g, x, fmt, weight_dtype="uint8", local=False)["max_lsb"] == 0
        model = to_onnx(g, fmt, weight_dtype="uint8")
        w = next(i for i in model.graph.initializer if i.name.endswith("_w"))
        assert w.data_type == onnx.TensorProto.UINT8


def test_qop_rejects_wide_activations():
    torch.manual_seed(0)
    g = lower(trained(get("models:lenet5"), torch.randn(8, 1, 28, 28), act_bits=12))
    with pytest.raises(ExportError, match="12 bits.*QLinearConv.*format='qdq'"):
        to_onnx(g, "qop")
    onnx.checker.check_model(to_onnx(g, "qdq"), full_check=True)


def test_bad_options_are_rejected(zoo_pow2):
    g = lower(zoo_pow2)
    with pytest.raises(ExportError, match="format='tflite'"):
        to_onnx(g, "tflite")
    with pytest.raises(ExportError, match="16-bit.*opset >= 21"):
        to_onnx(g, "qdq", opset=17)
    with pytest.raises(ExportError, match="opset=11"):
        to_onnx(g, "qdq", opset=11)


def test_export_of_training_mode_graph_is_rejected(zoo_pow2, tmp_path):
    qm = copy.deepcopy(zoo_pow2).train()
    with pytest.raises(qcompile.QCompileError, match="training mode"):
        qcompile.export_onnx(qm, tmp_path / "m.onnx")


def test_conv1d_lowered_as_2d_and_identical_with_pow2_scales():
    from lowering_models import Conv1dNet
    torch.manual_seed(0)
    qm = trained(Conv1dNet(), torch.randn(8, 4, 32), pow2_scales=True)
    g = lower(qm)
    assert [op.kind for op in g.ops].count("conv2d") == 2
    x = torch.randn(8, 4, 32)
    d = np.rint(np.abs(ref.dequantize(g, ref.run(g, x)) - qm(x).detach().double().numpy()) / g.tensor(g.outputs[0]).scale)
    assert d.max() <= 1
    assert_identical(g, x)


@pytest.mark.parametrize("fmt", ["qdq", "qop"])
def test_requantization_past_2_62_splits_the_multiplier_exactly(fmt):
    """A mul of two 16-bit intermediates whose zero points sit at qmin: |(a − za)(b − zb)| reaches
    65535² ≈ 2^32, times a 31-bit multiplier past 2^62. The export splits the multiplier and stays
    bit-exact with the reference (which uses exact 128-bit arithmetic there), ties included."""
    from qcompile.core.requant import fits_int64, quantize_multiplier
    from qcompile.backends.parity import _onnx_codes
    scale = 2.0 ** -10
    a = ir.Tensor("a", (64,), 16, True, scale, -32768)
    b = ir.Tensor("b", (64,), 16, True, scale, -32768)
    y = ir.Tensor("y", (64,), 8, False, 20.0, 128)
    m, s = quantize_multiplier(scale * scale / 20.0 * 1.37)
    assert not fits_int64(65535 * 65535, m, s)
    op = ir.Op("mul", "mul", ["a", "b"], "y", ir.Mul(multiplier=m, shift=s, act_min=0, act_max=255))
    graph = ir.verify(ir.Graph(["a", "b"], ["y"], {"a": a, "b": b, "y": y}, [op]))
    rng = np.random.default_rng(0)
    ca = np.concatenate([rng.integers(-32768, 32768, (7, 64)), np.full((1, 64), 32767)])
    cb = np.concatenate([rng.integers(-32768, 32768, (7, 64)), np.full((1, 64), 32767)])
    want = ref.run_codes(graph, ca, cb)
    assert ((want > 0) & (want < 255)).mean() > 0.5            # mostly rounded, not clamped
    feeds = [((c - t.zero_point) * scale).astype(np.float32) for c, t in ((ca, a), (cb, b))]
    got = _onnx_codes(graph, to_onnx(graph, fmt), feeds)
    np.testing.assert_array_equal(got, want)
