"""runtime/codegen: the transformer op kinds (softmax, layer_norm, constant, linear on rows, batched
activation×activation matmul) in the generated C99 runtime equal the integer reference byte for byte.

The row-wise integer helpers (qc_div_round, qc_isqrt in common.c.j2) are checked alone against
`qcompile.core.rowwise`; hand-built graphs (`transformer_graphs`) are built with gcc, also under
AddressSanitizer + UndefinedBehaviorSanitizer, and run on batches of random and extreme codes.
"""
from __future__ import annotations

import math
import re
import subprocess
from fractions import Fraction

import numpy as np
import pytest

from qcompile import ir
from qcompile.backends.c.codegen import TEMPLATES, generate
from qcompile.core.requant import quantize_multiplier
from qcompile.core.rowwise import div_round, isqrt
from qcompile.errors import UnsupportedOpError

from test_codegen import check_bit_exact, random_codes
from transformer_graphs import attention_graph, clamp, layer_norm_op, softmax_op, tensor


def _pure_integer(path) -> None:
    """The generated model source has no float, no math.h, no sqrt (comments may print scales)."""
    code = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    for word in ("float", "double", "math.h", "malloc", "stdio"):
        assert word not in code, word
    assert not re.search(r"\b(sqrt|sqrtl|exp|expf|lrint|round)\s*\(", code)   # libm: only qc_isqrt, integer


# ---- the row-wise helpers, alone -------------------------------------------------------------
def test_c_rowwise_helpers_match_python(tmp_path):
    """qc_isqrt == rowwise.isqrt == math.isqrt at squares, squares − 1 and random v < 2^62 (and
    exact up to 2^64 − 1); qc_div_round == rowwise.div_round == n/d rounded half up (floor for
    negative n) on random values and exact ties of both signs. Built with UBSan: no overflow."""
    rng = np.random.default_rng(0)
    roots = [int(k) for k in rng.integers(1, 1 << 31, 200)] + [1, 2, 3, (1 << 31) - 1]
    sq = [0, 1, 2, 3, 4, (1 << 62) - 1] + [k * k for k in roots] + [k * k - 1 for k in roots] + [k * k + 1 for k in roots]
    sq += [int(v) >> int(s) for v, s in zip(rng.integers(0, 1 << 62, 300), rng.integers(0, 62, 300))]
    sq = [v for v in sq if 0 <= v < 1 << 62]
    big = [(1 << 64) - 1, (1 << 63), (1 << 62), ((1 << 32) - 1) ** 2, (1 << 32) ** 2 - 1]
    dr = [(int(n) >> int(k), int(d)) for n, k, d in zip(rng.integers(-(1 << 50), 1 << 50, 300), rng.integers(0, 50, 300),
                                                       rng.integers(1, 1 << 40, 300))]
    dr += [(int(n), int(d)) for n, d in zip(rng.integers(-1000, 1000, 300), rng.integers(1, 30, 300))]
    for d in (2, 6, 1 << 17, 1000002):        # ties n/d = k + 1/2 both signs: half up means -2.5 → -2
        dr += [((2 * k + 1) * d // 2, d) for k in (-3, -2, -1, 0, 1, 2, 1 << 20, -(1 << 20))]
    ties = sum(1 for n, d in dr if (2 * n) % d == 0 and (2 * n // d) % 2 == 1)
    (tmp_path / "in.txt").write_text("\n".join([f"s {v}" for v in sq + big] + [f"d {n} {d}" for n, d in dr]) + "\n")
    common = (TEMPLATES / "common.c.j2").read_text()
    common = common[:common.index("{#")]
    (tmp_path / "t.c").write_text(
        "#include <stdint.h>\n#include <stdio.h>\n" + common +
        "int main(void)\n{\n    char c;\n    unsigned long long u;\n    long long n, d;\n"
        "    while (scanf(\" %c\", &c) == 1) {\n"
        "        if (c == 's' && scanf(\"%llu\", &u) == 1)\n"
        "            printf(\"%lld\\n\", (long long)qc_isqrt((uint64_t)u));\n"
        "        else if (c == 'd' && scanf(\"%lld %lld\", &n, &d) == 2)\n"
        "            printf(\"%lld\\n\", (long long)qc_div_round((int64_t)n, (int64_t)d));\n"
        "        else\n            return 1;\n    }\n    return 0;\n}\n")
    subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsanitize=undefined",
                    "-fno-sanitize-recover=all", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)
    out = subprocess.run([str(tmp_path / "t")], stdin=open(tmp_path / "in.txt"), capture_output=True, text=True,
                         check=True).stdout.split()
    got = [int(v) for v in out]
    assert len(got) == len(sq) + len(big) + len(dr) and ties >= 32
    got_sq, got_big, got_dr = got[:len(sq)], got[len(sq):len(sq) + len(big)], got[len(sq) + len(big):]
    assert got_sq == [math.isqrt(v) for v in sq] == isqrt(np.array(sq, np.int64)).tolist()
    assert got_big == [math.isqrt(v) for v in big]
    half_up = [math.floor(Fraction(n, d) + Fraction(1, 2)) for n, d in dr]
    assert got_dr == half_up == div_round(np.array([n for n, _ in dr]), np.array([d for _, d in dr])).tolist()


# ---- the attention block ------------------------------------------------------------------------
def _attention_codes(graph: ir.Graph, n: int, rng) -> np.ndarray:
    """Random codes, plus rows that are constant (LayerNorm: every d_j = 0) and rows at qmin/qmax."""
    x = graph.tensor("x")
    codes = random_codes(x, n, rng)
    rows = x.shape[0]
    codes[0] = x.qmax
    codes[1, 0] = x.qmin
    codes[1, 1 % rows] = rng.integers(x.qmin, x.qmax + 1)
    codes[2, :, ::2], codes[2, :, 1::2] = x.qmin, x.qmax
    codes[3, 2 % rows] = np.where(np.arange(x.shape[-1]) == 3, x.qmax, x.qmin)
    return codes


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seed,shape", [(0, {}), (1, {}), (2, dict(heads=3, length=7, dim=8)),
                                        (3, dict(heads=1, length=1, dim=16))], ids=["s0", "s1", "h3l7d8", "l1"])
def test_attention_block_bit_exact(seed, shape, causal, tmp_path):
    """layer_norm → linear on L rows → slices / reshapes / transposes → batched q·kᵀ → softmax → ·v →
    add with a constant: every output byte equals the reference, under ASan + UBSan."""
    graph = attention_graph(seed, causal, **shape)
    assert {op.kind for op in graph.ops} >= {"layer_norm", "linear", "matmul", "softmax", "constant", "add"}
    rng = np.random.default_rng(seed)
    codes = _attention_codes(graph, 16, rng)
    check_bit_exact(graph, tmp_path, codes=[codes], sanitize=True)
    _pure_integer(tmp_path / "net.c")


def test_attention_block_optimized_and_figures(tmp_path):
    """The same at -O3 (vectorized loops), on 64 samples; the constant and the exp / layer_norm tables
    count as weights; the intermediates share the arena."""
    graph = attention_graph(5, True, heads=2, length=6, dim=4)
    module, _ = check_bit_exact(graph, tmp_path, codes=[_attention_codes(graph, 64, np.random.default_rng(5))],
                                opt="-O3")
    const = next(op for op in graph.ops if op.kind == "constant")
    assert module.weight_bytes > const.attrs.value.size + 3 * 8 * 8
    assert 0 < module.arena_bytes < module.naive_bytes
    src = (tmp_path / "net.c").read_text()
    assert "qc_isqrt(" in src and "qc_div_round(" in src and "net_const(" in src


# ---- softmax ---------------------------------------------------------------------------------
def softmax_graph() -> ir.Graph:
    """A 16-bit signed input (2, 5, 7) under several softmaxes: full and causal on 8- and 16-bit outputs,
    another input scale (a longer exp table), causal with more rows than columns (the first rows
    see nothing), one over a 1-D row of 70 (a reshape), and two with a visible mask: (2, 1, 7) broadcast
    over rows, its second group seeing nothing, and (5, 7) together with causal."""
    x = tensor("x", (2, 5, 7), 0.004, 0, bits=16, signed=True)
    ts, ops, outs = {"x": x}, [], []

    def out(name, shape=(2, 5, 7), **kw):
        ts[name] = tensor(name, shape, **{"scale": 1 / 255, "zero_point": 0, **kw})
        outs.append(name)
        return ts[name]

    ops.append(softmax_op("sm.full", x, out("full")))
    ops.append(softmax_op("sm.causal", x, out("causal"), causal=True))
    ops.append(softmax_op("sm.wide", x, out("wide", scale=1 / 65535, bits=16), scale=0.3, causal=True))
    ops.append(softmax_op("sm.signed", x, out("signed", scale=1 / 127, bits=8, signed=True, zero_point=-128),
                          scale=0.05))
    ts["tall"] = tensor("tall", (2, 7, 5), x.scale, 0, bits=16, signed=True)
    ops.append(ir.Op("reshape", "tall", ["x"], "tall", ir.Reshape(shape=(2, 7, 5))))
    ops.append(softmax_op("sm.tall", ts["tall"], out("tall_p", (2, 7, 5)), causal=True))
    ts["flat"] = tensor("flat", (70,), x.scale, 0, bits=16, signed=True)
    ops.append(ir.Op("reshape", "flat", ["x"], "flat", ir.Reshape(shape=(70,))))
    ops.append(softmax_op("sm.flat", ts["flat"], out("flat_p", (70,), bits=16, scale=1 / 65535)))
    columns = np.array([[[1, 0, 1, 1, 0, 0, 1]], [[0] * 7]], dtype=np.int8)
    ops.append(softmax_op("sm.columns", x, out("columns"), visible=columns))
    pairs = (np.random.default_rng(3).random((5, 7)) < 0.6).astype(np.int8)
    ops.append(softmax_op("sm.pairs", x, out("pairs"), causal=True, visible=pairs))
    return ir.verify(ir.Graph(["x"], outs, ts, ops))


def _softmax_codes(n: int, rng) -> np.ndarray:
    """Rows spread over a few table lengths around a random centre, with ties, extremes (differences
    past the table's end, up to 65535) and constant rows."""
    centre = rng.integers(-30000, 30000, (n, 2, 5, 1))
    codes = np.clip(centre + rng.integers(-3000, 3000, (n, 2, 5, 7)), -32768, 32767)
    codes[0] = 7
    codes[1, 0, :, 0] = 32767
    codes[1, 1] = np.where(rng.random((5, 7)) < 0.5, -32768, 32767)
    codes[2, 1, 2] = [-32768, -32768, 32767, 32767, 0, 1, -1]
    codes[3, :, :, ::2] = codes[3, :, :, :1]
    return codes


def test_softmax_16bit_input_bit_exact(tmp_path):
    graph = softmax_graph()
    rng = np.random.default_rng(11)
    codes = _softmax_codes(24, rng)
    with np.errstate(divide="ignore"):      # the reference divides 0 // 0 on rows that see nothing
        _, got = check_bit_exact(graph, tmp_path, codes=[codes], sanitize=True)
    full, causal, _, _, tall, flat, columns, pairs = got
    assert (columns[:, 0][..., [1, 4, 5]] == 0).all() and (columns[:, 1] == 0).all()
    assert (columns[:, 0][..., [0, 2, 3, 6]] > 0).any()
    seen = (np.random.default_rng(3).random((5, 7)) < 0.6) & (np.arange(7) <= np.arange(5)[:, None] + 2)
    assert (pairs[..., ~seen] == 0).all() and (pairs[..., seen] > 0).any()
    assert (causal[:, :, 0, 3:] == 0).all() and (causal[:, :, 0, :3] > 0).any()  # 5×7: row 0 sees columns 0..2
    assert (tall[:, :, :2] == 0).all()                                            # rows 0, 1 of 7×5 see nothing
    assert np.abs(full.sum(-1).astype(np.int64) - 255).max() <= 7                 # rows of probabilities
    assert np.abs(flat.sum(-1).astype(np.int64) - 65535).max() <= 70
    _pure_integer(tmp_path / "net.c")


# ---- layer norm ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,signed,shape,gamma_bits,eps,centered", [
    (8, False, (4, 384), 8, 1e-5, True),
    (16, True, (2, 3, 384), 12, 0.0, True),    # int16 weight codes; E = 0: a constant row has ρ = 0
    (8, False, (4, 384), 8, 1e-5, False),      # RMSNorm: d = N·(x − z)
    (16, True, (2, 3, 384), 8, 0.0, False),    # a row at the zero point has ρ = 0
], ids=["u8", "s16-eps0", "rms-u8", "rms-s16-eps0"])
def test_layer_norm_384_bit_exact(bits, signed, shape, gamma_bits, eps, centered, tmp_path):
    rng = np.random.default_rng(bits)
    x = tensor("x", shape, 0.02, 100 if not signed else -7, bits=bits, signed=signed)
    y = tensor("y", shape, 0.05, 3, signed=True)
    y16 = tensor("y16", shape, 0.001, 0, bits=16, signed=True)
    gamma, beta = rng.uniform(-2, 2, 384), rng.uniform(-1, 1, 384)
    ops = [layer_norm_op("ln", x, y, gamma, beta, eps=eps, gamma_bits=gamma_bits, centered=centered),
           layer_norm_op("ln16", x, y16, gamma, beta, eps=eps, gamma_bits=gamma_bits, centered=centered)]
    graph = ir.verify(ir.Graph(["x"], ["y", "y16"], {"x": x, "y": y, "y16": y16}, ops))
    assert (ops[0].attrs.eps == 0) == (eps == 0)
    codes = random_codes(x, 12, rng)
    codes = codes.reshape(12, -1, 384)
    codes[:, 0] = rng.integers(x.qmin, x.qmax + 1, (12, 1))          # constant rows: every d_j = 0
    codes[0, 1] = np.where(np.arange(384) == 5, x.qmax, x.qmin)       # one outlier: the largest Σd²
    codes[1, 1] = np.where(np.arange(384) % 2 == 0, x.qmax, x.qmin)
    codes[2, 1] = x.qmin + rng.integers(0, 2, 384)                    # tiny variance
    codes[3, 0] = x.zero_point                                        # every x − z = 0
    check_bit_exact(graph, tmp_path, codes=[codes.reshape(12, *shape)], sanitize=True)
    _pure_integer(tmp_path / "net.c")


def test_layer_norm_past_int64_bounds_is_a_clear_error(tmp_path):
    """N = 1700 rows of 16-bit codes: Σd² can pass 2^62 (N³·65535²/4), which the int64 C code (and reference)
    cannot hold."""
    x = tensor("x", (1700,), 0.02, 0, bits=16, signed=True)
    y = tensor("y", (1700,), 0.05, 0, signed=True)
    rng = np.random.default_rng(0)
    graph = ir.Graph(["x"], ["y"], {"x": x, "y": y},
                     [layer_norm_op("ln", x, y, rng.uniform(-1, 1, 1700), rng.uniform(-1, 1, 1700))])
    with pytest.raises(UnsupportedOpError, match=r"layer_norm.*2\^62"):
        generate(graph)


# ---- constants, linear on rows --------------------------------------------------------------
def test_constant_output_and_linear_on_rows_bit_exact(tmp_path):
    """A constant read by an add and also a graph output itself (an op without inputs writing the output
    buffer); linear over the last axis of a (2, 3, 10) input with a narrow saturating accumulator."""
    rng = np.random.default_rng(3)
    x = tensor("x", (2, 3, 10), 0.05, 30)
    h = tensor("h", (2, 3, 4), 0.1, -3, signed=True)
    c = tensor("c", (2, 3, 4), 0.02, 1, signed=True)
    c2 = tensor("c2", (3, 4), 0.5, 200)
    y = tensor("y", (2, 3, 4), 0.1, 5)
    pairs = [quantize_multiplier(float(r)) for r in rng.uniform(1e-3, 4e-3, 4)]
    twice = 2 * max(h.scale, c.scale)
    ma, sa = quantize_multiplier(h.scale / twice)
    mb, sb = quantize_multiplier(c.scale / twice)
    m, s = quantize_multiplier(twice / (2 ** 20 * y.scale))
    ops = [
        ir.Op("linear", "fc", ["x"], "h", ir.Linear(
            weight=rng.integers(-127, 128, (4, 10)).astype(np.int8), bias=rng.integers(-900, 900, 4).astype(np.int32),
            multiplier=np.array([p[0] for p in pairs]), shift=np.array([p[1] for p in pairs]),
            acc_bits=14, tile=3, overflow="saturate", **clamp(h))),
        ir.Op("constant", "table", [], "c", ir.Constant(value=rng.integers(-128, 128, c.shape).astype(np.int8))),
        ir.Op("add", "add", ["h", "c"], "y", ir.Add(left_shift=20, multiplier_a=ma, shift_a=sa, multiplier_b=mb,
                                                   shift_b=sb, multiplier=m, shift=s, **clamp(y))),
        ir.Op("constant", "lonely", [], "c2", ir.Constant(value=rng.integers(0, 256, c2.shape).astype(np.uint8))),
    ]
    graph = ir.verify(ir.Graph(["x"], ["y", "c", "c2"], {t.name: t for t in (x, h, c, c2, y)}, ops))
    _, got = check_bit_exact(graph, tmp_path, n=5, sanitize=True)
    np.testing.assert_array_equal(got[1], np.broadcast_to(ops[1].attrs.value, (5, 2, 3, 4)))
    np.testing.assert_array_equal(got[2], np.broadcast_to(ops[3].attrs.value, (5, 3, 4)))
    header = (tmp_path / "net.h").read_text()
    assert "int net_run(const uint8_t *input, uint8_t *output0, int8_t *output1, uint8_t *output2" in header
