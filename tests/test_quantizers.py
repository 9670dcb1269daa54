import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.train.quantizers import fake_quant, stochastic_fake_quant
from qcompile.core.grids import qparams, qrange, quantize_codes


@settings(max_examples=40, deadline=None)
@given(v=st.floats(-50, 50), scale=st.floats(0.01, 2.0))
def test_stochastic_rounding_is_unbiased(v, scale):
    n = 20000
    g = torch.full((n,), v, dtype=torch.float64)
    s = torch.tensor(scale, dtype=torch.float64)
    out = stochastic_fake_quant(g, s, torch.tensor(0.0, dtype=torch.float64), (-10 ** 6, 10 ** 6),
                                torch.Generator().manual_seed(1))
    lo, hi = torch.floor(g / s) * s, torch.ceil(g / s) * s
    assert bool(((out - lo).abs() < 1e-9 * scale + 1e-12).logical_or((out - hi).abs() < 1e-9 * scale + 1e-12).all())
    # mean of a two-point variable with spread `scale`: std of the mean <= scale / (2 sqrt(n))
    assert abs(float(out.mean()) - v) <= 5 * scale / (2 * n ** 0.5) + 1e-9


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 16), symmetric=st.booleans(), lo=st.floats(-100, 0), width=st.floats(1e-3, 200))
def test_grid_covers_range_and_matches_fused_kernel(bits, symmetric, lo, width):
    hi = lo + width
    qr = qrange(bits, symmetric)
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), qr, symmetric)
    x = torch.linspace(lo, hi, 257)
    codes = quantize_codes(x, scale, zp, qr)
    assert float(codes.min()) >= qr[0] and float(codes.max()) <= qr[1]
    xq = fake_quant(x, scale, zp, qr)
    assert torch.equal(xq, (codes - zp) * scale)
    err = (xq - x).abs().max()
    assert float(err) <= float(scale) * 0.5 + 1e-5 * max(abs(lo), abs(hi), 1)
    assert len(torch.unique(codes)) <= 2 ** bits


def test_pow2_scales_are_powers_of_two():
    scale, _ = qparams(torch.tensor(-0.3), torch.tensor(5.1), qrange(8, False), False, pow2=True)
    assert float(torch.log2(scale)) == round(float(torch.log2(scale)))
    assert float(scale) * 255 >= 5.4


@pytest.mark.parametrize("stochastic", [False, True])
def test_gradient_codes_are_the_quantized_gradient_over_its_scale(stochastic):
    from qcompile.config import QConfig
    from qcompile.passes.quantize import _make
    cfg = QConfig(grad_bits=8, stochastic_rounding=stochastic)
    a, b = (_make("gradient", cfg, "layer", generator=torch.Generator().manual_seed(5)) for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):                              # the hindsight grid moves from step to step
        g = torch.randn(4000, generator=gen) * (step + 1) + 0.5
        codes, g_hat = a.gradient_codes(g), b.quantize_gradient(g)
        assert torch.equal(a.scale, b.scale) and torch.equal(codes * a.scale, g_hat)
        z = float(a.zero_point)
        assert torch.equal(codes, codes.round()) and codes.min() >= -z and codes.max() <= 255 - z
        assert len(codes.unique()) > 100
