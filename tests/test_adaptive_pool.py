"""Adaptive average pooling of any output size as an integer op: PyTorch's windows (uneven,
overlapping, an output larger than the input), in the reference, ONNX and C."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile import ir
from qcompile.backends import parity, reference
from qcompile.backends.onnx import to_onnx
from qcompile.backends.parity import _onnx_codes
from qcompile.backends.c.build import build, run
from qcompile.backends.c.codegen import emit
from qcompile.ir.lower import adaptive_windows


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6, 7, 13, 14])
@pytest.mark.parametrize("out", [1, 2, 3, 4, 6, 7])
def test_windows_are_pytorchs(size, out):
    """Pooling the identity shows which inputs each output averages: exactly adaptive_windows'."""
    pooled = F.adaptive_avg_pool1d(torch.eye(size, dtype=torch.float64).unsqueeze(1), out)[:, 0, :]  # (input, output)
    got = [(int(np.flatnonzero(col)[0]), int(np.flatnonzero(col)[-1]) + 1) for col in pooled.T.numpy()]
    assert got == adaptive_windows(size, out)
    for (start, end), col in zip(got, pooled.T.numpy()):
        assert np.allclose(col[start:end], 1.0 / (end - start))


class Pooled(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(out)
        self.fc = nn.Linear(4 * out[0] * out[1], 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


CASES = [((5, 7), (3, 4)),      # uneven, overlapping windows
         ((1, 1), (7, 7)),      # upsampling one value: a broadcast (alexnet/vgg at small inputs)
         ((2, 3), (7, 7)),      # an output larger than the input: windows repeat inputs
         ((6, 6), (4, 4))]      # overlapping windows of 2 and 3 rows


@pytest.mark.parametrize("hw,out", CASES)
def test_trained_graph_lowers_and_every_backend_agrees(hw, out, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, *hw)
    qm = qcompile.compile(Pooled(out), x[:2], seed=0)
    qm.calibrate([x])
    qm.eval()
    graph = qcompile.lower(qm)
    assert [op.kind for op in graph.ops][1] == "adaptive_avg_pool2d"
    with torch.no_grad():
        y = qm(x)
    steps = (reference.dequantize(graph, reference.run(graph, x)) - y.double().numpy()) \
        / graph.tensor(graph.outputs[0]).scale
    assert abs(steps).max() <= 1.0 + 1e-6
    cmp = parity.compare(graph, x, workdir=tmp_path)
    assert cmp.max_lsb("reference", "c") == 0, cmp.max_lsb("reference", "c")
    for fmt in ("onnx:qdq", "onnx:qop"):          # onnxruntime's convs round some ties the other way
        assert cmp.max_lsb("reference", fmt) <= 1


def test_evenly_dividing_windows_stay_an_avg_pool():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qm = qcompile.compile(Pooled((4, 2)), x[:2], seed=0)
    qm.calibrate([x])
    qm.eval()
    assert [op.kind for op in qcompile.lower(qm).ops][1] == "avg_pool2d"


def _pool_graph(hw, out, zx=3):
    """One adaptive pool on hand-made grids: input codes 0..255 (zero point zx), output on the same grid."""
    (H, W), (OH, OW) = hw, out
    rows, cols = adaptive_windows(H, OH), adaptive_windows(W, OW)
    from qcompile.core.requant import quantize_multiplier
    ms = [quantize_multiplier(1.0 / ((he - hs) * (we - ws))) for hs, he in rows for ws, we in cols]
    tensors = {"x": ir.Tensor("x", (2, H, W), 8, False, 0.1, zx), "y": ir.Tensor("y", (2, OH, OW), 8, False, 0.1, zx)}
    op = ir.Op("adaptive_avg_pool2d", "pool", ["x"], "y", ir.AdaptiveAvgPool2d(
        h_start=tuple(r[0] for r in rows), h_end=tuple(r[1] for r in rows),
        w_start=tuple(c[0] for c in cols), w_end=tuple(c[1] for c in cols),
        multiplier=np.array([m for m, _ in ms]), shift=np.array([s for _, s in ms]), act_min=0, act_max=255))
    return ir.verify(ir.Graph(["x"], ["y"], tensors, [op]))


@pytest.mark.parametrize("hw,out", [((5, 7), (3, 4)), ((1, 1), (7, 7)), ((3, 2), (7, 5))])
def test_reference_is_the_window_mean_and_c_is_bit_exact_under_sanitizers(hw, out, tmp_path):
    graph = _pool_graph(hw, out)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (3, 2, *hw))
    got = reference.run_codes(graph, codes)
    mean = F.adaptive_avg_pool2d(torch.tensor(codes - 3, dtype=torch.float64), out).numpy()
    assert np.abs(got - (3 + mean)).max() <= 0.5 + 1e-9          # the window mean, rounded (ties to even)
    emit(graph, tmp_path, name="net")
    (c_out,) = run(tmp_path, codes, exe=build(tmp_path, opt="-O1", sanitize=True))
    np.testing.assert_array_equal(c_out, got)
    feeds = [((codes - 3) * 0.1).astype(np.float32)]
    for fmt in ("qdq", "qop"):                      # the op alone: identical codes in both ONNX forms
        np.testing.assert_array_equal(_onnx_codes(graph, to_onnx(graph, fmt), feeds), got)


def test_verify_rejects_windows_outside_the_input():
    graph = _pool_graph((5, 7), (3, 4))
    bad = graph.ops[0].attrs
    bad.h_end = (2, 4, 6)
    with pytest.raises(ir.IRError, match="empty or outside 0..5"):
        ir.verify(graph)
