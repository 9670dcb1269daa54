"""runtime/codegen: the generated C99 runtime equals the integer reference byte for byte.

Every test builds with gcc and runs the generated harness. Hand-built graphs cover each op
kind and accumulator mode in isolation; lowered models (LeNet on MNIST, torchvision
resnet18 / mobilenet_v2 / shufflenet_v2_x0_5 / efficientnet_b0 at small inputs, and
narrow-accumulator models that overflow) cover what lowering really emits.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
import re
import subprocess
import warnings

import numpy as np
import pytest
import torch

import qcompile
from qcompile import ir
from qcompile.errors import QCompileError, UnsupportedOpError
from qcompile.backends import reference
from qcompile.backends.c import memory_plan
from qcompile.backends.c.build import build, run
from qcompile.backends.c.codegen import TEMPLATES, c_identifier, emit, generate
from qcompile.core.requant import MAX_RIGHT_SHIFT, fits_int64, quantize_multiplier, requantize

from lowering_models import OpZoo, trained

TEST_OPT = "-O1"   # tests only check bytes; -O1 halves gcc time on the large weight arrays


def random_codes(t: ir.Tensor, n: int, rng) -> np.ndarray:
    return rng.integers(t.qmin, t.qmax + 1, (n, *t.shape))


def exact_accumulators(graph: ir.Graph) -> ir.Graph:
    """`graph` with every narrow accumulator made exact (acc_bits None)."""
    return ir.Graph(graph.inputs, graph.outputs, graph.tensors,
                    [ir.Op(o.kind, o.name, o.inputs, o.output, dataclasses.replace(o.attrs, acc_bits=None)
                           if isinstance(o.attrs, ir.Accumulator) else o.attrs) for o in graph.ops])


def check_bit_exact(graph: ir.Graph, out_dir, n: int = 3, seed: int = 0, opt: str = TEST_OPT, codes=None,
                    sanitize: bool = False):
    """Emit, build and run `graph` on n random input samples; assert every output byte equals the reference."""
    rng = np.random.default_rng(seed)
    module = emit(graph, out_dir, name="net")
    exe = build(out_dir, opt=opt, sanitize=sanitize)
    if codes is None:
        codes = [random_codes(graph.tensor(name), n, rng) for name in graph.inputs]
    got = run(out_dir, *codes, exe=exe)
    want = reference.run_codes(graph, *codes)
    want = want if isinstance(want, list) else [want]
    for name, g, w in zip(graph.outputs, got, want):
        assert g.shape == w.shape, name
        mismatch = int(np.sum(g.astype(np.int64) != w))
        assert mismatch == 0, f"{name}: {mismatch} of {w.size} output codes differ from the reference"
    return module, got


# ---- the requantization helper, alone ---------------------------------------------------------
def test_c_requantize_helpers_match_python(tmp_path):
    """qc_requantize (64-bit, where fits_int64) and qc_requantize_wide (128-bit, every int64 v) in C ==
    core.requant.requantize on random values, exact ties and every right shift 0..94; both are
    checked against exact rational rounding (half to even) as well."""
    rng = np.random.default_rng(0)
    ms = [quantize_multiplier(float(r)) for r in np.exp(rng.uniform(np.log(1e-27), np.log(3e3), 300))]
    ms += [(1 << 30, 1), (0, 0), ((1 << 31) - 1, 31 - MAX_RIGHT_SHIFT), (1 << 30, 31)]
    rows = []
    for m, s in ms:
        n = 31 - s
        vs = [int(v) >> int(k) for v, k in zip(rng.integers(-(1 << 62), 1 << 62, 8), rng.integers(0, 62, 8))]
        if n > 1 and m % 2 == 1:                     # exact ties v·m = (2k+1)·2^(n-1) need m odd
            k = (1 << (n - 1)) * pow(m, -1, 1 << n) % (1 << n)
            vs += [v for v in (k, k - (1 << n), -k) if abs(v) < 2 ** 63]   # v·m ≡ 2^(n-1) (mod 2^n): a tie
        rows += [(int(v), m, s) for v in vs]
    (tmp_path / "in.txt").write_text("\n".join(f"{v} {m} {s}" for v, m, s in rows) + "\n")
    common = (TEMPLATES / "common.c.j2").read_text()
    common = common[:common.index("{#")]            # the C part, before the reduction macro
    (tmp_path / "t.c").write_text(
        "#include <stdint.h>\n#include <stdio.h>\n" + common +
        "int main(void)\n{\n    long long v, m, s;\n"
        "    while (scanf(\"%lld %lld %lld\", &v, &m, &s) == 3)\n"
        "        printf(\"%lld %lld\\n\", (long long)qc_requantize_wide((int64_t)v, (int32_t)m, (int32_t)s),\n"
        "               (31 - s <= 62 && (v < 0 ? -v : v) < (1LL << 62) / (m ? m : 1))\n"
        "               ? (long long)qc_requantize((int64_t)v, (int32_t)m, (int32_t)s) : 0);\n"
        "    return 0;\n}\n")
    subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsanitize=undefined",
                    "-fno-sanitize-recover=all", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)
    out = subprocess.run([str(tmp_path / "t")], stdin=open(tmp_path / "in.txt"), capture_output=True, text=True,
                         check=True).stdout.split()
    got = np.array([int(v) for v in out], dtype=np.int64).reshape(-1, 2)
    want = np.array([int(requantize(v, m, s)) for v, m, s in rows])
    exact = [min(max(round(Fraction(v * m, 1 << (31 - s))), -2 ** 63), 2 ** 63 - 1) for v, m, s in rows]
    narrow = np.array([fits_int64(abs(v), m, s) for v, m, s in rows])
    ties = sum(1 for v, m, s in rows if 31 - s > 0 and (v * m) % (1 << (31 - s)) == 1 << (30 - s))
    assert ties > 100 and len(got) == len(rows) and narrow.sum() > 300 and (~narrow).sum() > 300
    np.testing.assert_array_equal(want, np.array(exact, dtype=np.int64))
    np.testing.assert_array_equal(got[:, 0], want)
    np.testing.assert_array_equal(got[narrow, 1], want[narrow])


# ---- hand-built graphs -----------------------------------------------------------------------
def _t(name, shape, bits=8, signed=False, zp=0, scale=0.05):
    return ir.Tensor(name, tuple(shape), bits, signed, scale, zp)


def _mults(rng, n, lo, hi):
    pairs = [quantize_multiplier(float(r)) for r in rng.uniform(lo, hi, n)]
    return np.array([m for m, _ in pairs], np.int64), np.array([s for _, s in pairs], np.int64)


CONV_CASES = [  # (kwargs, accumulator)
    (dict(), None),
    (dict(groups=2, cin=4), None),
    (dict(stride=2, pad=0), None),
    (dict(dil=2, pad=2), None),
    (dict(groups=6, cin=6, cout=6), None),                          # depthwise
    (dict(), (16, 8, "saturate")),
    (dict(groups=6, cin=6, cout=6), (12, 4, "saturate")),           # depthwise, tile smaller than the kernel
    (dict(stride=2), (12, 5, "saturate")),
    (dict(groups=2, cin=4, positive=True), (17, None, "saturate")),  # one tile
    (dict(wmax=3), (11, 16, "saturate")),                           # small weights: 16-bit partial sums
    (dict(), (14, 32, "wrap")),
    (dict(groups=6, cin=6, cout=6), (10, 4, "wrap")),
    (dict(dil=2, pad=2, positive=True), (18, 7, "wrap")),           # exact int32 lanes, then one wrap
]


def conv_zoo_graph(seed: int = 0) -> ir.Graph:
    """One input, one conv2d per CONV_CASES entry, each its own graph output."""
    rng = np.random.default_rng(seed)
    x = _t("x", (6, 9, 7), zp=17)
    tensors, ops, outputs = {"x": x}, [], []
    for i, (kw, acc) in enumerate(CONV_CASES):
        cin, cout, g = kw.get("cin", 6), kw.get("cout", 8), kw.get("groups", 1)
        st, pad, dil, k = kw.get("stride", 1), kw.get("pad", 1), kw.get("dil", 1), 3
        oh = (9 + 2 * pad - dil * (k - 1) - 1) // st + 1
        ow = (7 + 2 * pad - dil * (k - 1) - 1) // st + 1
        src = "x"
        if cin != 6:
            src = f"s{i}"
            tensors[src] = _t(src, (cin, 9, 7), zp=17)
            ops.append(ir.Op("slice", f"slice.{i}", ["x"], src, ir.Slice(axis=0, start=0, stop=cin)))
        y = _t(f"y{i}", (cout, oh, ow), signed=i % 2 == 1, zp=0 if i % 2 else 5)
        m, s = _mults(rng, cout, 2e-4, 3e-3)
        a, t, o = acc or (None, None, "saturate")
        ops.append(ir.Op("conv2d", f"layer{i}.conv", [src], y.name, ir.Conv2d(
            weight=rng.integers(0 if kw.get("positive") else -kw.get("wmax", 127), kw.get("wmax", 127) + 1,
                                (cout, cin // g, k, k)).astype(np.int8),
            bias=rng.integers(-3000, 3000, cout).astype(np.int32), stride=(st, st), padding=(pad, pad),
            dilation=(dil, dil), groups=g, multiplier=m, shift=s, acc_bits=a, tile=t, overflow=o,
            act_min=y.qmin, act_max=y.qmax)))
        tensors[y.name] = y
        outputs.append(y.name)
    return ir.Graph(["x"], outputs, tensors, ops)


PAIRWISE_CASES = [  # (kwargs, accumulator): "pairwise" layers; zp = 0 inputs (the grid's lowest code)
    (dict(), (16, 2, "pairwise")),                                  # blocked GEMM (vpmaddubsw + vpaddsw on AVX2)
    (dict(cin=3, stride=2), (16, 2, "pairwise")),                   # odd K: the last pair is one product
    (dict(cout=13), (16, 2, "pairwise")),                           # a remainder of channels past 8
    (dict(big_bias=True), (16, 2, "pairwise")),                     # bias past int16: tile_loop kernels
    (dict(), (12, 2, "pairwise")),                                  # not 16 bits: tile_loop kernels
    (dict(groups=6, cin=6, cout=6), (16, 2, "pairwise")),           # depthwise
    (dict(wmax=64), (16, 2, "pairwise")),                           # no pair can saturate (2·64·255 < 2^15)
    (dict(), None),                                                 # exact, for the VNNI kernel at zp = 0
    (dict(centered=True), (16, 2, "pairwise")),                     # x − zx signed: the int16 kernel
    (dict(relu=True), (16, 2, "pairwise")),                         # zp 100 but codes >= 100 (a fused ReLU): uint8
    (dict(zp=128), (16, 2, "pairwise")),                            # x − zx in -128..127: int8 (vpabsb, vpsignb)
    (dict(zp=127, stride=2), (16, 2, "pairwise")),                  # x − zx in -127..128: int8, both negated
    (dict(zp=128, w128=True), (16, 2, "pairwise")),                 # a weight of -128 (no int8 negation): int16
]


def pairwise_graph(seed: int = 0) -> ir.Graph:
    """One uint8 input with zero point 0, one conv2d per PAIRWISE_CASES entry."""
    rng = np.random.default_rng(seed)
    x = _t("x", (6, 9, 7), zp=0)
    tensors, ops, outputs = {"x": x}, [], []
    for i, (kw, acc) in enumerate(PAIRWISE_CASES):
        cin, cout, g, st, wmax = kw.get("cin", 6), kw.get("cout", 8), kw.get("groups", 1), kw.get("stride", 1), kw.get("wmax", 127)
        src = "x"
        if cin != 6:
            src = f"s{i}"
            tensors[src] = _t(src, (cin, 9, 7), zp=0)
            ops.append(ir.Op("slice", f"slice.{i}", ["x"], src, ir.Slice(axis=0, start=0, stop=cin)))
        if kw.get("centered") or kw.get("relu") or "zp" in kw:      # x requantized onto a grid with zero point 100 (or zp)
            src = f"r{i}"
            tensors[src] = _t(src, (cin, 9, 7), zp=kw.get("zp", 100))
            ops.append(ir.Op("requantize", f"rq.{i}", ["x"], src, ir.Requantize(
                multiplier=1 << 30, shift=1, act_min=100 if kw.get("relu") else 0, act_max=255)))
        oh, ow = (9 + 2 - 2 - 1) // st + 1, (7 + 2 - 2 - 1) // st + 1
        y = _t(f"y{i}", (cout, oh, ow), signed=i % 2 == 1, zp=0 if i % 2 else 5)
        m, s = _mults(rng, cout, 2e-4, 3e-3)
        a, t, o = acc or (None, None, "saturate")
        bias = rng.integers(-3000, 3000, cout) + (40000 if kw.get("big_bias") else 0)
        weight = rng.integers(-wmax, wmax + 1, (cout, cin // g, 3, 3))
        weight[0, 0, 0, 0] = -128 if kw.get("w128") else weight[0, 0, 0, 0]
        ops.append(ir.Op("conv2d", f"pair{i}.conv", [src], y.name, ir.Conv2d(
            weight=weight.astype(np.int8), bias=bias.astype(np.int32),
            stride=(st, st), padding=(1, 1), dilation=(1, 1), groups=g, multiplier=m, shift=s, acc_bits=a, tile=t,
            overflow=o, act_min=y.qmin, act_max=y.qmax)))
        tensors[y.name] = y
        outputs.append(y.name)
    return ir.Graph(["x"], outputs, tensors, ops)


def wide_graph(seed: int = 0) -> ir.Graph:
    """16-bit signed input, K = 1152: static bounds past int32 select 64-bit exact lanes, 64-bit
    saturating partials and unsigned modular lanes (16 and 32 bits)."""
    rng = np.random.default_rng(seed)
    x = _t("x", (128, 4, 4), bits=16, signed=True)
    tensors, ops, outputs = {"x": x}, [], []
    for i, (a, t, o) in enumerate([(None, None, "saturate"), (31, None, "saturate"), (30, 100, "saturate"),
                                   (16, 9, "wrap"), (30, 9, "wrap")]):
        y = _t(f"y{i}", (8, 4, 4), signed=True)
        m, s = _mults(rng, 8, 1e-7, 1e-6)
        ops.append(ir.Op("conv2d", f"wide{i}", ["x"], y.name, ir.Conv2d(
            weight=rng.integers(0, 128, (8, 128, 3, 3)).astype(np.int8), bias=rng.integers(-3000, 3000, 8).astype(np.int32),
            stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, multiplier=m, shift=s, acc_bits=a, tile=t,
            overflow=o, act_min=y.qmin, act_max=y.qmax)))
        tensors[y.name] = y
        outputs.append(y.name)
    return ir.Graph(["x"], outputs, tensors, ops)


def matmul_graph(seed: int = 0) -> ir.Graph:
    """Three graph inputs; matmul exact and batched (a reshaped, @ c), saturating and wrapping."""
    rng = np.random.default_rng(seed)
    tensors = {"a": _t("a", (4, 24), zp=7), "b": _t("b", (24, 5), signed=True), "c": _t("c", (2, 24, 5), zp=100),
               "a3": _t("a3", (2, 2, 24), zp=7)}
    ops = [ir.Op("reshape", "view", ["a"], "a3", ir.Reshape(shape=(2, 2, 24)))]
    for i, (srcs, shape, acc) in enumerate([(["a3", "c"], (2, 2, 5), (None, None, "saturate")),
                                            (["a", "b"], (4, 5), (12, 5, "saturate")),
                                            (["a", "b"], (4, 5), (11, 8, "wrap"))]):
        y = _t(f"y{i}", shape, signed=True)
        m, s = quantize_multiplier(float(rng.uniform(1e-4, 1e-3)))
        ops.append(ir.Op("matmul", f"bmm.{i}", srcs, y.name, ir.Matmul(
            multiplier=m, shift=s, acc_bits=acc[0], tile=acc[1], overflow=acc[2], act_min=y.qmin, act_max=y.qmax)))
        tensors[y.name] = y
    return ir.Graph(["a", "b", "c"], ["y0", "y1", "y2"], tensors, ops)


def op_zoo_graph(seed: int = 0) -> ir.Graph:
    """Every non-conv op kind, shaped like a small network: conv, max-pool with padding, per-channel
    and plain LUTs, 16-bit intermediates, requantize, depthwise conv, add with a skip, global
    average pool, broadcast multiply, channel shuffle (reshape / transpose / reshape), slices,
    concat of three grids, average pool with padding, flatten (reshape alias) and linear."""
    rng = np.random.default_rng(seed)
    ts, ops = {}, []

    def t(name, shape, **kw):
        ts[name] = _t(name, shape, **kw)
        return name

    def op(kind, name, inputs, out, **attrs):
        y = ts[out]
        if issubclass(ir.SPEC[kind], ir.Clamp):
            attrs.setdefault("act_min", y.qmin)
            attrs.setdefault("act_max", y.qmax)
        ops.append(ir.Op(kind, name, inputs, out, ir.SPEC[kind](**attrs)))

    def qm(r):
        return dict(zip(("multiplier", "shift"), quantize_multiplier(r)))

    t("x", (3, 12, 12), zp=9)
    t("c1", (8, 12, 12), zp=11)
    m, s = _mults(rng, 8, 1e-3, 5e-3)
    op("conv2d", "conv1", ["x"], "c1", weight=rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8),
       bias=rng.integers(-500, 500, 8).astype(np.int32), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
       multiplier=m, shift=s, acc_bits=None, tile=None, overflow="saturate", act_min=11)
    t("p1", (8, 6, 6), zp=11)
    op("max_pool2d", "pool", ["c1"], "p1", kernel=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=False)
    t("l1", (8, 6, 6), bits=16, signed=True)
    op("lut", "act.silu", ["p1"], "l1", table=rng.integers(-30000, 30000, 256))
    t("q1", (8, 6, 6), zp=3)
    op("requantize", "rq", ["l1"], "q1", **qm(0.003))
    t("bn", (8, 6, 6), signed=True)
    op("lut", "bn0", ["q1"], "bn", table=rng.integers(-128, 128, 256))
    t("d1", (8, 6, 6), zp=4)
    m, s = _mults(rng, 8, 1e-3, 1e-2)
    op("conv2d", "dw", ["bn"], "d1", weight=rng.integers(-127, 128, (8, 1, 3, 3)).astype(np.int8),
       bias=rng.integers(-500, 500, 8).astype(np.int32), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
       groups=8, multiplier=m, shift=s, acc_bits=None, tile=None, overflow="saturate")
    t("a1", (8, 6, 6), zp=30)
    ma, sa = quantize_multiplier(0.4)
    mb, sb = quantize_multiplier(0.5)
    op("add", "add", ["d1", "p1"], "a1", left_shift=20, multiplier_a=ma, shift_a=sa, multiplier_b=mb,
       shift_b=sb, **qm(0.9 / 2 ** 20))
    t("g", (8, 1, 1), zp=2)
    op("avg_pool2d", "gap", ["a1"], "g", kernel=(6, 6), stride=(6, 6), padding=(0, 0), global_pool=True,
       **qm(1 / 36))
    t("mu", (8, 6, 6), bits=16, signed=True)
    op("mul", "se.mul", ["a1", "g"], "mu", **qm(0.01))                                    # broadcast
    t("mq", (8, 6, 6), zp=7)
    op("requantize", "rq2", ["mu"], "mq", **qm(0.02))
    t("r1", (2, 4, 6, 6), zp=7)
    op("reshape", "view", ["mq"], "r1", shape=(2, 4, 6, 6))
    t("tr", (4, 2, 6, 6), zp=7)
    op("transpose", "transpose", ["r1"], "tr", perm=(1, 0, 2, 3))
    t("r2", (8, 6, 6), zp=7)
    op("reshape", "view_1", ["tr"], "r2", shape=(8, 6, 6))
    t("s1", (3, 6, 6), zp=7)
    op("slice", "chunk.0", ["r2"], "s1", axis=0, start=0, stop=3)
    t("s2", (5, 6, 6), zp=7)
    op("slice", "chunk.1", ["r2"], "s2", axis=0, start=3, stop=8)
    t("cat", (16, 6, 6), zp=12)
    pairs = [quantize_multiplier(r) for r in (0.7, 1.3, 1.0)]
    op("concat", "cat", ["s2", "s1", "a1"], "cat", axis=0, multipliers=[m for m, _ in pairs],
       shifts=[s for _, s in pairs])
    t("ap", (16, 3, 3), zp=12)
    op("avg_pool2d", "avgpool", ["cat"], "ap", kernel=(3, 3), stride=(2, 2), padding=(1, 1), global_pool=False,
       **qm(1 / 9))
    t("fl", (144,), zp=12)
    op("reshape", "flatten", ["ap"], "fl", shape=(144,))
    t("out", (10,), signed=True)
    m, s = _mults(rng, 10, 1e-4, 1e-3)
    op("linear", "fc", ["fl"], "out", weight=rng.integers(-127, 128, (10, 144)).astype(np.int8),
       bias=rng.integers(-5000, 5000, 10).astype(np.int32), multiplier=m, shift=s, acc_bits=None, tile=None,
       overflow="saturate")
    t("gflat", (8,), zp=2)
    op("reshape", "squeeze", ["g"], "gflat", shape=(8,))                                 # a reshape that leaves
    return ir.Graph(["x"], ["out", "mq", "gflat"], ts, ops)


def test_conv_accumulator_modes_bit_exact(tmp_path):
    """conv2d: groups, depthwise, stride, dilation; exact, saturating and wrapping narrow accumulators."""
    graph = conv_zoo_graph()
    _, got = check_bit_exact(graph, tmp_path, n=4)
    # the narrow cases really overflow: an exact accumulator gives other codes
    exact = exact_accumulators(graph)
    x = random_codes(graph.tensor("x"), 4, np.random.default_rng(0))
    free = reference.run_codes(exact, x)
    narrow = [i for i, (_, acc) in enumerate(CONV_CASES) if acc is not None]
    assert all(not np.array_equal(got[i], free[i]) for i in narrow)
    assert "int16_t s0" in (tmp_path / "net.c").read_text()


def test_wide_accumulator_lanes_bit_exact(tmp_path):
    graph = wide_graph()
    rng = np.random.default_rng(3)
    x = np.where(rng.random((3, 128, 4, 4)) < 0.5, 32767, rng.integers(-32768, 32768, (3, 128, 4, 4)))
    check_bit_exact(graph, tmp_path, codes=[x], sanitize=True)
    src = (tmp_path / "net.c").read_text()
    assert "int64_t s0" in src and "uint16_t s0" in src and "uint32_t s0" in src


def test_matmul_two_inputs_bit_exact(tmp_path):
    graph = matmul_graph()
    rng = np.random.default_rng(4)
    codes = [rng.integers(0, 256, (3, 4, 24)), rng.integers(-128, 128, (3, 24, 5)), rng.integers(0, 256, (3, 2, 24, 5))]
    _, got = check_bit_exact(graph, tmp_path, codes=codes, sanitize=True)
    header = (tmp_path / "net.h").read_text()
    assert "int net_run(const uint8_t *input0, const int8_t *input1, const uint8_t *input2, int8_t *output0" in header
    exact = exact_accumulators(graph)
    free = reference.run_codes(exact, *codes)
    assert not np.array_equal(got[1], free[1]) and not np.array_equal(got[2], free[2])   # they overflow


def test_every_op_kind_bit_exact_and_arena_shared(tmp_path):
    graph = op_zoo_graph()
    module, _ = check_bit_exact(graph, tmp_path, n=4, opt="-O2")
    assert {op.kind for op in graph.ops} == {"conv2d", "max_pool2d", "lut", "requantize", "add", "avg_pool2d", "mul",
                                             "reshape", "transpose", "slice", "concat", "linear"}
    assert 0 < module.arena_bytes < module.naive_bytes
    src = (tmp_path / "net.c").read_text()
    assert "net_flatten(" not in src and "net_squeeze(" in src   # a reshape aliases its input unless it leaves


def test_generated_code_is_pure_integer_c99(tmp_path):
    emit(op_zoo_graph(), tmp_path, name="net")
    for f in ("net.c", "net.h"):
        text = (tmp_path / f).read_text()
        code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)                  # comments may print scales
        for word in ("float", "double", "math.h", "malloc", "calloc", "free(", "stdio"):
            assert word not in code, (f, word)
    build(tmp_path, opt="-O2")           # the Makefile's flags: -std=c99 -Wall -Wextra -Werror -pedantic
    assert "-std=c99" in (tmp_path / "Makefile").read_text() and "-Werror -pedantic" in (tmp_path / "Makefile").read_text()


def _cpu_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


GEMM_BUILDS = {   # the kernel paths of gemm.c.j2 and the flags that select them
    "portable": "-O1 -DQC_PORTABLE",
    "avx2": "-O1 -march=haswell",                   # pairwise: vpmaddubsw + vpaddsw; exact: vpmaddwd, int16 weights
    "avx512-vnni": "-O1 -march=haswell -mavx512f -mavx512bw -mavx512vnni",   # exact: vpdpbusd
}


@pytest.mark.parametrize("path", list(GEMM_BUILDS))
def test_gemm_kernel_paths_bit_exact_and_sanitizer_clean(path, tmp_path):
    """Every intrinsic path of the blocked-GEMM conv (and the C99 path it replaces) equals the reference,
    under AddressSanitizer + UndefinedBehaviorSanitizer too: pairwise layers that really saturate, an
    odd reduction, channel remainders, the tile_loop fallbacks, and exact layers with zero points 0 and
    17 (the bias absorbs the offset), strides and groups, and wrapping layers whose exact sum fits int32
    (the exact kernels, the sum wrapped once before the requantization)."""
    if path != "portable" and not _cpu_has({"avx2": "avx2", "avx512-vnni": "avx512_vnni"}[path]):
        pytest.skip(f"this CPU has no {path}: its kernels cannot run here")
    pairs = pairwise_graph(seed=3)
    free = reference.run_codes(exact_accumulators(pairs), random_codes(pairs.tensor("x"), 3, np.random.default_rng(3)))
    for name, graph in (("pairs", pairs), ("conv", conv_zoo_graph(seed=3))):
        module, got = check_bit_exact(graph, tmp_path / name, n=3, seed=3, opt=GEMM_BUILDS[path])
        source = (tmp_path / name / "net.c").read_text()
        assert "qc_gemm_exact(" in source
        if name == "conv":
            assert source.count("wrapped once to") == 2
        if name == "pairs":
            assert source.count("qc_gemm_pairwise(col + ") == 5 and source.count("qc_gemm_pairwise_i16(col + ") == 2
            assert source.count("qc_gemm_pairwise_s8(col + ") == 2 and source.count("= (int8_t)(-((int)s[i] - (") == 1
        if name == "pairs":               # the pairwise layers saturate: an exact accumulator differs
            assert all(not np.array_equal(got[i], free[i]) for i, (kw, acc) in enumerate(PAIRWISE_CASES)
                       if acc is not None and acc[0] == 16 and "wmax" not in kw)
        check_bit_exact(graph, tmp_path / f"{name}_asan", n=2, seed=4, opt=GEMM_BUILDS[path], sanitize=True)


DEPTHWISE_CASES = [  # (kernel, stride, padding, dilation, x bits, y bits, accumulator)
    (3, 1, 1, 1, 8, 8, None),                 # 16-pixel steps, a tail of 5
    (3, 2, 1, 1, 8, 8, None),                 # stride 2: vpdpwssd reads every other value
    (3, 1, 2, 2, 8, 8, None),                 # dilation
    (5, 2, 2, 1, 8, 8, None),
    (3, 2, 0, 1, 8, 16, None),                # 16-bit codes out: the scalar requantization
    (3, 1, 1, 1, 16, 8, None),                # 16-bit input: int32 operands, the C loop
    (3, 3, 1, 1, 8, 8, None),                 # stride 3: the C loop
    (3, 1, 1, 1, 8, 8, (12, 4, "saturate")),  # a narrow accumulator: the tile loop
]


def depthwise_graph(seed: int = 0) -> ir.Graph:
    """One depthwise conv2d per DEPTHWISE_CASES entry on 5 channels of 11 x 37 (zero point 17)."""
    rng = np.random.default_rng(seed)
    tensors, ops, outputs = {}, [], []
    for i, (k, st, pad, dil, xb, yb, acc) in enumerate(DEPTHWISE_CASES):
        x = tensors.setdefault(f"x{xb}", _t(f"x{xb}", (5, 11, 37), bits=xb, zp=17))
        oh, ow = ((n + 2 * pad - dil * (k - 1) - 1) // st + 1 for n in (11, 37))
        y = _t(f"y{i}", (5, oh, ow), bits=yb, signed=i % 2 == 1, zp=0 if i % 2 else 5)
        m, s = _mults(rng, 5, 2e-4, 3e-3)
        a, t, o = acc or (None, None, "saturate")
        ops.append(ir.Op("conv2d", f"dw{i}", [x.name], y.name, ir.Conv2d(
            weight=rng.integers(-127, 128, (5, 1, k, k)).astype(np.int8), bias=rng.integers(-3000, 3000, 5).astype(np.int32),
            stride=(st, st), padding=(pad, pad), dilation=(dil, dil), groups=5, multiplier=m, shift=s, acc_bits=a, tile=t,
            overflow=o, act_min=y.qmin, act_max=y.qmax)))
        tensors[y.name] = y
        outputs.append(y.name)
    return ir.Graph(sorted(n for n in tensors if n.startswith("x")), outputs, tensors, ops)


@pytest.mark.parametrize("path", list(GEMM_BUILDS))
def test_depthwise_paths_bit_exact_and_sanitizer_clean(path, tmp_path):
    """The depthwise conv's 16-pixel steps (AVX-512 vpdpwssd, AVX2 vpmaddwd, C99; byte codes requantized 16
    at once by both intrinsic paths), strides 1-3, dilation, 5x5, tails, 16-bit codes in and out, and the
    tile loop of a narrow accumulator, equal the reference,
    under AddressSanitizer + UndefinedBehaviorSanitizer too (the steps read past the row end into zeros)."""
    if path != "portable" and not _cpu_has({"avx2": "avx2", "avx512-vnni": "avx512_vnni"}[path]):
        pytest.skip(f"this CPU has no {path}: its kernels cannot run here")
    graph = depthwise_graph(seed=7)
    check_bit_exact(graph, tmp_path / "dw", n=3, seed=7, opt=GEMM_BUILDS[path])
    source = (tmp_path / "dw" / "net.c").read_text()
    assert source.count("_mm512_dpwssd_epi32(a, _mm512_loadu_si512") == 9 + 9 + 9 + 25 + 9   # cases 0-4: strides 1, 2
    assert source.count("int32_t *xp)") == 3            # stride 1: int32 operands (and the 16-bit input, the C loop)
    check_bit_exact(graph, tmp_path / "dw_asan", n=2, seed=8, opt=GEMM_BUILDS[path], sanitize=True)


def wide_conv_graph(seed: int = 0) -> ir.Graph:
    """Exact convs on rows of 40 columns (9 channels: two full groups of 4 and one of 1), unsigned input
    with zero point 17 and signed input: the VNNI plane fill's 16-pixel steps, tails and padding."""
    rng = np.random.default_rng(seed)
    tensors = {"x": _t("x", (9, 5, 40), zp=17), "xs": _t("xs", (9, 5, 40), signed=True, zp=-3)}
    ops, outputs = [], []
    for i, (src, k, pad, dil) in enumerate([("x", 3, 1, 1), ("x", 1, 0, 1), ("x", 3, 2, 2), ("xs", 3, 1, 1)]):
        y = _t(f"y{i}", (8, 5, 40), zp=5)
        m, s = _mults(rng, 8, 2e-4, 3e-3)
        ops.append(ir.Op("conv2d", f"wide{i}", [src], y.name, ir.Conv2d(
            weight=rng.integers(-127, 128, (8, 9, k, k)).astype(np.int8), bias=rng.integers(-3000, 3000, 8).astype(np.int32),
            stride=(1, 1), padding=(pad, pad), dilation=(dil, dil), groups=1, multiplier=m, shift=s, acc_bits=None,
            tile=None, overflow="saturate", act_min=y.qmin, act_max=y.qmax)))
        tensors[y.name] = y
        outputs.append(y.name)
    return ir.Graph(["x", "xs"], outputs, tensors, ops)


@pytest.mark.parametrize("path", list(GEMM_BUILDS))
def test_exact_conv_on_wide_rows_bit_exact_and_sanitizer_clean(path, tmp_path):
    """The exact blocked conv on rows wider than 16 pixels (the VNNI plane fill lays stride-1 rows of 4
    channels 16 pixels at a time; a channel group past the input and the padding the old way) equals
    the reference on every build, under AddressSanitizer + UndefinedBehaviorSanitizer too."""
    if path != "portable" and not _cpu_has({"avx2": "avx2", "avx512-vnni": "avx512_vnni"}[path]):
        pytest.skip(f"this CPU has no {path}: its kernels cannot run here")
    graph = wide_conv_graph(seed=9)
    check_bit_exact(graph, tmp_path / "wide", n=3, seed=9, opt=GEMM_BUILDS[path])
    assert (tmp_path / "wide" / "net.c").read_text().count("_mm_unpacklo_epi16(p01l, p23l)") == 4
    check_bit_exact(graph, tmp_path / "wide_asan", n=2, seed=10, opt=GEMM_BUILDS[path], sanitize=True)


AMX_CASES = [  # (input, cin, groups, cout, kernel, stride, padding, dilation): exact convs on 4r channels a tile
    ("x", 64, 1, 40, (3, 3), 1, 1, 1),      # r = 16; 40 rows: a panel's second 32-row step mostly padding
    ("x", 64, 1, 48, (1, 1), 2, 0, 1),      # stride 2: four phase planes
    ("s", 80, 2, 40, (3, 3), 2, 1, 1),      # groups of 40 channels (r = 10), 20 rows each; signed input
    ("u", 16, 1, 33, (3, 3), 1, 2, 2),      # r = 4, dilation; multipliers past 1 (qc_requantize16's int64 path)
    ("u12", 12, 1, 8, (3, 3), 1, 1, 1),     # r = 3: the VNNI kernel on its own, weights in groups of 3
    ("x24", 24, 1, 16, (3, 1), 1, (1, 0), 1),   # r = 6, a 3 x 1 kernel; multiplier 2^-10: exact ties
    ("w", 192, 1, 70, (3, 3), 1, 1, 1),     # three tiles of 16 groups per tap; panels of 32, 32 and 6 rows
    ("u12", 12, 1, 5, (1, 1), 1, 0, 1),     # r = 3, 5 rows of 12 weights: 60, not whole steps of AVX2's widening
]


def amx_conv_graph(seed: int = 0) -> ir.Graph:
    """One exact conv2d per AMX_CASES entry: inputs of 64 (zero point 17), 80 (signed), 16 and 192 channels;
    12 and 24 channels sliced off."""
    rng = np.random.default_rng(seed)
    tensors = {"x": _t("x", (64, 10, 21), zp=17), "s": _t("s", (80, 9, 13), signed=True, zp=-3),
               "u": _t("u", (16, 8, 19)), "w": _t("w", (192, 6, 7), zp=9)}
    ops = [ir.Op("slice", "slice.u12", ["u"], "u12", ir.Slice(axis=0, start=0, stop=12)),
           ir.Op("slice", "slice.x24", ["x"], "x24", ir.Slice(axis=0, start=0, stop=24))]
    tensors["u12"], tensors["x24"] = _t("u12", (12, 8, 19)), _t("x24", (24, 10, 21), zp=17)
    outputs = []
    for i, (src, cin, g, cout, (kh, kw), st, pad, dil) in enumerate(AMX_CASES):
        (ph, pw), (_, h, w) = (pad if isinstance(pad, tuple) else (pad, pad)), tensors[src].shape
        oh, ow = (h + 2 * ph - dil * (kh - 1) - 1) // st + 1, (w + 2 * pw - dil * (kw - 1) - 1) // st + 1
        y = _t(f"y{i}", (cout, oh, ow), signed=i % 2 == 1, zp=0 if i % 2 else 5)
        m, s = _mults(rng, cout, *{3: (1.0, 3.0), 5: (2.0 ** -10,) * 2}.get(i, (1e-5, 2e-4)))
        ops.append(ir.Op("conv2d", f"amx{i}.conv", [src], y.name, ir.Conv2d(
            weight=rng.integers(-127, 128, (cout, cin // g, kh, kw)).astype(np.int8),
            bias=rng.integers(-3000, 3000, cout).astype(np.int32), stride=(st, st), padding=(ph, pw),
            dilation=(dil, dil), groups=g, multiplier=m, shift=s, acc_bits=None, tile=None, overflow="saturate",
            act_min=y.qmin, act_max=y.qmax)))
        tensors[y.name] = y
        outputs.append(y.name)
    return ir.Graph(["x", "s", "u", "w"], outputs, tensors, ops)


def _amx_granted() -> bool:
    """An AMX-INT8 CPU whose Linux grants tile data to a process that asks (arch_prctl
    ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, as the generated code asks)."""
    if not _cpu_has("amx_int8"):
        return False
    import ctypes
    return ctypes.CDLL(None).syscall(158, 0x1023, 18) == 0     # SYS_arch_prctl on x86-64 Linux


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512-vnni", "amx"])
def test_amx_conv_paths_bit_exact_and_sanitizer_clean(path, tmp_path):
    """The exact conv whose weight rows run in groups of r = 3..16 channel quads (the AMX tiles' order):
    AMX tdpbsud (panels of 32 rows, C tiles stored into the VNNI kernel's layout), the VNNI kernel, the
    AVX2 kernel (panels of 5 rows and every tail of 1-4) and the C99 path on the same rows equal the
    reference, under AddressSanitizer + UndefinedBehaviorSanitizer too (which cannot see tile loads: the
    input tiles read the bytes the VNNI build's checked loads read); qc_requantize16's and qc_requantize8's
    fast paths on exact ties (a multiplier of 2^-10) and their int64 / per-lane paths (multipliers past 1)."""
    flags = {"portable": GEMM_BUILDS["portable"], "avx2": GEMM_BUILDS["avx2"], "avx512-vnni": GEMM_BUILDS["avx512-vnni"],
             "amx": GEMM_BUILDS["avx512-vnni"] + " -mamx-tile -mamx-int8"}[path]
    if path in ("avx2", "avx512-vnni") and not _cpu_has(path.replace("-", "_")):
        pytest.skip(f"this CPU has no {path}: its kernels cannot run here")
    if path == "amx" and not _amx_granted():
        pytest.skip("no AMX-INT8 here (or Linux refuses its tiles): its kernels cannot run here")
    graph = amx_conv_graph(seed=11)
    check_bit_exact(graph, tmp_path / "amx", n=3, seed=11, opt=flags)
    source = (tmp_path / "amx" / "net.c").read_text()
    assert source.count("qc_gemm_amx(xp") == 6 and source.count("qc_amx_begin(3)") == 0
    assert [int(r) for r in re.findall(r"qc_amx_begin\((\d+)\)", source)] == [16, 16, 10, 4, 6, 16]
    check_bit_exact(graph, tmp_path / "amx_asan", n=2, seed=12, opt=flags, sanitize=True)


ADD_CASES = [  # (a, b, output, output signed, output zero point, left shift, real multipliers (a, b, sum))
    ("u", "s", (5, 7, 9), False, 30, 20, (0.4, 0.5, 0.9)),     # 315 elements: 19 steps of 16 and a tail of 11
    ("s", "u", (5, 7, 9), True, 0, 0, (0.7, 0.2, 2.5)),        # signed out; a sum multiplier past 1: int64 lanes
    ("u", "t", (5, 7, 9), False, 3, 20, (0.4, 0.5, 0.9)),      # a 16-bit input: no table, the loops
    ("u", "c", (5, 7, 9), False, 3, 20, (0.4, 0.5, 0.9)),      # a broadcast (5, 1, 1) input: the loops
    ("s", "s", (5, 7, 9), False, 9, 4, (2 ** -5, 2 ** -6, 2 ** -1)),   # power-of-two multipliers: exact ties
]


def add_graph(seed: int = 0) -> ir.Graph:
    """One add per ADD_CASES entry on uint8 (zero point 17), int8, int16 and broadcast inputs."""
    tensors = {"u": _t("u", (5, 7, 9), zp=17), "s": _t("s", (5, 7, 9), signed=True, zp=-3),
               "t": _t("t", (5, 7, 9), bits=16, signed=True), "c": _t("c", (5, 1, 1), zp=200)}
    ops, outputs = [], []
    for i, (a, b, shape, signed, zp, left, (ra, rb, rs)) in enumerate(ADD_CASES):
        y = tensors.setdefault(f"y{i}", _t(f"y{i}", shape, signed=signed, zp=zp))
        (ma, sa), (mb, sb), (m, s) = (quantize_multiplier(r) for r in (ra, rb, rs / 2 ** left))
        ops.append(ir.Op("add", f"add{i}", [a, b], y.name, ir.Add(
            left_shift=left, multiplier_a=ma, shift_a=sa, multiplier_b=mb, shift_b=sb, multiplier=m, shift=s,
            act_min=y.qmin, act_max=y.qmax)))
        outputs.append(y.name)
    return ir.Graph(["u", "s", "t", "c"], outputs, tensors, ops)


@pytest.mark.parametrize("path", ["portable", "avx512-vnni"])
def test_add_paths_bit_exact_and_sanitizer_clean(path, tmp_path):
    """The add of two 8-bit tensors of the output's shape (AVX-512: both tables gathered 16 at a time, the
    sums requantized at once, a scalar tail) and the loops it leaves to others (a 16-bit input, a
    broadcast) equal the reference, under AddressSanitizer + UndefinedBehaviorSanitizer too."""
    if path != "portable" and not _cpu_has("avx512_vnni"):
        pytest.skip("this CPU has no AVX-512 VNNI: its kernels cannot run here")
    graph = add_graph(seed=13)
    check_bit_exact(graph, tmp_path / "add", n=3, seed=13, opt=GEMM_BUILDS[path])
    assert (tmp_path / "add" / "net.c").read_text().count("_mm512_i32gather_epi32(ia, ra_of, 4)") == 3
    check_bit_exact(graph, tmp_path / "add_asan", n=2, seed=14, opt=GEMM_BUILDS[path], sanitize=True)


POOL_CASES = [  # (input, kernel, stride, padding, ceil_mode)
    ("u", 3, 2, 1, False), ("u", 2, 2, 0, False), ("s", 3, 1, 1, False), ("s", 3, 2, 1, True), ("u", 3, 2, 0, True),
    ("t", 3, 2, 1, False),
]


def max_pool_graph() -> ir.Graph:
    """One max_pool2d per POOL_CASES entry on 3 channels of 9 x 11: uint8 (zero point 17), int8 and int16 codes."""
    tensors = {"u": _t("u", (3, 9, 11), zp=17), "s": _t("s", (3, 9, 11), signed=True, zp=-3),
               "t": _t("t", (3, 9, 11), bits=16, signed=True)}
    ops, outputs = [], []
    for i, (src, k, st, pad, ceil) in enumerate(POOL_CASES):
        x = tensors[src]
        oh, ow = (torch.nn.functional.max_pool2d(torch.zeros(1, 1, 9, 11), k, st, pad, ceil_mode=ceil).shape[2:])
        y = tensors.setdefault(f"y{i}", _t(f"y{i}", (3, oh, ow), bits=x.bits, signed=x.signed, zp=x.zero_point))
        ops.append(ir.Op("max_pool2d", f"pool{i}", [src], y.name, ir.MaxPool2d(
            kernel=(k, k), stride=(st, st), padding=(pad, pad), ceil_mode=ceil)))
        outputs.append(y.name)
    return ir.Graph(["u", "s", "t"], outputs, tensors, ops)


def test_max_pool_rows_bit_exact_and_sanitizer_clean(tmp_path):
    """max_pool2d through a padded row of each output row's window maximum: padding, strides 1-2, ceil
    mode (windows past the input), uint8 / int8 / int16 codes equal the reference, under ASan + UBSan
    too; padding past half the kernel (a window of padding only) is refused by name."""
    graph = max_pool_graph()
    check_bit_exact(graph, tmp_path / "pool", n=3, seed=15)
    check_bit_exact(graph, tmp_path / "pool_asan", n=2, seed=16, sanitize=True)
    bad = dataclasses.replace(graph.ops[0], attrs=dataclasses.replace(graph.ops[0].attrs, kernel=(1, 1), padding=(1, 1)))
    with pytest.raises(QCompileError, match="pool0.*more than half the kernel"):
        generate(ir.Graph(["u", "s", "t"], ["y0"], graph.tensors, [bad]), "net")


def lut_graph(seed: int = 0) -> ir.Graph:
    """Byte lookups from unsigned, signed and 7-bit signed codes (tables of 256 and 128 entries), over
    231 codes: three 64-byte steps and a tail."""
    rng = np.random.default_rng(seed)
    ts = {n: _t(n, (3, 7, 11), **kw) for n, kw in (("x", dict(zp=5)), ("s", dict(signed=True)), ("u", dict(zp=3)),
                                                     ("h", dict(bits=7, signed=True)), ("v", dict(zp=200)))}
    ops = []
    for name, src, out in (("lut.us", "x", "s"), ("lut.su", "s", "u"), ("lut.sh", "s", "h"), ("lut.hu", "h", "v")):
        x, y = ts[src], ts[out]
        table = rng.integers(y.qmin, y.qmax + 1, x.qmax - x.qmin + 1)
        ops.append(ir.Op("lut", name, [src], out, ir.SPEC["lut"](table=table)))
    return ir.Graph(["x"], ["u", "v"], ts, ops)


@pytest.mark.parametrize("path", ["portable", "avx512-vbmi"])
def test_byte_lookup_paths_bit_exact_and_sanitizer_clean(path, tmp_path):
    """The AVX-512 VBMI lookup (vpermi2b, 64 codes per step) and the C99 loop it replaces equal the
    reference, under AddressSanitizer + UndefinedBehaviorSanitizer too (the masked tail)."""
    if path != "portable" and not _cpu_has("avx512vbmi"):
        pytest.skip("this CPU has no AVX-512 VBMI: its lookup cannot run here")
    opt = {"portable": "-O1 -DQC_PORTABLE", "avx512-vbmi": "-O1 -march=haswell -mavx512f -mavx512bw -mavx512vbmi"}[path]
    for name, graph in (("luts", lut_graph(seed=5)), ("zoo", op_zoo_graph(seed=5))):
        check_bit_exact(graph, tmp_path / name, n=3, seed=5, opt=opt)
        assert (tmp_path / name / "net.c").read_text().count("_mm512_permutex2var_epi8(t0, v, t1)") == (
            4 if name == "luts" else 1)      # the zoo's 16-bit lookup stays a C loop
        check_bit_exact(graph, tmp_path / f"{name}_asan", n=2, seed=6, opt=opt, sanitize=True)


def test_sanitizers_clean_with_narrow_accumulators(tmp_path):
    """AddressSanitizer + UndefinedBehaviorSanitizer (any report aborts): wrap is modular, no signed overflow."""
    graph = conv_zoo_graph(seed=1)
    check_bit_exact(graph, tmp_path / "conv", n=2, seed=1, sanitize=True)
    check_bit_exact(op_zoo_graph(seed=1), tmp_path / "zoo", n=2, seed=1, sanitize=True)


def test_batch_of_samples_and_harness_errors(tmp_path):
    graph = op_zoo_graph(seed=2)
    check_bit_exact(graph, tmp_path, n=7, seed=2)
    with pytest.raises(ValueError, match="expected shape"):
        run(tmp_path, np.zeros((2, 3, 12, 11), np.uint8))
    (tmp_path / "bad.bin").write_bytes(b"\0" * 5)
    proc = subprocess.run([str(tmp_path / "net"), str(tmp_path / "bad.bin")] + [str(tmp_path / f"o{i}") for i in range(3)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "whole number" in proc.stderr


# ---- names, errors ------------------------------------------------------------------------------
def test_identifiers_sanitized_and_unique(tmp_path):
    taken = set()
    names = [c_identifier(n, taken, "m") for n in ("layer1.0/conv-1", "layer1_0_conv_1", "3x3", "int", "", "ü",
                                                    "conv", "conv_w", "conv.b")]
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names)
    derived = [n + sfx for n in names for sfx in ("", "_w", "_b", "_m", "_s", "_table")]
    assert len(set(derived)) == len(derived)              # no function collides with another op's arrays
    graph = conv_zoo_graph()
    for i, op in enumerate(graph.ops):
        op.name = ["for", "a.b", "a-b", "a/b", "1", "x y", "run", "conv", "conv_w", "a.b_m"][i % 10]
    check_bit_exact(graph, tmp_path, n=1)
    with pytest.raises(ValueError, match="C identifier"):
        generate(graph, name="my-net")


def test_unsupported_op_kind_is_a_clear_error(tmp_path):
    graph = op_zoo_graph()
    graph.ops[3].kind = "gelu_erf"            # not an IR kind: the C backend names it before ir.verify runs
    with pytest.raises(UnsupportedOpError, match=r"'gelu_erf'.*'rq'.*supported kinds"):
        emit(graph, tmp_path)


def test_uncalibrated_or_training_graph_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    model = OpZoo().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # OpZoo reads a shape: one op stays in float
        qm = qcompile.compile(model, (torch.randn(2, 3, 16, 16),))
    with pytest.raises(QCompileError, match="training mode"):
        qcompile.emit_c(qm.train(), tmp_path)
    with pytest.raises(QCompileError, match="calibrat"):
        qcompile.emit_c(qm.eval(), tmp_path)
    assert not (tmp_path / "model.c").exists()


# ---- memory planning ---------------------------------------------------------------------------
def test_memory_plan_never_overlaps_live_buffers():
    rng = np.random.default_rng(0)
    for _ in range(50):
        bufs = []
        for i in range(30):
            first = int(rng.integers(0, 20))
            bufs.append(memory_plan.Buffer(f"b{i}", int(rng.integers(1, 5000)), first, first + int(rng.integers(0, 5))))
        p = memory_plan.plan(bufs)
        memory_plan.check(p)
        peak = max(sum(b.size for b in bufs if b.first <= t <= b.last) for t in range(25))
        assert peak <= p.arena_bytes <= p.naive_bytes


# ---- lowered models -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_models():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    return x, {"exact": trained(OpZoo(), x),
               "saturate": trained(OpZoo(), x, acc_bits=10, tile=8, overflow="saturate"),
               "wrap": trained(OpZoo(), x, acc_bits=10, tile=8, overflow="wrap"),
               "pairwise": trained(OpZoo(), x, acc_bits=10, overflow="pairwise")}


@pytest.mark.parametrize("mode", ["exact", "saturate", "wrap", "pairwise"])
def test_lowered_op_zoo_bit_exact(zoo_models, mode, tmp_path):
    x, models = zoo_models
    graph = qcompile.lower(models[mode])
    codes = reference.quantize_input(graph, x)
    check_bit_exact(graph, tmp_path, codes=[codes], sanitize=mode == "wrap")
    if mode != "exact":      # the narrow accumulator overflows on these inputs
        exact = qcompile.lower(models[mode])
        for op in exact.ops:
            if isinstance(op.attrs, ir.Accumulator):
                op.attrs.acc_bits = None
        assert not np.array_equal(reference.run_codes(graph, codes), reference.run_codes(exact, codes))


def test_lenet_mnist_bit_exact(mnist, tmp_path):
    from qcompile.models import get
    from qcompile.tools.training import train_classifier
    torch.manual_seed(0)
    qm = qcompile.compile(get("models:lenet5"), (mnist.x_train[:2],), grad_bits=8, seed=0)
    qm.calibrate([mnist.x_train[:256]])
    train_classifier(qm, mnist.x_train[:512], mnist.y_train[:512], epochs=1, batch_size=64, lr=0.05)
    graph = qcompile.lower(qm.eval())
    codes = reference.quantize_input(graph, mnist.x_test[:200])
    module, (logits,) = check_bit_exact(graph, tmp_path, codes=[codes])
    assert module.arena_bytes < module.activation_bytes
    agree = (logits.argmax(1) == qm(mnist.x_test[:200]).argmax(1).numpy()).mean()
    assert agree >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize("name,size,acc", [
    ("resnet18", 32, {}), ("mobilenet_v2", 32, {}), ("shufflenet_v2_x0_5", 32, {}), ("efficientnet_b0", 32, {}),
    ("resnet18", 32, dict(acc_bits=16, tile=32, overflow="saturate")),
    ("mobilenet_v2", 32, dict(acc_bits=12, tile=16, overflow="wrap")),
], ids=["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "efficientnet_b0", "resnet18-acc16-saturate",
        "mobilenet_v2-acc12-wrap"])
def test_torchvision_models_bit_exact(name, size, acc, tmp_path):
    from qcompile.models import get
    torch.manual_seed(0)
    x = torch.randn(6, 3, size, size)
    qm = trained(get(f"torchvision:{name}", num_classes=10), x[:4], steps=1, **acc)
    graph = qcompile.lower(qm)
    codes = reference.quantize_input(graph, torch.cat([x[4:], 3 * torch.randn(2, 3, size, size)]))
    module, _ = check_bit_exact(graph, tmp_path, codes=[codes])
    assert module.arena_bytes < module.naive_bytes and module.arena_bytes < module.activation_bytes
    if acc:   # the narrow accumulators overflow on these inputs: an exact graph computes other codes
        env = reference.run_codes(graph, codes, keep=True)
        overflowed = 0
        for op in graph.ops:
            if isinstance(op.attrs, ir.Accumulator) and op.attrs.acc_bits is not None:
                exact = ir.Op(op.kind, op.name, op.inputs, op.output, dataclasses.replace(op.attrs, acc_bits=None))
                one = ir.Graph(op.inputs, [op.output], graph.tensors, [exact])
                overflowed += int((reference.run_codes(one, env[op.inputs[0]]) != env[op.output]).sum())
        assert overflowed > 0


def test_cli_emit_c(tmp_path, capsys):
    from qcompile.tools.cli import main
    out = tmp_path / "c"
    assert main(["emit-c", "models:lenet5", "--input-shape", "2,1,28,28", "--out", str(out), "--name", "lenet",
                 "--build", f"--opt={TEST_OPT}"]) == 0
    printed = capsys.readouterr().out
    assert "arena" in printed and (out / "lenet").exists()
    assert "int lenet_run(const uint8_t *input, " in (out / "lenet.h").read_text()
