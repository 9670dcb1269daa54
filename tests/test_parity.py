"""backends.parity: one graph through every backend, compared code for code and by prediction."""
import numpy as np
import pytest
import torch

import qcompile
from qcompile.backends import parity

from lowering_models import trained_once


@pytest.fixture(scope="module")
def pow2_zoo():
    return trained_once("OpZoo", (8, 3, 16, 16), pow2_scales=True)


def test_every_backend_and_the_trained_graph_agree_with_pow2_scales(pow2_zoo, tmp_path):
    graph = qcompile.lower(pow2_zoo)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = pow2_zoo(x)
    cmp = parity.compare(graph, x, given={"PyTorch": trained}, workdir=tmp_path)
    assert list(cmp.codes) == ["PyTorch", *parity.BACKENDS]
    assert all(c.shape == (6, *graph.tensor(graph.outputs[0]).shape) for c in cmp.codes.values())
    for a, b in cmp.pairs():
        if "PyTorch" in (a, b):   # the trained graph runs its float ops (silu, sigmoid, ...) in float
            assert cmp.max_lsb(a, b) <= 1, (a, b)
        else:                     # pow2 scales: every integer backend equals the reference exactly
            assert cmp.max_lsb(a, b) == 0 and cmp.mismatch(a, b) == 0.0 and cmp.differ(a, b) == 0, (a, b)
    assert (tmp_path / "c" / "model.c").exists()


def test_a_difference_is_reported(pow2_zoo):
    graph = qcompile.lower(pow2_zoo)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = graph.tensor(graph.outputs[0])
    shifted = parity.outputs(graph, x, "reference").astype(np.float64)
    shifted[0, 0] += 2                                   # two output steps off on one value
    cmp = parity.compare(graph, x, backends=("reference",), given={"off": (shifted - t.zero_point) * t.scale})
    assert cmp.max_lsb("off", "reference") == 2
    assert cmp.mismatch("off", "reference") == pytest.approx(1 / cmp.codes["off"].size)
    with pytest.raises(ValueError, match="backend 'tflite'"):
        parity.outputs(graph, x, "tflite")
