"""Integer softmax and LayerNorm (`qcompile.core.rowwise`) against float on the same codes, through
the reference interpreter; the integer helpers against Python's exact integers."""
import math

import numpy as np
import pytest
import torch

from qcompile import ir
from qcompile.backends import reference
from qcompile.core.requant import quantize_multiplier
from qcompile.core.rowwise import div_round, exp_table, isqrt
from transformer_graphs import attention_graph, layer_norm_op, softmax_op, tensor


def test_isqrt_and_div_round_are_exact():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.integers(0, 2 ** 62, 2000), np.arange(200), [2 ** 62 - 1, (2 ** 31 - 1) ** 2]])
    assert all(int(r) == math.isqrt(int(x)) for r, x in zip(isqrt(v), v))
    n, d = rng.integers(-10 ** 9, 10 ** 9, 2000), rng.integers(1, 10 ** 5, 2000)
    assert all(int(q) == math.floor(int(a) / int(b) + 0.5) for q, a, b in zip(div_round(n, d), n, d))


def test_exp_table_ends_at_its_last_nonzero_entry():
    t = exp_table(0.1)
    assert t[0] == 2 ** 16 and t[-1] > 0 and round(2 ** 16 * math.exp(-0.1 * len(t))) == 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("in_scale", [0.02, 0.1, 0.5])
def test_softmax_within_one_output_step_of_float(causal, in_scale):
    x, y = tensor("x", (4, 6, 6), in_scale, 3, signed=True), tensor("y", (4, 6, 6), 1 / 255, 0)
    graph = ir.verify(ir.Graph(["x"], ["y"], {"x": x, "y": y}, [softmax_op("sm", x, y, 0.5, causal)]))
    codes = np.random.default_rng(1).integers(-128, 128, (8, 4, 6, 6))
    out = reference.run_codes(graph, codes)
    real = torch.tensor((codes - 3) * in_scale * 0.5)
    if causal:
        real = real.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.softmax(real, -1).numpy()
    assert np.abs(out * y.scale - expected).max() <= y.scale
    if causal:
        assert (out[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0).all()


@pytest.mark.parametrize("n", [8, 64, 384])
def test_layer_norm_within_one_output_step_of_float(n):
    rng = np.random.default_rng(n)
    x, y = tensor("x", (3, n), 0.05, 128), tensor("y", (3, n), 0.04, 0, signed=True)
    gamma, beta = rng.uniform(-2, 2, n), rng.uniform(-0.5, 0.5, n)
    op = layer_norm_op("ln", x, y, gamma, beta)
    graph = ir.verify(ir.Graph(["x"], ["y"], {"x": x, "y": y}, [op]))
    codes = rng.integers(0, 256, (16, 3, n))
    out = reference.run_codes(graph, codes)
    g = op.attrs.weight * (np.abs(gamma).max() / 127)            # the quantized gamma the op multiplies by
    real = torch.nn.functional.layer_norm(torch.tensor((codes - 128) * 0.05), (n,), torch.tensor(g),
                                          torch.tensor(beta), 1e-5).numpy()
    ideal = np.clip(np.round(real / y.scale), y.qmin, y.qmax)
    assert np.abs(out - ideal).max() <= 1


@pytest.mark.parametrize("n", [64, 384])
def test_rms_norm_and_normalize_within_one_output_step_of_float(n):
    """The non-centred norm op against float RMSNorm (E = ε·N³/S², unit S_g·√N) and F.normalize (unit S_g,
    E = ε²·N²/S²) on the same codes."""
    rng = np.random.default_rng(n)
    x, y = tensor("x", (3, n), 0.05, 120), tensor("y", (3, n), 0.02, 0, signed=True)
    gamma = rng.uniform(-2, 2, n)
    op = layer_norm_op("rms", x, y, gamma, np.zeros(n), centered=False)
    codes = rng.integers(0, 256, (16, 3, n))
    out = reference.run_codes(ir.verify(ir.Graph(["x"], ["y"], {"x": x, "y": y}, [op])), codes)
    g = op.attrs.weight * (np.abs(gamma).max() / 127)
    real = torch.nn.functional.rms_norm(torch.tensor((codes - 120) * 0.05), (n,), torch.tensor(g), 1e-5).numpy()
    assert np.abs(out - np.clip(np.round(real / y.scale), y.qmin, y.qmax)).max() <= 1
    unit = 1 / 2 ** 16                             # F.normalize: weight 1, no √N
    m, s = quantize_multiplier(unit / (1 / 127))
    y1 = tensor("y1", (3, n), 1 / 127, 0, signed=True)
    unit_op = ir.Op("layer_norm", "normalize", ["x"], "y1", ir.LayerNorm(
        weight=np.ones(n, np.int8), bias=np.zeros(n, np.int64), eps=round(1e-24 * n * n / 0.05 ** 2), multiplier=m,
        shift=s, centered=False, act_min=-128, act_max=127))
    out = reference.run_codes(ir.verify(ir.Graph(["x"], ["y1"], {"x": x, "y1": y1}, [unit_op])), codes)
    real = torch.nn.functional.normalize(torch.tensor((codes - 120) * 0.05), dim=-1).numpy()
    assert np.abs(out - np.clip(np.round(real * 127), -128, 127)).max() <= 1


@pytest.mark.parametrize("causal", [False, True])
def test_attention_graph_runs_and_probabilities_sum_to_one(causal):
    graph = attention_graph(0, causal)
    env = reference.run_codes(graph, np.random.default_rng(2).integers(0, 256, (3, 5, 8)), keep=True)
    sums = env["probs"].sum(-1) * graph.tensor("probs").scale
    assert np.abs(sums - 1).max() <= 6 / 255
    assert env["y"].shape == (3, 2, 5, 4)


def test_error_tables_of_docs_transformers_hold():
    """The figures docs/transformers.md quotes (qcompile.tools.experiments.transformer_ops), at their bounds:
    8-bit softmax and LayerNorm within one output step of the float op rounded onto the grid, rarely off."""
    from qcompile.tools.experiments.transformer_ops import gelu_errors, layer_norm_errors, softmax_errors
    for sigma in (0.5, 8.0):
        e = softmax_errors(sigma, rows=1024, causal=sigma > 1)
        assert e["max_steps"] <= 1 and e["mismatch"] < 0.001, e
    e = layer_norm_errors(384, rows=256)
    assert e["max_steps"] <= 1 and e["mismatch"] < 0.005, e
    assert gelu_errors() == {"mismatch": 0.0, "max_steps": 0}
