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


def test_quantize_weights_and_activations_false_keep_the_forward_float():
    """The paper's Table 1 setting (only gradients quantized) and Table 2's (weights float): the quantizers
    are placed but stay off whatever switches are flipped; lowering refuses such a graph by name."""
    import copy

    import qcompile
    from qcompile.errors import QCompileError
    torch.manual_seed(0)
    model = qcompile.models.get("models:lenet5")
    x = torch.randn(16, 1, 28, 28)
    grads_only = qcompile.compile(copy.deepcopy(model), x[:2], grad_bits=4, quantize_weights=False,
                                  quantize_activations=False)
    grads_only.set_quantization(True)
    xf, xq = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = model(xf), grads_only(xq)
    assert torch.equal(out, ref)                                   # the forward is the float model's
    weights = torch.randn_like(ref)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    assert not torch.allclose(xq.grad, xf.grad, atol=1e-6)         # 4-bit gradients do change the backward
    kinds = {q.kind for _, q in grads_only.quantizers() if not q.float_by_config}
    assert kinds == {"gradient"} and all(not q.enabled for _, q in grads_only.quantizers() if q.float_by_config)
    with pytest.raises(QCompileError, match="float by config"):
        qcompile.lower(grads_only.eval())
    acts_only = qcompile.compile(copy.deepcopy(model), x[:2], quantize_weights=False)
    assert {q.kind for _, q in acts_only.quantizers() if not q.float_by_config} == {"activation"}
    assert not torch.equal(acts_only(x), model(x))                 # activations are quantized
    with pytest.raises(ValueError, match="quantize_weights=False with acc_bits"):
        qcompile.QConfig(quantize_weights=False, acc_bits=16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("zp", [0.0, 3.0])
def test_one_pass_kernels_equal_the_torch_expressions_bit_for_bit(zp):
    """csrc/fake_quant.c (eager, float32 CPU tensors) gives exactly the bits of the torch operations it
    replaces: the per-row fake quant of weights (ties to even, clamps both ways, NaN, the clipping mask,
    zero points 0 and 3) and the stochastic codes with the same dither draw (times the scale or not)."""
    from qcompile.core.grids import stochastic_codes, unclamped_codes
    from qcompile.train import native
    from qcompile.train.one_pass import one_pass
    from qcompile.train.quantizers import _FakeQuant

    torch.manual_seed(0)
    x = torch.randn(64, 32, 3, 3) * 2
    x[0, :8] = torch.tensor([0.5, 1.5, -0.5, -2.5, 1e9, -1e9, float("nan"), -0.01]).view(8, 1, 1)
    scale = torch.rand(64, 1, 1, 1) * 0.05 + 0.01
    scale[0] = 1.0                                     # x · 1/scale lands on the ties above
    z = torch.full((64, 1, 1, 1), zp)
    qr = (-127, 127) if zp == 0 else (0, 255)
    assert one_pass(x) is not None or not native.enabled()
    for can_clip in (True, False):
        leaf = x.clone().requires_grad_()
        got = _FakeQuant.apply(leaf, scale, z, qr, can_clip)
        want = unclamped_codes(x, scale, z)
        mask = (want >= qr[0]) & (want <= qr[1])
        want = want.clamp_(*qr).sub_(z).mul_(scale) if zp else want.clamp_(*qr).mul_(scale)
        assert torch.equal(_bits(got.detach()), _bits(want))
        got.backward(torch.ones_like(got))
        assert torch.equal(leaf.grad, mask.float() if can_clip else torch.ones_like(x))

    g = torch.randn(32, 64, 16, 16) * 1e-3
    g.view(-1)[:4] = torch.tensor([0.0, -0.0, 1.0, -1.0])           # 1.0 and -1.0 clamp
    s, zt = torch.tensor(2e-5), torch.tensor(zp)
    for times_scale in (True, False):
        got = stochastic_fake_quant(g, s, zt, (-128, 127), torch.Generator().manual_seed(7), times_scale=times_scale)
        want = stochastic_codes(g, s, zt, (-128, 127), torch.Generator().manual_seed(7))
        assert torch.equal(_bits(got), _bits(want.mul_(s) if times_scale else want))


def test_straight_through_mask_in_one_pass_equals_torch():
    """A fake quant's straight-through gradient g·mask (csrc/fake_quant.c qc_masked; threaded size) has the
    bits of torch's product with the bool mask: -0 where a negative g is masked, NaN where a NaN is; with a
    graph of the backward recorded (create_graph) it is torch's product itself, differentiable."""
    from qcompile.train import native
    from qcompile.train.one_pass import one_pass
    from qcompile.train.quantizers import _masked

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 50_000, generator=gen)
    g[0, :4] = torch.tensor([-1.0, float("nan"), float("-inf"), -0.0])
    mask = torch.rand(3, 50_000, generator=gen) > 0.3
    mask[0, :4] = False
    assert one_pass(g) is not None or not native.enabled()
    with torch.no_grad():                              # as in a backward without create_graph
        assert torch.equal(_bits(_masked(g, mask)), _bits(g * mask))
    leaf = g.clone().requires_grad_()
    with torch.enable_grad():
        out = _masked(leaf, mask)
    assert out.requires_grad and torch.equal(_bits(out.detach()), _bits(g * mask))


def _hindsight_gradient_quantizer(on_nonfinite="raise", seed=3):
    from qcompile.train.estimators import HindsightMinMax
    from qcompile.train.quantizers import Quantizer
    return Quantizer("gradient", 8, False, HindsightMinMax(0.9), stochastic=True, on_nonfinite=on_nonfinite,
                     layer="conv", generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [False, True])
def test_one_pass_gradient_codes_equal_two_passes(channels, monkeypatch):
    """A hindsight gradient quantizer past its first batch quantizes in one pass over the gradient
    (csrc/fake_quant.c: the codes on the stored range's grid, the batch's min and max in the same
    pass; with a channel multiplier, of g·mult formed there too): the codes, the estimator's state,
    the grid buffers and the generator equal those of two passes (range first, then codes), batch
    after batch; a batch with an Inf raises with the state and the generator untouched, or (skip)
    passes through, counted."""
    from qcompile.errors import NonFiniteError
    from qcompile.train.quantizers import Quantizer
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 7, 3, generator=gen) * (1 + i) for i in range(4)]
    mult = torch.rand(5, generator=gen) + 0.5 if channels else None
    one, two = _hindsight_gradient_quantizer(), _hindsight_gradient_quantizer()
    calls, passes = [], []
    orig = Quantizer._gradient_one_pass
    for g in batches:
        with monkeypatch.context() as mp:
            mp.setattr(Quantizer, "_gradient_one_pass", lambda *a, **k: passes.append(orig(*a, **k)) or passes[-1])
            got = one.gradient_codes(g, mult, 1) if channels else one.quantize_gradient(g)
        with monkeypatch.context() as mp:
            mp.setattr(Quantizer, "_gradient_one_pass", lambda *a, **k: calls.append(1) and None)
            x = g * mult.view(1, -1, 1, 1) if channels else g
            want = two.gradient_codes(x) if channels else two.quantize_gradient(x)
        assert torch.equal(got, want)
        for name in ("lo", "hi", "initialized", "nonfinite"):
            assert torch.equal(getattr(one.estimator, name), getattr(two.estimator, name))
        assert torch.equal(one.scale, two.scale) and torch.equal(one.zero_point, two.zero_point)
        assert torch.equal(one.generator.get_state(), two.generator.get_state())
    assert len(calls) == len(batches) and [p is None for p in passes] == [True] + [False] * (len(batches) - 1)
    bad = batches[0].clone()
    bad[1, 2, 3, 1] = float("inf")
    state, lo = one.generator.get_state(), one.estimator.lo.clone()
    with pytest.raises(NonFiniteError, match="incoming gradient"):
        one.gradient_codes(bad, mult, 1) if channels else one.quantize_gradient(bad)
    assert torch.equal(one.generator.get_state(), state) and torch.equal(one.estimator.lo, lo)
    skip = _hindsight_gradient_quantizer("skip")
    skip.quantize_gradient(batches[0])
    state = skip.generator.get_state()
    out = skip.gradient_codes(bad, mult, 1) if channels else skip.quantize_gradient(bad)
    x = bad * mult.view(1, -1, 1, 1) if channels else bad
    assert torch.equal(out, torch.round(x / skip.scale) if channels else bad)
    assert torch.equal(skip.generator.get_state(), state) and int(skip.estimator.nonfinite) == 1


@pytest.mark.parametrize("symmetric, momentum, relu", [(False, 0.9, None), (True, 0.9, None), (False, 0.37, None),
                                                     (False, 0.9, "before"), (False, 0.9, "after"), (True, 0.9, "after")])
def test_one_pass_activation_fake_quant_equals_two_passes(symmetric, momentum, relu, monkeypatch):
    """A hindsight activation quantizer past its first batch fake-quantizes in one call of C
    (csrc/fake_quant.c: torch.fake_quantize_per_tensor_affine on the stored range's grid, the batch's
    min and max in the same pass, the grid and the state's update in C's float32): the output (bit for bit, codes of -0 included), the gradient mask (none
    kept where nothing was clipped), the estimator's state and the grid buffers equal those of two
    passes, batch after batch; a batch with a NaN raises with the state untouched, or (skip) passes
    through, counted. Called with relu="before" / "after" (the fuse_relu pass's calls), the same step with
    torch.relu before or after it, in the same pass: the output and the gradient (bit for bit: +0 where the
    relu blocks, -0 where only the clip mask does) are torch's relu and fake quant in turn."""
    from qcompile.errors import NonFiniteError
    from qcompile.train.estimators import HindsightMinMax
    from qcompile.train.quantizers import Quantizer

    def quantizer(on_nonfinite="raise"):
        return Quantizer("activation", 8, symmetric, HindsightMinMax(momentum), on_nonfinite=on_nonfinite, layer="conv")

    gen = torch.Generator().manual_seed(0)
    # > 2^16 values: on threads; the last batch lies inside the stored range (nothing clipped, the mask all ones)
    batches = [torch.randn(4, 8, 33, 33, generator=gen) * s + 0.3 for s in (1, 2, 3, 0.5)]
    for x in batches:
        x.view(-1)[:3] = torch.tensor([-1e-4, 0.0, -0.0])
    one, two = quantizer(), quantizer()
    calls, passes = [], []
    orig = Quantizer._one_call
    for i, x in enumerate(batches):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        with monkeypatch.context() as mp:
            mp.setattr(Quantizer, "_one_call", lambda *a, **k: passes.append(orig(*a, **k)) or passes[-1])
            got = one(a, relu=relu)
        with monkeypatch.context() as mp:
            mp.setattr(Quantizer, "_one_call", lambda *a, **k: calls.append(1) and None)
            want = two(b, relu=relu)
        assert torch.equal(_bits(got.detach()), _bits(want.detach()))
        g = torch.randn(x.shape, generator=gen)
        got.backward(g)
        want.backward(g)
        assert torch.equal(_bits(a.grad), _bits(b.grad))
        if relu is None:
            assert bool((a.grad == 0).any()) == (i in (1, 2))   # past the stored range
        else:
            assert bool((got == 0).any()) and bool((a.grad == 0).any())
        for name in ("lo", "hi", "initialized", "nonfinite"):
            assert torch.equal(getattr(one.estimator, name), getattr(two.estimator, name))
        assert torch.equal(one.scale, two.scale) and torch.equal(one.zero_point, two.zero_point)
    assert len(calls) == len(batches) and [p is None for p in passes] == [True] + [False] * (len(batches) - 1)
    bad = batches[0].clone()
    bad[1, 2, 3, 1] = float("nan")
    lo = one.estimator.lo.clone()
    with pytest.raises(NonFiniteError, match="forward tensor"):
        one(bad)
    assert torch.equal(one.estimator.lo, lo) and int(one.estimator.nonfinite) == 1
    skip = quantizer("skip")
    skip(batches[0])
    scale = skip.scale.clone()
    passed = skip(bad, relu=relu)
    assert (passed is bad if relu is None else torch.equal(_bits(passed), _bits(torch.relu(bad))))
    assert torch.equal(skip.scale, scale) and int(skip.estimator.nonfinite) == 1


def test_one_call_state_follows_the_buffers_and_an_unset_range_falls_back(monkeypatch):
    """The one-call step keeps its view of the quantizer's buffers between calls (QuantizerState, a cache):
    a deep copy steps on its own buffers and leaves the original's alone, a buffer replaced by another tensor
    is the one written, and a stored range of [0, 0] (an all-zero batch) counts as unset: the C step does
    nothing and the torch path sets the range, giving what two passes give; the generator of a stochastic
    gradient quantizer is left as the torch path leaves it."""
    import copy

    from qcompile.train.estimators import HindsightMinMax
    from qcompile.train.quantizers import Quantizer
    gen = torch.Generator().manual_seed(0)
    batches = [torch.zeros(3, 50)] + [torch.randn(3, 50, generator=gen) * (i + 1) for i in range(3)]
    for kind in ("activation", "gradient"):
        one = (_hindsight_gradient_quantizer() if kind == "gradient" else
               Quantizer("activation", 8, False, HindsightMinMax(0.9), layer="conv"))
        two = copy.deepcopy(one)
        run = (lambda q, x: q.quantize_gradient(x)) if kind == "gradient" else (lambda q, x: q(x))
        passes = []
        orig = Quantizer._one_call
        for x in batches:
            with monkeypatch.context() as mp:
                mp.setattr(Quantizer, "_one_call", lambda *a, **k: passes.append(orig(*a, **k)) or passes[-1])
                got = run(one, x)
            with monkeypatch.context() as mp:
                mp.setattr(Quantizer, "_one_call", lambda *a, **k: None)
                want = run(two, x)
            assert torch.equal(_bits(got), _bits(want))
            assert torch.equal(one.estimator.lo, two.estimator.lo) and torch.equal(one.scale, two.scale)
            if kind == "gradient":
                assert torch.equal(one.generator.get_state(), two.generator.get_state())
        assert [p is None for p in passes] == [True, True, False, False]     # unset, then [0, 0] stored
        copied, lo = copy.deepcopy(one), one.estimator.lo.clone()
        run(copied, batches[3] * 5)
        assert torch.equal(one.estimator.lo, lo) and not torch.equal(copied.estimator.lo, lo)
        one.estimator.lo = lo.clone()                # a new tensor in the buffer's place
        held = one.estimator.lo
        run(one, batches[3] * 5)
        assert held is one.estimator.lo and torch.equal(held, copied.estimator.lo)


def test_one_call_weight_fake_quant_equals_the_torch_path(monkeypatch):
    """A symmetric per-channel current min-max weight quantizer in training runs in one call of C
    (csrc/fake_quant.c: each row's range, its grid, the row quantized while in cache): the output bit for
    bit, the gradient, the estimator's state and the grid buffers equal the torch path's, for threaded
    sizes, a row of zeros (the scale's floor), ties and -0; a NaN raises with the state untouched, or
    (skip) passes through, counted; eval mode and asymmetric grids keep the torch path."""
    from qcompile.errors import NonFiniteError
    from qcompile.train.estimators import CurrentMinMax
    from qcompile.train.quantizers import Quantizer

    def quantizer(symmetric=True, on_nonfinite="raise"):
        return Quantizer("weight", 8, symmetric, CurrentMinMax(shape=(130,), axis=0), axis=0,
                         on_nonfinite=on_nonfinite, layer="conv").train()

    gen = torch.Generator().manual_seed(0)
    calls = []
    orig = Quantizer._one_call
    monkeypatch.setattr(Quantizer, "_one_call", lambda *a, **k: calls.append(orig(*a, **k)) or calls[-1])
    for w in (torch.randn(130, 64, 3, 3, generator=gen) * 0.1, torch.randn(130, 7, generator=gen)):
        w[3] = 0.0
        w[4].view(-1)[:3] = torch.tensor([-0.0, 0.5, -0.5])
        w[4].view(-1)[3] = 127.0                     # row 4's scale is 1: 0.5 and -0.5 are ties
        one, two = quantizer(), quantizer()
        a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
        calls.clear()
        got = one(a)
        assert len(calls) == 1 and calls[0] is not None
        with monkeypatch.context() as mp:
            mp.setattr(Quantizer, "_one_call", lambda *a, **k: None)
            want = two(b)
        assert torch.equal(_bits(got.detach()), _bits(want.detach()))
        g = torch.randn(w.shape, generator=gen)
        got.backward(g)
        want.backward(g)
        assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, g)
        for name in ("lo", "hi", "initialized", "nonfinite"):
            assert torch.equal(getattr(one.estimator, name), getattr(two.estimator, name))
        assert torch.equal(one.scale, two.scale) and torch.equal(one.zero_point, two.zero_point)
    bad = w.clone()
    bad[5, 2] = float("nan")
    lo = one.estimator.lo.clone()
    with pytest.raises(NonFiniteError, match="forward tensor"):
        one(bad)
    assert torch.equal(one.estimator.lo, lo) and int(one.estimator.nonfinite) == 1
    skip = quantizer(on_nonfinite="skip")
    skip(w)
    scale = skip.scale.clone()
    assert skip(bad) is bad and torch.equal(skip.scale, scale) and int(skip.estimator.nonfinite) == 1
    calls.clear()
    quantizer().eval()(w)
    assert calls == []
    quantizer(symmetric=False)(w)
    assert calls == [None]


def test_dither_words_are_the_splitmix64_stream_of_one_draw():
    """The dither of a call: one int64 key drawn from the generator (it advances by that one draw,
    whatever the tensor's size), then the SplitMix64 stream of that key, four int16 words per output
    (checked against SplitMix64 written out in Python integers; the one-pass kernel's words are checked
    against these by test_one_pass_kernels_equal_the_torch_expressions_bit_for_bit)."""
    from qcompile.core.grids import dither_words, random_words

    def splitmix64(state):
        while True:
            state = (state + 0x9E3779B97F4A7C15) % 2 ** 64
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
            yield z ^ (z >> 31)

    like = torch.empty(4 * 5 + 3)
    k = dither_words(like, torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    key = random_words(1, gen, like)
    after = torch.Generator().manual_seed(11)
    dither_words(torch.empty(100_000), after)
    assert torch.equal(after.get_state(), gen.get_state())
    stream = splitmix64(int(key) % 2 ** 64)
    want = [(w >> (16 * i)) & 0xFFFF for w in (next(stream) for _ in range(6)) for i in range(4)]
    assert [int(v) % 2 ** 16 for v in k] == want[:like.numel()]


def test_row_minmax_of_weights_equals_amin_and_amax():
    """A per-channel estimator's statistics of a weight (axis 0, float32 CPU) come from one pass of C
    (csrc/fake_quant.c qc_minmax_rows): the values of amin and amax over the other dims, NaN in a row
    with a NaN, infinities kept; large enough to run on threads."""
    from qcompile.train import native
    from qcompile.train.estimators import minmax
    from qcompile.train.one_pass import one_pass

    x = torch.randn(300, 64, 3, 3)
    x[3, 5, 1, 1] = float("nan")
    x[7, 0, 0, 0], x[8, 63, 2, 2] = float("inf"), float("-inf")
    x[9] = 0.0
    assert one_pass(x) is not None or not native.enabled()
    lo, hi = minmax(x, 0)
    assert torch.allclose(lo, x.amin((1, 2, 3)), rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(hi, x.amax((1, 2, 3)), rtol=0, atol=0, equal_nan=True)
    assert bool(lo[3].isnan()) and bool(hi[3].isnan()) and hi[7] == float("inf") and lo[8] == float("-inf")
