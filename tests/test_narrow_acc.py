"""Tiled narrow accumulators: exactness against plain integer loops, the narrow_acc pass,
overflow statistics, gradients through the accumulator, accumulator bounds."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile.tools.analysis import accumulator_bounds
from qcompile.errors import UnsupportedOpError
from qcompile.core.accumulator import acc_range, min_acc_bits
from integer_loops import loop_accumulate, loop_conv2d, loop_matmul
from qcompile.train.tiled import _fused_gemm as FUSED
from qcompile.train.tiled import (NarrowAccOp, tiled_conv2d, tiled_conv2d_input_grad,
                            tiled_conv2d_weight_grad, tiled_linear, tiled_matmul)

torch.set_num_threads(1)
SETTINGS = settings(max_examples=40, deadline=None)
MODES = st.sampled_from([(None, "saturate"), (10, "saturate"), (12, "saturate"), (14, "wrap"), (10, "wrap"),
                         (12, "pairwise"), (16, "pairwise")])
TILES = st.sampled_from([None, 1, 2, 3, 5, 8])


def _tile(tile, overflow):
    """The drawn tile, or 2 for "pairwise" (its tiles are pairs)."""
    return 2 if overflow == "pairwise" else tile


# ---- the plain integer loops the tiled ops must equal (forward loops: tests/integer_loops.py) ------

def loop_conv2d_input_grad(g, w, H, W, stride, pad, dil, groups, acc_bits, tile, overflow):
    """G_X[n, c, y, x]: reduction over (o in c's group, ky, kx of the flipped kernel), i.e. ky, kx descending,
    over the taps that meet a G_Y row and column of the stride grid (out of range ones read padding: 0)."""
    N, O, Ho, Wo = g.shape
    _, cg, kh, kw = w.shape
    og = O // groups
    out, events = torch.zeros(N, groups * cg, H, W, dtype=torch.int64), 0
    for n, c, y, x in itertools.product(range(N), range(groups * cg), range(H), range(W)):
        prods = []
        for o in range((c // cg) * og, (c // cg + 1) * og):
            for ky, kx in itertools.product(reversed(range(kh)), reversed(range(kw))):
                uy, ux = y + pad - ky * dil, x + pad - kx * dil
                if uy % stride or ux % stride:          # an inserted zero: no slot
                    continue
                inside = 0 <= uy // stride < Ho and 0 <= ux // stride < Wo
                prods.append((int(g[n, o, uy // stride, ux // stride]) if inside else 0) * int(w[o, c % cg, ky, kx]))
        out[n, c, y, x], e = loop_accumulate(prods, 0, acc_bits, tile, overflow)
        events += e
    return out, events


def loop_conv2d_weight_grad(x, g, wshape, stride, pad, dil, groups, acc_bits, tile, overflow):
    """G_W[o, c, ky, kx]: reduction over (n, i, j) in order."""
    N, C, H, W = x.shape
    O, cg, kh, kw = wshape
    og = O // groups
    out, events = torch.zeros(wshape, dtype=torch.int64), 0
    for o, c, ky, kx in itertools.product(range(O), range(cg), range(kh), range(kw)):
        prods = []
        for n, i, j in itertools.product(range(N), range(g.shape[2]), range(g.shape[3])):
            y, xx = i * stride - pad + ky * dil, j * stride - pad + kx * dil
            v = int(x[n, (o // og) * cg + c, y, xx]) if 0 <= y < H and 0 <= xx < W else 0
            prods.append(int(g[n, o, i, j]) * v)
        out[o, c, ky, kx], e = loop_accumulate(prods, 0, acc_bits, tile, overflow)
        events += e
    return out, events


@st.composite
def conv_case(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, pad, dil = draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    H, W = draw(st.integers(max(3, dil * (kh - 1) + 1), 6)), draw(st.integers(max(3, dil * (kw - 1) + 1), 6))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    z = draw(st.sampled_from([None, 0, 37, 128, 255]))   # None: 9-bit values; else an 8-bit grid's codes − z
    lo, hi = (-255, 255) if z is None else (-z, 255 - z)
    x = torch.randint(lo, hi + 1, (2, groups * cg, H, W), generator=gen)
    w = torch.randint(-127, 128, (groups * og, cg, kh, kw), generator=gen)
    b = torch.randint(-4000, 4000, (groups * og,), generator=gen)
    return x, w, b, stride, pad, dil, groups


# ---- exactness ----------------------------------------------------------------------------------

@SETTINGS
@given(conv_case(), TILES, MODES, st.sampled_from([torch.int64, torch.float32]), st.booleans())
def test_tiled_conv2d_equals_integer_loop(case, tile, mode, dtype, exact):
    """exact=False is the training op's path (no exact sum kept); per-output overflow flags checked too."""
    x, w, b, stride, pad, dil, groups = case
    acc_bits, overflow = mode
    tile = _tile(tile, overflow)
    res = tiled_conv2d(x.to(dtype), w.to(dtype), b.to(dtype), stride, pad, dil, groups,
                       acc_bits=acc_bits, tile=tile, overflow=overflow, exact=exact)
    ref, events, hit = loop_conv2d(x, w, b, stride, pad, dil, groups, acc_bits, tile, overflow, per_output=True)
    assert torch.equal(res.acc.to(torch.int64), ref)
    assert int(res.events) == events and torch.equal(res.overflowed, hit)
    if exact and acc_bits is not None and overflow != "wrap":
        assert bool(((res.acc - res.exact) != 0).le(res.overflowed).all())


@SETTINGS
@given(conv_case(), TILES, MODES)
def test_tiled_conv2d_backward_equals_integer_loops(case, tile, mode):
    x, w, _, stride, pad, dil, groups = case
    acc_bits, overflow = mode
    tile = _tile(tile, overflow)
    H, W = x.shape[-2:]
    Ho = (H + 2 * pad - dil * (w.shape[2] - 1) - 1) // stride + 1
    Wo = (W + 2 * pad - dil * (w.shape[3] - 1) - 1) // stride + 1
    gz = int(x.abs().max()) % 200                      # asymmetric gradient codes (−z .. 255 − z) too
    g = torch.randint(-gz, 256 - gz, (x.shape[0], w.shape[0], Ho, Wo), generator=torch.Generator().manual_seed(1))
    mode_kw = dict(acc_bits=acc_bits, tile=tile, overflow=overflow, exact=False)
    gx = tiled_conv2d_input_grad(g, w, (H, W), stride, pad, dil, groups, **mode_kw)
    ref, events = loop_conv2d_input_grad(g, w, H, W, stride, pad, dil, groups, acc_bits, tile, overflow)
    assert torch.equal(gx.acc, ref) and int(gx.events) == events
    gw = tiled_conv2d_weight_grad(x, g, w.shape, stride, pad, dil, groups, **mode_kw)
    ref, events = loop_conv2d_weight_grad(x, g, w.shape, stride, pad, dil, groups, acc_bits, tile, overflow)
    assert torch.equal(gw.acc, ref) and int(gw.events) == events


def test_strided_input_grad_phases_without_taps():
    """A 1×1 stride-2 kernel meets G_Y only at even outputs: the other three phases sum nothing (0, no
    event), also when the exact sum is not kept (exact=False, what training asks for)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randint(-127, 128, (2, 6, 3, 3), generator=gen)
    w = torch.randint(-127, 128, (6, 4, 1, 1), generator=gen)
    for exact in (True, False):
        res = tiled_conv2d_input_grad(g, w, (6, 6), 2, 0, 1, 1, acc_bits=10, tile=2, overflow="saturate", exact=exact)
        ref, events = loop_conv2d_input_grad(g, w, 6, 6, 2, 0, 1, 1, 10, 2, "saturate")
        assert torch.equal(res.acc, ref) and int(res.events) == events > 0
        assert not bool(res.acc[:, :, 1::2].any()) and (res.exact is None) == (not exact)


@pytest.mark.parametrize("shape, pads", [((2, 3, 5, 7), (1, 2, 3, 0)), ((4, 16, 40, 41), (1, 1, 1, 1))])
def test_padding_in_one_pass_equals_the_torch_expression(shape, pads):
    """csrc/fake_quant.c qc_padded (a conv operand zero-padded in one pass; the second shape runs on threads):
    the bits of a zero fill and the interior written, of x itself and of its codes _codes(x, mult) (ties
    to even, NaN kept); nothing applies, and nothing is written, for a per-channel multiplier."""
    from qcompile.train import native
    from qcompile.train.tiled import _codes, _pad_in_one_pass

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 40
    x.view(-1)[:6] = torch.tensor([0.5, 1.5, -0.5, -2.5, float("nan"), -0.0])
    (t, b, l, r), (N, C, H, W) = pads, shape
    for mult in (None, torch.tensor(1.0), torch.tensor(0.37)):
        want = torch.zeros(N, C, H + t + b, W + l + r)
        want[:, :, t:t + H, l:l + W] = x if mult is None else _codes(x, mult)
        got = torch.full_like(want, 7.0)
        assert _pad_in_one_pass(x, got, pads, mult) == native.enabled()
        if native.enabled():
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    got = torch.full_like(want, 7.0)
    assert not _pad_in_one_pass(x, got, pads, torch.ones(C)) and bool((got == 7.0).all())


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 20), st.integers(1, 4), TILES, MODES,
       st.booleans(), st.integers(0, 2 ** 16))
def test_tiled_matmul_and_linear_equal_integer_loop(B, M, K, N, tile, mode, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-255, 256, (B, M, K), generator=gen)
    b = torch.randint(-127, 128, (B, K, N), generator=gen)
    bias = torch.randint(-3000, 3000, (N,), generator=gen) if with_bias else None
    acc_bits, overflow = mode
    tile = _tile(tile, overflow)
    res = tiled_matmul(a.double(), b.double(), None if bias is None else bias.double(),
                       acc_bits=acc_bits, tile=tile, overflow=overflow)
    ref, events = loop_matmul(a, b, bias, acc_bits, tile, overflow)
    assert torch.equal(res.acc.to(torch.int64), ref) and int(res.events) == events
    lin = tiled_linear(a[0], b[0].t(), bias, acc_bits=acc_bits, tile=tile, overflow=overflow)
    assert torch.equal(lin.acc, ref[0])
    # leading dimensions (a sequence of rows, as in a transformer's linear) against the same 2-d weight
    rows = tiled_linear(a, b[0].t(), bias, acc_bits=acc_bits, tile=tile, overflow=overflow)
    per_row = loop_matmul(a, b[0].expand(B, K, N), bias, acc_bits, tile, overflow)[0]
    assert rows.acc.shape == (B, M, N) and torch.equal(rows.acc, per_row)


def _scan_by_definition(ps, start, lo, hi, pairs=False):
    """(acc, overflowed, events) of the clamp-scan written tile by tile on int64 copies (pairs: each
    partial clamped first, an event where that changed it)."""
    acc = start.to(torch.int64).clone()
    hits = torch.zeros(acc.shape, dtype=torch.int64)
    for p in ps.to(torch.int64):
        if pairs:
            hits += (p.clamp(lo, hi) != p).to(torch.int64)
            p = p.clamp(lo, hi)
        v = acc + p
        acc = v.clamp(lo, hi)
        hits += (acc != v).to(torch.int64)
    return acc, hits > 0, int(hits.sum())


@pytest.fixture
def two_threads():
    """torch (and the scan kernel's OpenMP blocks, on torch's pool) on two threads for one test."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


SCAN_LAYOUTS = [  # (buffer shape, permutation giving (tiles, *tile shape)): the layouts the tiled ops produce
    ((7, 5, 300), (0, 1, 2)),                   # matmul: tiles outermost
    ((3, 7, 4, 50), (1, 0, 2, 3)),              # conv / G_W / phases: (groups, tiles, rows, cols)
    ((6, 1, 9), (1, 0, 2)),                     # depthwise G_W: size-1 dims
    ((5, 7, 3, 11), (1, 3, 0, 2)),              # no contiguous run: the kernel walks single elements
]


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("layout", SCAN_LAYOUTS + [((4, 3, 100_000), (0, 1, 2))])   # the last: >= 2^20, threaded
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pairs", [False, True])
def test_clamp_scan_equals_its_definition_on_every_layout(kernel, layout, dtype, pairs, monkeypatch, two_threads):
    from qcompile.train import tiled
    if kernel == "torch":
        monkeypatch.setenv("QCOMPILE_NATIVE", "0")
    elif tiled.native.library("clamp_scan") is None:
        pytest.fail("the C clamp-scan kernel did not build")
    shape, perm = layout
    gen = torch.Generator().manual_seed(sum(shape))
    buf = torch.randint(-1300 if pairs else -900, 1300 if pairs else 900, shape, generator=gen).to(dtype)
    ps = buf.permute(*perm)
    start = torch.randint(-1000, 1000, ps.shape[1:], generator=gen).to(dtype)
    want = _scan_by_definition(ps, start, -1024, 1023, pairs)
    acc, overflowed = start.clone(), torch.ones(ps.shape[1:], dtype=torch.bool)    # first: overwritten
    events = tiled._clamp_scan(buf.clone().permute(*perm), acc, -1024, 1023, overflowed, from_zero=False, first=True,
                               pairs=pairs)
    assert torch.equal(acc.to(torch.int64), want[0])
    assert torch.equal(overflowed, want[1]) and events == want[2] and events > 0
    acc, before = torch.full(ps.shape[1:], float("nan"), dtype=dtype), overflowed.clone()   # from_zero: not read
    events = tiled._clamp_scan(buf.clone().permute(*perm), acc, -1024, 1023, overflowed, from_zero=True, first=False,
                               pairs=pairs)
    want = _scan_by_definition(ps, torch.zeros_like(start), -1024, 1023, pairs)
    assert torch.equal(acc.to(torch.int64), want[0]) and events == want[2]
    assert torch.equal(overflowed, before | want[1])                                 # not first: flags kept


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_run_tiles_over_several_chunks_marks_each_overflowed_output(kernel, monkeypatch):
    from qcompile.train import tiled
    if kernel == "torch":
        monkeypatch.setenv("QCOMPILE_NATIVE", "0")
    monkeypatch.setattr(tiled, "CHUNK_ELEMENTS", 64)        # 3 tiles per chunk below
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(-255, 256, (4, 40), generator=gen)
    b = torch.randint(-127, 128, (40, 5), generator=gen)
    bias = torch.randint(-3000, 3000, (5,), generator=gen)
    res = tiled_matmul(a, b, bias, acc_bits=17, tile=4, overflow="saturate")
    for m, n in itertools.product(range(4), range(5)):
        acc, events = loop_accumulate([int(a[m, k]) * int(b[k, n]) for k in range(40)], bias[n], 17, 4, "saturate")
        assert int(res.acc[m, n]) == acc and bool(res.overflowed[m, n]) == (events > 0)
    assert 0 < int(res.overflowed.sum()) < 20


def test_pairwise_fused_kernel_equals_the_tile_path(monkeypatch):
    """The "pairwise" ops through csrc/tiled_gemm.c (each pair's sum clamped in registers, none stored)
    give the accumulator, the exact sum, the overflow flags and the event count of the tile-by-tile
    path (QCOMPILE_NATIVE=0), on a conv with an odd reduction, groups and stride, its weight gradient
    over an odd number of rows, and a batched matmul."""
    from qcompile.train import tiled
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (3, 4, 7, 7), generator=gen).float()
    w = torch.randint(-128, 128, (6, 2, 3, 3), generator=gen).float()
    b = torch.randint(-3000, 3000, (6,), generator=gen).float()
    g = torch.randint(-128, 128, (3, 6, 5, 5), generator=gen).float()         # 3·25 rows: odd
    a2, b2 = torch.randint(0, 256, (2, 5, 33), generator=gen).float(), torch.randint(-128, 128, (2, 33, 4), generator=gen).float()
    mode = dict(acc_bits=16, tile=2, overflow="pairwise", exact=True)
    ops = [lambda: tiled_conv2d(x, w, b, 2, 1, 1, 2, **mode),
           lambda: tiled_conv2d_weight_grad(x, g, w.shape, 1, 0, 1, 2, **mode),
           lambda: tiled_matmul(a2, b2, b[:4], **mode)]
    calls = []
    monkeypatch.setattr(tiled, "FUSED_MIN_FILL", 0.0)
    monkeypatch.setattr(tiled, "_fused_gemm", lambda *a, **k: calls.append(a[3]) or FUSED(*a, **k))
    fused = [op() for op in ops]
    assert calls == ["pairwise"] * 3
    monkeypatch.setenv("QCOMPILE_NATIVE", "0")
    for got, want in zip(fused, (op() for op in ops)):
        assert torch.equal(got.acc, want.acc) and torch.equal(got.exact, want.exact)
        assert torch.equal(got.overflowed, want.overflowed) and int(got.events) == int(want.events) > 0


def _fused_cases(x, w, b, g, stride, pad, dil, groups, mode):
    """The ops that go through csrc/tiled_gemm.c on float32 plans: conv, both conv gradients, a batched
    matmul with a broadcast operand, a linear layer with its bias (per column)."""
    xf, wf, bf, gf = (t.float() for t in (x, w, b, g))
    gen = torch.Generator().manual_seed(5)
    right = torch.randint(-128, 128, (x.shape[2] * x.shape[3], 5), generator=gen).float()
    w_lin, b_lin = torch.randint(-127, 128, (7, x.shape[3]), generator=gen).float(), bf[:1].expand(7)
    return [lambda: tiled_conv2d(xf, wf, bf, stride, pad, dil, groups, **mode),
            lambda: tiled_conv2d_input_grad(gf, wf, x.shape[-2:], stride, pad, dil, groups, **mode),
            lambda: tiled_conv2d_weight_grad(xf, gf, w.shape, stride, pad, dil, groups, **mode),
            lambda: tiled_matmul(xf.flatten(2), right.expand(x.shape[0], -1, -1), **mode),
            lambda: tiled_linear(xf, w_lin, b_lin, **mode)]


def _equal_results(got, want) -> bool:
    """Equal accumulators, flags and events, and equal exact sums where both kept one (exact=False may
    leave it None); an overflowed-output count, where a result has one, equals its flags' count."""
    counted = all(r.overflowed_count is None or r.overflowed_count == int(r.overflowed.sum()) for r in (got, want))
    return (torch.equal(got.acc, want.acc) and torch.equal(got.overflowed, want.overflowed)
            and int(got.events) == int(want.events) and counted
            and (got.exact is None or want.exact is None or torch.equal(got.exact, want.exact)))


FUSED_MODES = st.sampled_from([("saturate", t) for t in (1, 2, 3, 5, 8, 64, 300)] + [("pairwise", 2)]
                              + [("wrap", t) for t in (1, 3, 8)])


@SETTINGS
@given(conv_case(), FUSED_MODES, st.sampled_from([10, 12, 16]), st.booleans())
def test_fused_gemm_equals_the_torch_path(case, mode, acc_bits, exact):
    """csrc/tiled_gemm.c (operands read in place through offset tables, partial sums never stored)
    gives the accumulator, flags, events and exact sum of the torch ops (QCOMPILE_NATIVE=0) on every op
    it serves, in every overflow mode (FUSED_MIN_FILL off: small products too); the spy checks that the
    fused kernel ran."""
    from qcompile.train import tiled
    x, w, b, stride, pad, dil, groups = case
    y = F.conv2d(x.double(), w.double(), None, stride, pad, dil, groups)
    g = torch.randint(-128, 128, y.shape, generator=torch.Generator().manual_seed(3))
    overflow, tile = mode
    ops = _fused_cases(x, w, b, g, stride, pad, dil, groups, dict(acc_bits=acc_bits, tile=tile, overflow=overflow,
                                                                  exact=exact))
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiled, "FUSED_MIN_FILL", 0.0)                 # the kernel serves these small products too
        mp.setattr(tiled, "_fused_gemm", lambda *a, **k: calls.append(1) or FUSED(*a, **k))
        fused = [op() for op in ops]
        mp.setenv("QCOMPILE_NATIVE", "0")
        for got, want in zip(fused, (op() for op in ops)):
            assert _equal_results(got, want) and (got.exact is not None) >= exact
    if tile < w[0].numel() and tile <= 8:          # the conv reduction spans several float32 tiles
        assert calls


@SETTINGS
@given(conv_case(), FUSED_MODES, st.sampled_from([10, 16]), st.integers(0, 2 ** 16))
def test_convs_read_the_weight_codes_of_real_weights(case, mode, acc_bits, seed):
    """A conv and its input gradient given the weight's real values on its per-channel grid with the
    multipliers 1/scale (w_mult: the fused kernel rounds w·(1/scale) as it packs the weight) give what
    they give on the codes themselves, fused and on the torch path alike; on the grid, _codes gives the
    codes back exactly. With out_scale (the conv's and the weight gradient's per channel, the input
    gradient's one value) the accumulator comes back times it, the flags, events and exact sums unchanged."""
    from qcompile.train import tiled
    x, w, b, stride, pad, dil, groups = case
    gen = torch.Generator().manual_seed(seed)
    sw = torch.rand(w.shape[0], generator=gen) * 0.01 + 1e-4
    w_real, inv_w = w.float() * sw.view(-1, 1, 1, 1), torch.reciprocal(sw)
    assert torch.equal(tiled._codes(w_real, inv_w, 0), w.float())
    y = F.conv2d(x.double(), w.double(), None, stride, pad, dil, groups)
    g = torch.randint(-128, 128, y.shape, generator=gen).float()
    overflow, tile = mode
    m = dict(acc_bits=acc_bits, tile=tile, overflow=overflow, exact=False)
    amax = (float(x.abs().max()), float(w.abs().max()), 128.0)
    xf, wf, geometry = x.float(), w.float(), (stride, pad, dil, groups)
    s_out, s_in = torch.rand(w.shape[0], generator=gen) + 0.5, torch.rand((), generator=gen) + 0.5
    pairs = [(lambda: tiled_conv2d(xf, w_real, b.float(), *geometry, **m, absmax=amax[:2], w_mult=inv_w,
                                   out_scale=s_out),
              lambda: tiled_conv2d(xf, wf, b.float(), *geometry, **m, absmax=amax[:2]), s_out.view(1, -1, 1, 1)),
             (lambda: tiled_conv2d_input_grad(g, w_real, x.shape[-2:], *geometry, **m, absmax=amax[2:0:-1],
                                              w_mult=inv_w, out_scale=s_in),
              lambda: tiled_conv2d_input_grad(g, wf, x.shape[-2:], *geometry, **m, absmax=amax[2:0:-1]), s_in),
             (lambda: tiled_conv2d_weight_grad(xf, g, w.shape, *geometry, **m, absmax=amax[::2], out_scale=s_out),
              lambda: tiled_conv2d_weight_grad(xf, g, w.shape, *geometry, **m, absmax=amax[::2]),
              s_out.view(-1, 1, 1, 1))]
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiled, "FUSED_MIN_FILL", 0.0)
        mp.setattr(tiled, "_fused_gemm", lambda *a, **k: calls.append(1) or FUSED(*a, **k))
        fused = [real() for real, _, _ in pairs]
        on_codes = [codes() for _, codes, _ in pairs]
        mp.setenv("QCOMPILE_NATIVE", "0")
        torch_path = [real() for real, _, _ in pairs]
    for got, want, plain, (_, _, scale) in zip(fused, on_codes, torch_path, pairs):
        want.acc = want.acc * scale
        assert _equal_results(got, want) and _equal_results(plain, want)
    if tile < w[0].numel() and tile <= 8:
        assert calls


def _fused_build_case():
    """A conv whose products span several column blocks and register panels, 20 output channels (not a
    multiple of the panel rows), 288-product reductions: enough work for the kernel's OpenMP loop."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(-128, 128, (2, 32, 24, 24), generator=gen)
    w = torch.randint(-127, 128, (20, 32, 3, 3), generator=gen)
    b = torch.randint(-3000, 3000, (20,), generator=gen)
    g = torch.randint(-128, 128, (2, 20, 12, 12), generator=gen)
    return x, w, b, g, 2, 1, 1, 1


def test_fused_convs_without_flags_count_the_outputs_that_overflowed(monkeypatch):
    """flags=False (what the op asks for where nothing reads the flags): the fused kernel writes no
    overflow flags, and counts the outputs that overflowed; the accumulator and events are unchanged."""
    x, w, b, g, stride, pad, dil, groups = _fused_build_case()
    xf, wf, bf, gf = (t.float() for t in (x, w, b, g))
    mode = dict(acc_bits=14, tile=64, overflow="saturate", exact=False)
    ops = [lambda **f: tiled_conv2d(xf, wf, bf, stride, pad, dil, groups, **mode, **f),
           lambda **f: tiled_conv2d_input_grad(gf, wf, x.shape[-2:], stride, pad, dil, groups, **mode, **f),
           lambda **f: tiled_conv2d_weight_grad(xf, gf, w.shape, stride, pad, dil, groups, **mode, **f)]
    for op in ops:
        got, want = op(flags=False), op()
        assert got.overflowed is None and 0 < got.overflowed_count == int(want.overflowed.sum())
        assert torch.equal(got.acc, want.acc) and int(got.events) == int(want.events)


@pytest.mark.parametrize("march, block_shapes", [("native", None), ("haswell", ((6, 16), (4, 24))),
                                                 ("x86-64", ((6, 8),))])
def test_fused_gemm_builds_for_every_vector_width(march, block_shapes, monkeypatch, tmp_path, two_threads):
    """The kernel built for AVX-512, AVX2 and the portable vector width (SSE) gives the torch path's
    results with each of its register block shapes, with tiles shorter and longer than its reduction
    block and in the "pairwise" and "wrap" modes, on two threads."""
    from qcompile.train import native
    if march == "haswell" and "avx2" not in native._cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    if march != "native":
        monkeypatch.setattr(native, "CFLAGS", [f"-march={march}" if f.startswith("-march=") else f for f in native.CFLAGS])
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    from qcompile.train import tiled
    lib = native.library("tiled_gemm")
    shapes = tiled._block_shapes(lib)
    if block_shapes is not None:
        assert shapes == block_shapes
    elif "avx512f" in native._cpu_flags().split():
        assert shapes == ((14, 32), (8, 48))
    for shape in range(len(shapes)):                  # every register block shape (AVX-512: 14 x 32 and 8 x 48;
                                                      # AVX2: 6 x 16 and 4 x 24)
        monkeypatch.setattr(tiled, "_block_plan", lambda lib, M, N, shape=shape: (shape, False))
        for tile, overflow in ((64, "saturate"), (300, "saturate"), (2, "pairwise"), (8, "wrap")):
            ops = _fused_cases(*_fused_build_case(), dict(acc_bits=16, tile=tile, overflow=overflow, exact=True))
            fused = [op() for op in ops]
            monkeypatch.setenv("QCOMPILE_NATIVE", "0")
            wanted = [op() for op in ops]
            monkeypatch.setenv("QCOMPILE_NATIVE", "1")
            for got, want in zip(fused, wanted):
                assert _equal_results(got, want) and int(want.events) > 0
                assert overflow != "saturate" or int(want.overflowed.sum()) < want.overflowed.numel()


def test_fused_wrap_runs_in_exact_chunks_past_a_float64_tile(monkeypatch):
    """A wrap tile too long for exact float32 partial sums (its plan: float64 partials) still runs fused,
    in chunks that keep float32 exact, and gives the torch path's float64 results (G_W over 1152 rows of
    a padded input, a matmul over 2000)."""
    from qcompile.train import tiled
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-128, 128, (2, 4, 24, 24), generator=gen).float()
    w = torch.randint(-127, 128, (20, 4, 3, 3), generator=gen).float()
    g = torch.randint(-128, 128, (2, 20, 24, 24), generator=gen).float()
    a, b = torch.randint(-128, 128, (32, 2000), generator=gen).float(), torch.randint(-127, 128, (2000, 32), generator=gen).float()
    mode = dict(acc_bits=12, overflow="wrap", exact=False)
    ops = [lambda: tiled_conv2d_weight_grad(x, g, w.shape, 1, 1, tile=1152, **mode),
           lambda: tiled_matmul(a, b, tile=2000, **mode)]
    assert tiled._plan(x, g, None, 1152, 12, 1152, "wrap").part_dtype == torch.float64
    calls = []
    monkeypatch.setattr(tiled, "_fused_gemm", lambda *a, **k: calls.append(a[1]) or FUSED(*a, **k))
    fused = [op() for op in ops]
    assert len(calls) == 2 and max(calls) < 1152
    monkeypatch.setenv("QCOMPILE_NATIVE", "0")
    for got, want in zip(fused, (op() for op in ops)):
        assert _equal_results(got, want) and int(want.events) > 0


def test_without_a_c_compiler_the_torch_scan_is_used(monkeypatch, tmp_path):
    from qcompile.train import native
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    x = torch.randint(0, 256, (1, 3, 5, 5))
    w = torch.randint(-127, 128, (2, 3, 3, 3))
    with pytest.warns(native.NativeBuildWarning) as warned:
        res = tiled_conv2d(x, w, None, 1, 1, acc_bits=12, tile=5, overflow="saturate")
    assert {"tiled_gemm", "clamp_scan"} == {k for k in ("tiled_gemm", "clamp_scan") for m in warned
                                            if k in str(m.message) and "no-such-compiler" in str(m.message)}
    ref, events = loop_conv2d(x, w, None, 1, 1, 1, 1, 12, 5, "saturate")
    assert torch.equal(res.acc, ref) and int(res.events) == events > 0


def test_grid_absmax_is_the_largest_code_magnitude_over_channels():
    """grid_absmax reads only the zero points' extremes: the same value as max_code_magnitude's largest over
    every channel, for zero points inside and outside the code range, per tensor and per channel."""
    from qcompile.core.grids import max_code_magnitude
    from qcompile.train.tiled import grid_absmax
    gen = torch.Generator().manual_seed(5)
    for qrange in ((0, 255), (-128, 127), (-8, 7)):
        for z in (torch.tensor(3.0), torch.tensor([0.0]), torch.randint(-300, 300, (17,), generator=gen).float(),
                  torch.randint(qrange[0], qrange[1] + 1, (9,), generator=gen).float()):
            assert grid_absmax(qrange, z) == float(max_code_magnitude(qrange, z).max())


def test_float32_partials_switch_to_float64_when_too_large():
    # 4 products of 2^23 each: a float32 tile sum would round; the result must still be exact
    a = torch.full((1, 1, 4), 2.0 ** 12)
    b = torch.full((1, 4, 1), 2.0 ** 11 + 1)
    res = tiled_matmul(a, b, acc_bits=None, tile=4)
    assert int(res.acc) == 4 * 2 ** 12 * (2 ** 11 + 1)
    with pytest.raises(ValueError, match="2\\^53"):
        tiled_matmul(torch.full((1, 2), 2.0 ** 30), torch.full((2, 1), 2.0 ** 30), acc_bits=None, tile=None)


# ---- the pass and the training op ----------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, groups=4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.relu(self.dw(x))
        return self.fc(x.flatten(1))


def _grid_quantizers(qm, path):
    """The quantizers whose scale / zero-point buffers the accumulator op at `path` reads (its get_attr inputs)."""
    node = next(n for n in qm.graph.nodes if n.op == "call_module" and n.target == path)
    return tuple(qm.get_submodule(node.kwargs[f"{p}_scale"].target.rpartition(".")[0]) for p in "ab")


def _compiled(**cfg):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 8, 8)
    qm = qcompile.compile(Net(), (x,), qcompile.QConfig(seed=0, **cfg))
    qm.train()
    return qm, x


def test_acc_bits_none_leaves_the_plain_quantized_op():
    plain, x = _compiled(grad_bits=8)
    same, _ = _compiled(grad_bits=8, acc_bits=None, tile=16, overflow="wrap", log_barrier=False)
    assert not any(isinstance(m, NarrowAccOp) for m in same.modules())
    assert same.code == plain.code
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = plain(x1), same(x2)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_pass_rewrites_conv_depthwise_and_linear():
    qm, x = _compiled(acc_bits=16, tile=4)
    ops = {n: m for n, m in qm.named_modules() if isinstance(m, NarrowAccOp)}
    assert set(ops) == {"conv.accumulator", "dw.accumulator", "fc.accumulator"}
    assert ops["dw.accumulator"].groups == 4 and ops["conv.accumulator"].kind == "conv2d"
    assert not any(n.op == "call_function" and n.target in (torch.conv2d, F.conv2d, F.linear) for n in qm.graph.nodes)
    node = next(n for n in qm.graph.nodes if n.op == "call_module" and n.target == "conv.accumulator")
    assert {k: v.target for k, v in node.kwargs.items()} == {      # the grids are graph inputs of the op
        "a_scale": "conv.input_quant.scale", "a_zero_point": "conv.input_quant.zero_point",
        "b_scale": "conv.weight_quant.scale", "b_zero_point": "conv.weight_quant.zero_point"}


def test_wide_accumulator_reproduces_the_plain_quantized_op():
    """A 40-bit accumulator never overflows: the forward equals the fake-quantized op except where the
    int32 bias (rounded to the accumulator's grid) moves an output across a rounding boundary: one step."""
    plain, x = _compiled()
    wide, _ = _compiled(acc_bits=40, tile=4)
    wide.load_state_dict(plain.state_dict(), strict=False)
    y_wide, y_plain = wide(x), plain(x)
    step = float(plain.get_submodule("fc.output_quant").scale)
    diff = (y_wide - y_plain).abs()
    assert diff.max() <= 1.01 * step and diff.mean() < 0.1 * step


def test_forward_is_the_integer_op_rescaled():
    qm, x = _compiled(acc_bits=10, tile=3, overflow="saturate")
    seen = {}
    op = qm.get_submodule("conv.accumulator")
    handle = op.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    qm(x)
    handle.remove()
    a, w, bias = seen["args"]
    sx, sw = (q.scale for q in _grid_quantizers(qm, "conv.accumulator"))
    x_int, w_int = torch.round(a / sx), torch.round(w / sw.view(-1, 1, 1, 1))
    b_int = torch.round(bias / (sx * sw))
    ref, _ = loop_conv2d(x_int.long()[:2], w_int.long(), b_int.long(), 1, 1, 1, 1, 10, 3, "saturate")
    torch.testing.assert_close(seen["out"][:2], ref.float() * (sx * sw).view(1, -1, 1, 1), rtol=1e-6, atol=0)


def _gradient_step(qm, x, path):
    """One training step of `qm` (after one that initializes the estimators), recording at the op at `path`
    its operands a and w, their gradients, and its gradient quantizer's codes u_int and scale su."""
    op = qm.get_submodule(path)
    seen = {}
    gq = op.grad_output_quant
    orig = gq.gradient_codes

    def spy(g, *mult):
        seen["u_int"], seen["su"] = orig(g, *mult), gq.scale.clone()
        return seen["u_int"]

    gq.gradient_codes = spy
    op.register_forward_pre_hook(lambda m, args: seen.update(a=args[0], w=args[1]))
    qm(x)
    y = qm(x.clone().requires_grad_(True))
    seen["a"].register_hook(lambda g: seen.update(grad_a=g))
    seen["w"].register_hook(lambda g: seen.update(grad_w=g))
    y.square().sum().backward()
    return op, seen


def test_backward_uses_quantized_gradients_and_the_tiled_accumulator():
    qm, x = _compiled(acc_bits=12, tile=4, grad_bits=8, grad_acc_bits=12, stochastic_rounding=False)
    op, seen = _gradient_step(qm, x, "fc.accumulator")
    su, u_int, (sx, sw) = seen["su"], seen["u_int"], (q.scale for q in _grid_quantizers(qm, "fc.accumulator"))
    w_int = torch.round(seen["w"].detach() / sw.view(-1, 1))
    ref = tiled_matmul(u_int.double(), w_int.double(), acc_bits=12, tile=4, overflow="saturate").acc
    torch.testing.assert_close(seen["grad_a"], (ref * su).float(), rtol=1e-6, atol=0)
    x_int = torch.round(seen["a"].detach() / sx)
    ref_w = tiled_matmul(u_int.t().double(), x_int.double(), acc_bits=12, tile=4, overflow="saturate").acc
    torch.testing.assert_close(seen["grad_w"], (ref_w * su * sx / sw.view(-1, 1)).float(), rtol=1e-6, atol=0)
    assert op.outputs_grad == seen["grad_a"].numel() + seen["grad_w"].numel()


def test_conv_gradients_read_the_padded_input_codes_and_the_weight_through_its_grid():
    """A conv op forms its input's codes zero-padded once (NarrowAccOp.padded_codes), which its forward and
    its weight gradient both read, and reads its weight's codes through the kernel's multipliers: its
    input and weight gradients equal the tiled references on the codes and the quantized u."""
    qm, x = _compiled(acc_bits=12, tile=4, grad_bits=8, grad_acc_bits=12)
    op, seen = _gradient_step(qm, x, "conv.accumulator")
    su, u, (sx, sw) = seen["su"], seen["u_int"], (q.scale for q in _grid_quantizers(qm, "conv.accumulator"))
    x_int = torch.round(seen["a"].detach() / sx).double()
    w_int = torch.round(seen["w"].detach() / sw.view(-1, 1, 1, 1)).double()
    mode = dict(acc_bits=12, tile=4, overflow="saturate")
    ref_a = tiled_conv2d_input_grad(u.double(), w_int, x_int.shape[-2:], 1, 1, **mode).acc
    torch.testing.assert_close(seen["grad_a"], (ref_a * su).float(), rtol=1e-6, atol=0)
    ref_w = tiled_conv2d_weight_grad(x_int, u.double(), w_int.shape, 1, 1, **mode).acc
    torch.testing.assert_close(seen["grad_w"], (ref_w * su * sx / sw.view(-1, 1, 1, 1)).float(), rtol=1e-6, atol=0)
    assert op.events_grad > 0


@pytest.mark.parametrize("acc_grad", ["ste", "zero_saturated"])
def test_gradient_through_the_accumulator(acc_grad):
    """Without gradient quantization the backward is exact: G_X = G_Y·Ŵᵀ, with G_Y zeroed at the
    outputs that overflowed when acc_grad="zero_saturated" and passed straight through otherwise."""
    qm, x = _compiled(acc_bits=14, tile=2, acc_grad=acc_grad)
    op = qm.get_submodule("dw.accumulator")
    seen = {}
    orig = op.forward_int

    def spy(*args, **kw):                   # the flags too (the op asks for them with zero_saturated only)
        seen["res"] = orig(*args, **dict(kw, flags=True))
        return seen["res"]

    op.forward_int = spy

    def hooks(m, args, y):
        seen["a"], seen["w"] = args[0], args[1]
        args[0].register_hook(lambda g: seen.update(grad_a=g))
        y.register_hook(lambda g: seen.update(grad_y=g))

    op.register_forward_hook(hooks)
    qm(x).sum().backward()
    over = seen["res"].overflowed
    assert over.any() and (~over).any()
    g = seen["grad_y"].masked_fill(over, 0.0) if acc_grad == "zero_saturated" else seen["grad_y"]
    ref = torch.nn.grad.conv2d_input(seen["a"].shape, seen["w"].detach(), g, op.stride, op.padding,
                                     op.dilation, op.groups)
    torch.testing.assert_close(seen["grad_a"], ref)


def test_overflow_statistics_train_eval_reset_and_summary():
    qm, x = _compiled(acc_bits=8, tile=4)
    op = qm.get_submodule("conv.accumulator")
    qm(x)
    train = op.overflow_stats()["train"]
    assert train["events"] > 0 and 0 < train["overflowed"] <= train["outputs"] == 8 * 4 * 8 * 8
    assert op.overflow_stats()["eval"]["outputs"] == 0
    qm.eval()
    with torch.no_grad():
        qm(x)
    assert op.overflow_stats()["eval"]["outputs"] == 8 * 4 * 8 * 8
    text = qm.summary()
    assert "conv.accumulator" in text and "outputs overflowed" in text and "overflow-free margin" in text
    op.reset_overflow_stats()
    assert all(v["events"] == 0 and v["outputs"] == 0 for v in op.overflow_stats().values())
    assert "train:" not in op.describe()


def test_disabled_quantization_runs_the_float_op():
    qm, x = _compiled(acc_bits=8, tile=4)
    with qm.quantization_disabled():
        y = qm(x)
    ref = Net()
    ref.load_state_dict({k: v for k, v in qm.state_dict().items() if k in Net().state_dict()})
    torch.testing.assert_close(y, ref(x))


def test_errors_name_the_option_or_node():
    with pytest.raises(ValueError, match="grad_acc_bits"):
        qcompile.QConfig(grad_acc_bits=16)
    with pytest.raises(ValueError, match="barrier_growth"):
        qcompile.QConfig(barrier_growth=0.5)

    class Broadcast(nn.Module):
        def forward(self, a, b):
            return torch.matmul(a, b)

    with pytest.raises(UnsupportedOpError, match="matmul"):
        qcompile.compile(Broadcast(), (torch.randn(2, 3, 4), torch.randn(5, 2, 4, 3)), acc_bits=16)


def test_bmm_is_rewritten_and_trains():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 6)

        def forward(self, x):
            q = self.q(x)
            return torch.bmm(q, q.transpose(1, 2))

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    qm = qcompile.compile(Attn(), (x,), acc_bits=12, tile=4, grad_bits=8, seed=0)
    qm.train()
    kinds = sorted(m.kind for m in qm.modules() if isinstance(m, NarrowAccOp))
    assert kinds == ["linear", "matmul"]
    qm(x).sum().backward()
    assert qm.q.weight.grad is not None and torch.isfinite(qm.q.weight.grad).all()


# ---- accumulator bounds ------------------------------------------------------------------------

def test_accumulator_bounds_p_min_is_sufficient_and_tight_enough():
    qm, x = _compiled(acc_bits=32, tile=4)
    qm(x)
    rows = {r["layer"]: r for r in accumulator_bounds(qm)}
    assert set(rows) == {"conv", "dw", "fc"}
    r = rows["fc"]
    xq, wq = _grid_quantizers(qm, "fc.accumulator")
    w_int = torch.round(qm.fc.weight.detach() / wq.scale.view(-1, 1))
    b_int = torch.round(qm.fc.bias.detach() / (xq.scale * wq.scale))
    lo_x, hi_x = xq.qrange[0] - xq.zero_point, xq.qrange[1] - xq.zero_point
    # the adversarial input for each channel: every product at its largest magnitude with the bias's sign
    worst = 0
    for o in range(w_int.shape[0]):
        sign = 1 if b_int[o] >= 0 else -1
        xs = torch.where(w_int[o] * sign >= 0, hi_x, lo_x)
        worst = max(worst, abs(int((w_int[o] * xs).sum() + b_int[o])))
    assert worst <= r["bound"]
    assert r["p_min"] == min_acc_bits(r["bound"]) and r["p_min_tile"] <= r["p_min"]
    # a P_min-bit accumulator holds the worst case, whatever the tiling
    assert worst <= acc_range(r["p_min"])[1]
    assert r["margin"] == acc_range(32)[1] - r["bound"]


def test_accumulator_bounds_for_plain_quantized_layers():
    qm, x = _compiled()
    qm(x)
    rows = accumulator_bounds(qm)
    assert [r["layer"] for r in rows] == ["conv", "dw", "fc"]
    assert all(r["acc_bits"] is None and r["p_min"] >= r["p_min_tile"] > 1 for r in rows)
    assert rows[0]["K"] == 2 * 9 and rows[2]["K"] == 36


def test_conv1d_is_the_conv2d_semantics_on_one_row():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    x = torch.randn(4, 3, 9)
    qm = qcompile.compile(Seq(), (x,), acc_bits=9, tile=4, grad_bits=8, seed=0)
    qm.train()
    op = qm.get_submodule("conv.accumulator")
    seen = {}
    op.register_forward_hook(lambda m, args, y: seen.update(args=args, y=y))
    qm(x).sum().backward()
    a, w, bias = seen["args"]
    sx, sw = (q.scale for q in _grid_quantizers(qm, "conv.accumulator"))
    x_int, w_int = torch.round(a / sx).long(), torch.round(w.detach() / sw.view(-1, 1, 1)).long()
    b_int = torch.round(bias.detach() / (sx * sw)).long()
    res = tiled_conv2d(x_int.unsqueeze(2), w_int.unsqueeze(2), b_int, (1, 2), (0, 1), 1, 1,
                       acc_bits=9, tile=4, overflow="saturate")
    torch.testing.assert_close(seen["y"], res.acc.squeeze(2).float() * (sx * sw).view(1, -1, 1), rtol=1e-6, atol=0)
    assert qm.conv.weight.grad is not None and op.outputs_grad > 0
