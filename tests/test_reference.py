"""The reference interpreter (`qcompile.backends.reference`) as an independent oracle: its
narrow-accumulator conv2d / linear / matmul equal the plain integer loops (tests/integer_loops.py)
on saturate and wrap, over several tiles, including outputs that overflow; it shares no code with
the training kernel."""
import ast
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from integer_loops import loop_accumulate, loop_conv2d, loop_matmul
from qcompile import ir
from qcompile.backends import reference
from qcompile.core.accumulator import accumulate_tiles, pairs_saturation_free, tile_plan
from qcompile.core.requant import quantize_multiplier, requantize

SETTINGS = settings(max_examples=40, deadline=None)
MODES = st.sampled_from([(None, "saturate"), (10, "saturate"), (12, "saturate"), (14, "wrap"), (10, "wrap"),
                         (12, "pairwise"), (16, "pairwise")])
TILES = st.sampled_from([None, 1, 2, 3, 5, 8])


def _tile(tile, overflow):
    """The drawn tile, or 2 for "pairwise" (its tiles are pairs)."""
    return 2 if overflow == "pairwise" else tile
WIDE = 1 << 40                    # act_min/act_max that never clamp: the op's output is its accumulator
IDENTITY = (1 << 30, 1)           # requantize(v, 2^30, 1) = v


def _tensor(name, shape, zero_point=0, bits=8, signed=False):
    return ir.Tensor(name, tuple(shape), bits, signed, 1.0, zero_point)


def _wide_out(name, shape):
    """An output tensor for the accumulator itself (32-bit, zero point 0; descriptive only)."""
    return _tensor(name, shape, 0, 32, True)


def _requant_attrs(o=None, mult=None, act=(-WIDE, WIDE)):
    m, s = IDENTITY if mult is None else mult
    if o is not None:
        m, s = np.full(o, m, dtype=np.int64), np.full(o, s, dtype=np.int64)
    return dict(multiplier=m, shift=s, act_min=act[0], act_max=act[1])


def run_accumulator(graph, *codes):
    """The reference's kernel of the graph's one op, called directly: the output here is the accumulator
    itself on a 32-bit identity grid, wider than any IR tensor (so not a graph `ir.verify` accepts)."""
    (op,) = graph.ops
    return reference.KERNELS[op.kind](graph, op, *codes)


def conv_graph(w, b, x_shape, zx, stride, pad, dil, groups, acc_bits, tile, overflow, **requant):
    O, _, kh, kw = w.shape
    C, H, W = x_shape
    Ho, Wo = (H + 2 * pad - dil * (kh - 1) - 1) // stride + 1, (W + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    tensors = {"x": _tensor("x", x_shape, zx), "y": _wide_out("y", (O, Ho, Wo))}
    attrs = dict(weight=w.astype(np.int8), bias=b.astype(np.int32), stride=(stride, stride), padding=(pad, pad),
                 dilation=(dil, dil), groups=groups, acc_bits=acc_bits, tile=tile, overflow=overflow,
                 **(requant or _requant_attrs(O)))
    return ir.Graph(["x"], ["y"], tensors, [ir.Op("conv2d", "conv", ["x"], "y", ir.Conv2d(**attrs))])


def linear_graph(w, b, zx, acc_bits, tile, overflow):
    O, I = w.shape
    tensors = {"x": _tensor("x", (I,), zx), "y": _wide_out("y", (O,))}
    attrs = dict(weight=w.astype(np.int8), bias=b.astype(np.int32), acc_bits=acc_bits, tile=tile, overflow=overflow,
                 **_requant_attrs(O))
    return ir.Graph(["x"], ["y"], tensors, [ir.Op("linear", "fc", ["x"], "y", ir.Linear(**attrs))])


def matmul_graph(M, K, N, za, zb, acc_bits, tile, overflow):
    tensors = {"a": _tensor("a", (M, K), za), "b": _tensor("b", (K, N), zb), "y": _wide_out("y", (M, N))}
    attrs = dict(acc_bits=acc_bits, tile=tile, overflow=overflow, **_requant_attrs())
    return ir.Graph(["a", "b"], ["y"], tensors, [ir.Op("matmul", "bmm", ["a", "b"], "y", ir.Matmul(**attrs))])


@st.composite
def conv_case(draw):
    """A conv over uint8 codes with zero point zx; grouped, or depthwise (groups = channels, with a
    channel multiplier), strided, padded, dilated."""
    if draw(st.booleans()):                                   # depthwise
        groups, cg, og = draw(st.integers(1, 4)), 1, draw(st.integers(1, 2))
    else:
        groups, cg, og = draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, pad, dil = draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    H, W = draw(st.integers(max(3, dil * (kh - 1) + 1), 6)), draw(st.integers(max(3, dil * (kw - 1) + 1), 6))
    zx = draw(st.sampled_from([0, 37, 128, 255]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    x = rng.integers(0, 256, (2, groups * cg, H, W))
    w = rng.integers(-127, 128, (groups * og, cg, kh, kw))
    b = rng.integers(-4000, 4000, groups * og)
    return x, zx, w, b, stride, pad, dil, groups


@SETTINGS
@given(conv_case(), TILES, MODES)
def test_conv2d_equals_integer_loop(case, tile, mode):
    x, zx, w, b, stride, pad, dil, groups = case
    acc_bits, overflow = mode
    tile = _tile(tile, overflow)
    graph = conv_graph(w, b, x.shape[1:], zx, stride, pad, dil, groups, acc_bits, tile, overflow)
    ref, _ = loop_conv2d(x - zx, w, b, stride, pad, dil, groups, acc_bits, tile, overflow)
    np.testing.assert_array_equal(run_accumulator(graph, x), ref.numpy())


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 5), TILES, MODES, st.sampled_from([0, 128, 255]),
       st.integers(0, 2 ** 16))
def test_linear_equals_integer_loop(batch, I, O, tile, mode, zx, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch, I))
    w, b = rng.integers(-127, 128, (O, I)), rng.integers(-3000, 3000, O)
    acc_bits, overflow = mode
    tile = _tile(tile, overflow)
    ref, _ = loop_matmul((x - zx)[None], w.T[None], b, acc_bits, tile, overflow)
    np.testing.assert_array_equal(run_accumulator(linear_graph(w, b, zx, acc_bits, tile, overflow), x), ref[0].numpy())


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 24), st.integers(1, 4), TILES, MODES,
       st.sampled_from([0, 100, 255]), st.sampled_from([0, 128]), st.integers(0, 2 ** 16))
def test_matmul_equals_integer_loop(batch, M, K, N, tile, mode, za, zb, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 256, (batch, M, K)), rng.integers(0, 256, (batch, K, N))
    acc_bits, overflow = mode
    tile = _tile(tile, overflow)
    ref, _ = loop_matmul(a - za, b - zb, None, acc_bits, tile, overflow)
    out = run_accumulator(matmul_graph(M, K, N, za, zb, acc_bits, tile, overflow), a, b)
    np.testing.assert_array_equal(out, ref.numpy())


@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
def test_overflowing_conv_follows_the_tiles(overflow):
    """Large positive products in the first input channel, large negative ones in the second: a
    12-bit accumulator overflows inside the reduction. The outputs equal the loops (which count the
    events), and with saturation they differ from clamping the exact sum once (the clamp runs after
    every tile), with wrap they equal wrapping the exact sum once."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(200, 256, (2, 5, 5)), rng.integers(200, 256, (2, 5, 5))], axis=1)   # (2, 2, 5, 5)
    w = np.stack([np.full((4, 3, 3), 120), np.full((4, 3, 3), -110)], axis=1)                      # (4, 2, 3, 3)
    w += rng.integers(-7, 8, w.shape)
    b = rng.integers(-500, 500, 4)
    acc_bits, tile = 12, 4
    graph = conv_graph(w, b, x.shape[1:], 0, 1, 1, 1, 1, acc_bits, tile, overflow)
    out = run_accumulator(graph, x)
    ref, events = loop_conv2d(x, w, b, 1, 1, 1, 1, acc_bits, tile, overflow)
    np.testing.assert_array_equal(out, ref.numpy())
    exact, _ = loop_conv2d(x, w, b, 1, 1, 1, 1, None, None, overflow)
    exact = exact.numpy()
    lo, hi = -2 ** 11, 2 ** 11 - 1
    assert events > 0 and ((exact < lo).any() or (exact > hi).any())
    if overflow == "saturate":
        assert (out != np.clip(exact, lo, hi)).any()
    else:
        np.testing.assert_array_equal(out, (exact - lo) % 2 ** acc_bits + lo)


def test_requantization_and_relu_clamp_after_the_narrow_accumulator():
    """Real per-channel multipliers and a fused ReLU (act_min = zy) on the accumulator's result."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 4, 6, 6))
    w, b = rng.integers(-127, 128, (6, 2, 3, 3)), rng.integers(-2000, 2000, 6)
    mults = [quantize_multiplier(r) for r in rng.uniform(0.01, 0.2, 6)]
    m, s = np.array([p[0] for p in mults]), np.array([p[1] for p in mults])
    zy = 3
    graph = conv_graph(w, b, (4, 6, 6), 17, 2, 1, 1, 2, 13, 5, "saturate",
                       multiplier=m, shift=s, act_min=zy, act_max=255)
    graph.tensors["y"] = _tensor("y", graph.tensors["y"].shape, zy)
    acc, events = loop_conv2d(x - 17, w, b, 2, 1, 1, 2, 13, 5, "saturate")
    expected = np.clip(zy + requantize(acc.numpy(), m.reshape(1, -1, 1, 1), s.reshape(1, -1, 1, 1)), zy, 255)
    assert events > 0
    np.testing.assert_array_equal(reference.run_codes(graph, x), expected)


@pytest.mark.parametrize("acc_bits,overflow", [(None, "saturate"), (9, "saturate"), (11, "saturate"), (9, "wrap"),
                                               (16, "wrap"), (16, "pairwise"), (12, "pairwise")])
@pytest.mark.parametrize("tile", [None, 1, 3, 7, 50])
def test_accumulate_tiles_equals_loop_accumulate(acc_bits, overflow, tile):
    """The core helper on (tiles, outputs) partial sums, and on an iterator of tiles."""
    tile = _tile(tile, overflow)
    rng = np.random.default_rng(2)
    products = rng.integers(-255 * 127, 255 * 127, (23, 10))          # (reduction, outputs)
    start = rng.integers(-300, 300, 10)
    tl, T = tile_plan(23, tile)
    padded = np.concatenate([products, np.zeros((T * tl - 23, 10), np.int64)])
    partials = padded.reshape(T, tl, 10).sum(1)
    expected = [loop_accumulate(list(products[:, j]), start[j], acc_bits, tile, overflow)[0] for j in range(10)]
    np.testing.assert_array_equal(accumulate_tiles(partials, start, acc_bits, overflow), expected)
    np.testing.assert_array_equal(accumulate_tiles(iter(partials), start, acc_bits, overflow), expected)


def test_pairwise_without_pair_saturation_is_saturate_with_tiles_of_two():
    """7-bit unsigned inputs × 8-bit weights: no pair reaches 2^15 (2·127·128 = 32512), which
    `pairs_saturation_free` proves, and "pairwise" then equals "saturate" with tile 2 (the plain tile
    semantics), although the 16-bit accumulator saturates; 8-bit inputs do saturate pairs."""
    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (6, 40))
    w[:, :2] = -128                                              # the worst pair
    for x_max, free in ((127, True), (255, False)):
        assert pairs_saturation_free(np.abs(w), x_max, 16) == free
        x = rng.integers(0, x_max + 1, (30, 40))
        x[0, :2] = x_max
        partials = (x[:, None, :] * w[None]).reshape(30, 6, 20, 2).sum(-1).transpose(2, 0, 1)   # (pairs, rows, outputs)
        start = rng.integers(-3000, 3000, 6)
        pair = accumulate_tiles(partials, start, 16, "pairwise")
        plain = accumulate_tiles(partials, start, 16, "saturate")
        assert np.array_equal(pair, plain) == free
        assert (np.abs(plain) == 32767).any() or (plain == -32768).any()


def test_reference_imports_nothing_of_training():
    """The oracle shares only qcompile.core (and the IR) with the rest: a bug in the training kernel
    cannot hide in both. (torch only for core's one float→code rounding rule of the input.)"""
    source = pathlib.Path(reference.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert not {m for m in imported if m.startswith(("qcompile.train", "qcompile.passes", "qcompile.tools"))}
    assert {m for m in imported if m.startswith("qcompile")} <= {"qcompile", "qcompile.core.accumulator",
                                                                 "qcompile.core.grids", "qcompile.core.requant",
                                                                 "qcompile.core.rowwise"}
