"""ONNX export of the integer IR, in QDQ or QOperator form, checked with onnx.checker.

`write(graph, path, format="qdq" | "qop", opset=None)` writes an `ir.Graph` as one ONNX
model whose input is the float image and whose output is the dequantized result of the
integer graph (`qcompile.export_onnx` lowers a trained graph first). Every IR tensor exists in the
model as its integer codes (uint8/int8, int16 for intermediate grids, uint16 for 16-bit token ids).

QDQ: QuantizeLinear/DequantizeLinear around float Conv/Gemm/MatMul/Add/Mul/Concat/pooling
(onnxruntime fuses them into integer kernels); add/mul/concat/requantize/average pooling
reading a 16-bit intermediate tensor use the integer form of QOperator below. A ReLU fused
into an op's output (act_min = zero point) is a Max on the codes, so the op stays fusable.
A quantized add is DQ→Add→Q, which onnxruntime fuses into QLinearAdd; its fixed-point kernel rounds ties up, so where every
requantization multiplier of the add is a power of two (pow2 grids: ties are frequent and exactness
is promised) the add is a two-input Sum instead, which
onnxruntime keeps in float: float Sum + QuantizeLinear rounds half to even like the reference.

QOperator: QLinearConv for convolutions, MatMulInteger for linear layers and integer
arithmetic for every other requantization (int64 Mul, then floor division by 2^n as an
unsigned BitShift with half-to-even rounding; Mod/Div before opset 18), so those match the
reference bit for bit. Integer sums (pooling) run in float32 where they stay below 2^24.
In both forms:
  - activation lookup tables (relu6, hardswish, silu, sigmoid, BatchNorm...) are a Gather
    of the table on the codes: exact, independent of the runtime's float approximations;
  - reshape/transpose/slice/max-pool act on the codes directly (same grid);
  - narrow accumulators (acc_bits) are one ConvInteger/MatMulInteger per tile (uint8
    weights with zero point 128, exact int32 partial sums), accumulated in int64 with a
    clamp after every tile (saturate; pairwise: each pair's sum clamped too, unless no pair can
    leave the range) or one modulo (wrap), then requantized in integers;
  - linear on per-sample rows (..., I) reshapes the codes to (batch·rows, I), writes the one-row
    form (Gemm takes a matrix), and reshapes the output codes back; a linear without weight_scale
    (hand-built graphs) is MatMulInteger in QDQ too. Batched matmul is one broadcasting MatMul;
  - softmax and layer_norm (onnxruntime has no integer forms) are `qcompile.core.rowwise`'s
    integer arithmetic in int64 ONNX ops, the same nodes in QDQ and QOperator. softmax: ReduceMax,
    mx − x clamped to 0..len(T), a Gather of the exp table with a 0 appended past its end, ReduceSum,
    a rounded division; the causal mask is a bool (rows, cols) initializer and Where (hidden entries
    never win the max and get e = 0). layer_norm: ReduceSum, d = N·x − Σx, ρ = the floor square root
    of Σd² + E as Floor(Sqrt) in float64 corrected by ±1 in int64 (exact below 2^62), a rounded
    division, weight and bias, then the usual requantization. The rounded division
    div_round(n, d) = ⌊(2n + d) / 2d⌋ is Mod(fmod=0) + Sub + Div (int64 Div truncates; exact on a multiple);
  - constant is its codes as an initializer, Expanded to the input's batch size;
  - embedding is Cast of the id codes to int64, Min with V − 1 (left out where the ids cannot pass it)
    and a Gather (axis 0) of the (V, E) table initializer. An ids graph input (scale 1, zero point 0)
    is quantized like any input by QuantizeLinear (exact: ids are integers, exact in float32); 16-bit
    ids take uint16 QuantizeLinear, opset 21, as every 16-bit tensor does.

Weights: `weight_dtype="int8"` (U8S8 kernels) or `"uint8"` (codes + 128 with zero point
128: U8U8 kernels). On x86 CPUs without VNNI, onnxruntime's U8S8 kernels use VPMADDUBSW,
whose int16 pair sums saturate for large weights (onnxruntime #16105), so "auto" picks
"uint8" there and "int8" on CPUs with VNNI (or non-x86). The choice is in the metadata.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile import ir
from qcompile.core.accumulator import acc_range, max_l1_bounds, pairs_saturation_free
from qcompile.core.requant import fits_int64, is_power_of_two, product_bound, requantized_bound
from qcompile.core.rowwise import NORM_BITS, RECIP_BITS, layer_norm_bounds, layer_norm_span, softmax_visible
from qcompile.errors import QCompileError

FORMATS = ("qdq", "qop")
SPLIT = 16            # multiplier split m = mh·2^SPLIT + ml where v·m can pass 2^62 (`requant`)
DEFAULT_OPSET = 21
MIN_OPSET = 13


class ExportError(QCompileError):
    """The graph cannot be written in the requested ONNX form."""


def cpu_has_vnni() -> bool:
    """True when the CPU has AVX-VNNI / AVX512-VNNI (x86) or is not x86 (no VPMADDUBSW issue)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _np_dtype(t: ir.Tensor):
    if t.bits <= 8:
        return np.int8 if t.signed else np.uint8
    return np.int16 if t.signed else np.uint16



def _act_range(op: ir.Op, t: ir.Tensor) -> tuple[int, int]:
    """The clamp act_min..act_max of an op that has one (`ir.Clamp`), else the output's codes."""
    if isinstance(op.attrs, ir.Clamp):
        return op.attrs.act_min, op.attrs.act_max
    return t.qmin, t.qmax


def _onnx_dtype(t: ir.Tensor) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(_np_dtype(t)))


class _Builder:
    def __init__(self, graph: ir.Graph, fmt: str, weight_dtype: str, opset: int):
        self.g, self.fmt, self.weight_dtype, self.opset = graph, fmt, weight_dtype, opset
        self.nodes: list = []
        self.inits: list = []
        self.names: set = set()
        self.consts: dict = {}
        self.rows: dict = {}          # name → ir.Tensor of codes reshaped to rows (`linear_rows`)
        self.batch_shape = None       # Shape of the input's batch axis, (1,) int64 (`op_constant`)

    # ---- plumbing ----------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "_." else "_" for c in hint)
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def const(self, hint: str, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 64 else None
        if key is not None and key in self.consts:
            return self.consts[key]
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self.consts[key] = name
        return name

    def node(self, op: str, inputs: list, hint: str, domain: str | None = None, out: str | None = None, **attrs) -> str:
        out = out or self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh("n_" + out), domain=domain, **attrs))
        return out

    def t(self, name: str) -> ir.Tensor:
        return self.rows[name] if name in self.rows else self.g.tensor(name)

    def scalar_qparams(self, t: ir.Tensor) -> tuple[str, str]:
        return (self.const(f"{t.name}_scale", np.float32(t.scale)),
                self.const(f"{t.name}_zp", np.array(t.zero_point, dtype=_np_dtype(t))))

    def dq(self, name: str) -> str:
        """A DequantizeLinear of tensor `name` (one per consumer, as QDQ fusion expects)."""
        s, z = self.scalar_qparams(self.t(name))
        return self.node("DequantizeLinear", [name, s, z], f"{name}_dq")

    def q(self, value: str, out: str) -> str:
        s, z = self.scalar_qparams(self.t(out))
        return self.node("QuantizeLinear", [value, s, z], out, out=out)

    def q_clamped(self, value: str, op: ir.Op) -> str:
        """QuantizeLinear onto the op's output grid, then clamp the codes to [act_min, act_max] (a fused
        ReLU), so onnxruntime still fuses DQ→op→Q into its integer kernel: Max on 8-bit codes, else
        DQ→Relu/Clip→Q on the output grid (exact: grid values are exact in float32)."""
        t = self.t(op.output)
        lo, hi = _act_range(op, t)
        if lo <= t.qmin and hi >= t.qmax:
            return self.q(value, op.output)
        s, z = self.scalar_qparams(t)
        codes = self.node("QuantizeLinear", [value, s, z], op.output + "_unclamped")
        if t.bits <= 8 and hi >= t.qmax:
            return self.node("Max", [codes, self.const("amin_q", np.array(lo, dtype=_np_dtype(t)))], op.output,
                             out=op.output)
        v = self.node("DequantizeLinear", [codes, s, z], op.output + "_unclamped_dq")
        if lo == t.zero_point and hi >= t.qmax:
            v = self.node("Relu", [v], op.output + "_relu")
        else:
            v = self.node("Clip", [v, self.const("cmin", np.float32((lo - t.zero_point) * t.scale)),
                                   self.const("cmax", np.float32((hi - t.zero_point) * t.scale))], op.output + "_clip")
        return self.q(v, op.output)

    def clamp_codes(self, codes: str, op: ir.Op) -> str:
        t = self.t(op.output)
        return self.node("Clip", [codes, self.const("amin_q", np.array(op.attrs.act_min, dtype=_np_dtype(t))),
                                  self.const("amax_q", np.array(op.attrs.act_max, dtype=_np_dtype(t)))],
                         op.output, out=op.output)

    # ---- integer arithmetic (int64) ------------------------------------------------------------
    def clamp64(self, v: str, lo: int, hi: int, hint: str) -> str:
        """min(max(v, lo), hi) on int64 with Less/Greater + Where: onnxruntime 1.31's int64 Clip and Max
        return some values just below -2^31 unclamped (e.g. max(-2147500580, -2048))."""
        lo_c, hi_c = self.const("lo64", np.int64(lo)), self.const("hi64", np.int64(hi))
        v = self.node("Where", [self.node("Less", [v, lo_c], hint + "_below"), lo_c, v], hint + "_max")
        return self.node("Where", [self.node("Greater", [v, hi_c], hint + "_above"), hi_c, v], hint)


    def to_i64(self, name: str, minus_zp: bool = True) -> str:
        v = self.node("Cast", [name], name + "_i64", to=TensorProto.INT64)
        z = self.t(name).zero_point
        if minus_zp and z:
            v = self.node("Sub", [v, self.const("zp_i64", np.int64(z))], name + "_c")
        return v

    def floor_divmod(self, x: str, n: np.ndarray, hint: str) -> tuple[str, str]:
        """(⌊x / 2^n⌋, x − ⌊x / 2^n⌋·2^n) in int64 ONNX ops for |x| < 2^62 (n: 0..62, shaped to broadcast)."""
        div = np.left_shift(np.int64(1), n)
        if self.opset >= 18:
            # floor division by 2^n on unsigned values: offset by 2^62, BitShift, mask
            u = self.node("Cast", [self.node("Add", [x, self.const("rq_off", np.int64(1 << 62))], hint + "_pos")],
                          hint + "_u", to=TensorProto.UINT64)
            qu = self.node("BitShift", [u, self.const("rq_n", n.astype(np.uint64))], hint + "_qu", direction="RIGHT")
            rem = self.node("Cast", [self.node("BitwiseAnd", [u, self.const("rq_mask", (div - 1).astype(np.uint64))],
                                               hint + "_remu")], hint + "_rem", to=TensorProto.INT64)
            quo = self.node("Sub", [self.node("Cast", [qu], hint + "_qi", to=TensorProto.INT64),
                                    self.const("rq_offq", np.int64(1 << 62) >> n)], hint + "_q")
            return quo, rem
        return self.floor_div(x, self.const("rq_d", div), hint)

    def floor_div(self, x: str, d: str, hint: str) -> tuple[str, str]:
        """(⌊x / d⌋, x mod d) in int64 for d > 0: Mod with fmod=0 takes the divisor's sign, and the
        truncating Div is exact on the multiple x − (x mod d)."""
        rem = self.node("Mod", [x, d], hint + "_rem", fmod=0)
        return self.node("Div", [self.node("Sub", [x, rem], hint + "_floor"), d], hint + "_q"), rem

    def div_round(self, n: str, d: str, hint: str) -> str:
        """`core.rowwise.div_round`: n / d rounded half up = ⌊(2n + d) / 2d⌋ for d > 0, any sign of n."""
        two = self.const("two", np.int64(2))
        num = self.node("Add", [self.node("Mul", [n, two], hint + "_2n"), d], hint + "_num")
        return self.floor_div(num, self.node("Mul", [d, two], hint + "_2d"), hint)[0]

    def reduce_last(self, kind: str, v: str, hint: str) -> str:
        """ReduceSum/ReduceMax over the last axis, keepdims (ReduceMax takes axes as an input from opset 18)."""
        if kind == "ReduceSum" or self.opset >= 18:
            return self.node(kind, [v, self.const("axis_last", np.array([-1], np.int64))], hint, keepdims=1)
        return self.node(kind, [v], hint, axes=[-1], keepdims=1)

    def isqrt(self, v: str, hint: str) -> str:
        """`core.rowwise.isqrt`: ⌊√v⌋ for 0 <= v < 2^62, the float64 root floored, then the same two ±1
        corrections in int64 (r < 2^31.5: (r + 1)² fits)."""
        vf = self.node("Cast", [v], hint + "_f", to=TensorProto.DOUBLE)
        r = self.node("Cast", [self.node("Floor", [self.node("Sqrt", [vf], hint + "_sqrt")], hint + "_floor")],
                      hint + "_r0", to=TensorProto.INT64)
        one = self.const("one64", np.int64(1))
        for k in range(2):
            over = self.node("Greater", [self.node("Mul", [r, r], hint + f"_sq{k}"), v], hint + f"_over{k}")
            r = self.node("Where", [over, self.node("Sub", [r, one], hint + f"_dn{k}"), r], hint + f"_rd{k}")
            up = self.node("Add", [r, one], hint + f"_up{k}")
            under = self.node("Greater", [self.node("Mul", [up, up], hint + f"_usq{k}"), v], hint + f"_under{k}")
            r = self.node("Where", [under, r, up], hint + f"_r{k + 1}")
        return r

    def requant(self, v: str, m, s, hint: str, bound: int, op: ir.Op, channel_shape=None) -> str:
        """round_half_to_even(v·m / 2^(31−s)) in int64 ONNX ops (m, s scalars or per-channel arrays) for
        |v| <= bound. Where v·m can pass 2^62 (`core.requant.fits_int64`: e.g. a product of two 16-bit
        intermediates) the multiplier is split, m = mh·2^16 + ml: v·m = C·2^16 + Br with
        C = v·mh + ⌊v·ml / 2^16⌋ and Br its remainder, so the quotient is ⌊C / 2^(n−16)⌋ and the remainder
        (C mod 2^(n−16))·2^16 + Br, all in int64; an ExportError where even that cannot hold it."""
        m = np.asarray(m, dtype=np.int64)
        s = np.asarray(s, dtype=np.int64)
        if m.ndim == 0 and int(m) == 1 << 30 and int(s) == 1:
            return v
        n = 31 - s                                   # 0..MAX_RIGHT_SHIFT (ir.verify)
        shape = channel_shape if channel_shape is not None and m.ndim else ()
        # n == 0: no rounding, and the remainder (0) never reaches 1
        half = np.where(n > 0, np.left_shift(np.int64(1), np.maximum(n - 1, 0)), 1).astype(np.int64).reshape(shape)
        if fits_int64(bound, m, s):
            prod = self.node("Mul", [v, self.const("rq_m", m.reshape(shape))], hint + "_prod")
            quo, rem = self.floor_divmod(prod, n.reshape(shape), hint)
        else:
            if product_bound(bound, m >> SPLIT) >= 2 ** 61 or product_bound(bound, 1 << SPLIT) >= 2 ** 62 \
                    or int(n.min()) < SPLIT or int(n.max()) > 62:
                raise ExportError(f"op {op.name!r} ({op.kind}): requantizing values up to {bound} (about 2^"
                                  f"{math.log2(max(bound, 1)):.0f}) by multiplier {np.max(m)}·2^({np.min(s)}−31) "
                                  "needs wider than int64 arithmetic even with a split multiplier; ONNX has int64 "
                                  "only. Use the C backend (qcompile.emit_c) or the reference, or narrower grids")
            a = self.node("Mul", [v, self.const("rq_mh", (m >> SPLIT).reshape(shape))], hint + "_hi")
            b = self.node("Mul", [v, self.const("rq_ml", (m & ((1 << SPLIT) - 1)).reshape(shape))], hint + "_lo")
            bq, br = self.floor_divmod(b, np.full(shape, SPLIT, np.int64) if shape else np.int64(SPLIT), hint + "_l")
            c = self.node("Add", [a, bq], hint + "_c")
            quo, cr = self.floor_divmod(c, (n - SPLIT).reshape(shape), hint + "_h")
            rem = self.node("Add", [self.node("Mul", [cr, self.const("rq_split", np.int64(1 << SPLIT))], hint + "_crs"),
                                    br], hint + "_rem")
        odd = self.node("Cast", [self.node("Mod", [quo, self.const("two", np.int64(2))], hint + "_par", fmod=0)],
                        hint + "_odd", to=TensorProto.BOOL)
        h = self.const("rq_h", half)
        gt = self.node("Greater", [rem, h], hint + "_gt")
        eq = self.node("Equal", [rem, h], hint + "_eq")
        up = self.node("Or", [gt, self.node("And", [eq, odd], hint + "_tie")], hint + "_up")
        return self.node("Add", [quo, self.node("Cast", [up], hint + "_upi", to=TensorProto.INT64)], hint + "_r")

    def finish_int(self, r: str, op: ir.Op) -> str:
        """y = clamp(zy + r, act_min, act_max) cast to the output tensor's storage type."""
        t = self.t(op.output)
        if t.zero_point:
            r = self.node("Add", [r, self.const("zp_i64", np.int64(t.zero_point))], op.output + "_z")
        r = self.clamp64(r, *_act_range(op, t), op.output + "_clamp")
        return self.node("Cast", [r], op.output, out=op.output, to=_onnx_dtype(t))

    # ---- weights -------------------------------------------------------------------------
    def unsigned_weights(self, x: ir.Tensor) -> bool:
        """True when 8-bit weights are stored as uint8: weight_dtype "uint8" and an unsigned input
        (onnxruntime's integer conv kernels take int8 inputs with int8 weights only)."""
        return self.weight_dtype == "uint8" and not x.signed

    def weight_codes(self, w: np.ndarray, hint: str, x: ir.Tensor) -> tuple[str, np.ndarray]:
        """(initializer, per-channel zero points) of weight codes in the storage chosen for input `x`
        (`unsigned_weights`); int16 codes (9–16-bit weight grids) stay int16."""
        if w.dtype == np.int16:
            return self.const(hint, w), np.zeros(w.shape[0], dtype=np.int16)
        if self.unsigned_weights(x):
            return (self.const(hint, (w.astype(np.int16) + 128).astype(np.uint8)),
                    np.full(w.shape[0], 128, dtype=np.uint8))
        return self.const(hint, w.astype(np.int8)), np.zeros(w.shape[0], dtype=np.int8)

    def weight_scales(self, op: ir.Op) -> np.ndarray:
        """Sw[o] recovered exactly as float32 from the IR's description of the layer."""
        return np.asarray(op.attrs.weight_scale, dtype=np.float32)

    # ---- ops -------------------------------------------------------------------------------
    def emit(self, op: ir.Op) -> None:
        getattr(self, "op_" + op.kind)(op)

    def op_conv2d(self, op: ir.Op) -> None:
        if op.attrs.acc_bits is not None:
            return self.narrow_weighted(op)
        a, x = op.attrs, self.t(op.inputs[0])
        y = self.t(op.output)
        w, wzp = self.weight_codes(a.weight, op.name + "_w", x)
        ws = self.weight_scales(op)
        conv = dict(strides=list(a.stride), pads=[*a.padding, *a.padding], dilations=list(a.dilation),
                    group=int(a.groups), kernel_shape=list(a.weight.shape[2:]))
        bias = self.const(op.name + "_b", self.int32_bias(op))
        if self.fmt == "qdq":
            wf = self.node("DequantizeLinear", [w, self.const(op.name + "_ws", ws), self.const(op.name + "_wz", wzp)],
                           op.name + "_wdq", axis=0)
            bf = self.node("DequantizeLinear", [bias, self.const(op.name + "_bs", np.float32(x.scale) * ws),
                                                self.const(op.name + "_bz", np.zeros(len(ws), np.int32))],
                           op.name + "_bdq", axis=0)
            v = self.node("Conv", [self.dq(x.name), wf, bf], op.name + "_conv", **conv)
            self.q_clamped(v, op)
            return
        self.check_qop_bits(op, x, y)
        self.acc_bound(op, x, int32=True)
        xs, xz = self.scalar_qparams(x)
        ys, yz = self.scalar_qparams(y)
        out = op.output if a.act_min <= y.qmin else op.name + "_unclamped"
        self.node("QLinearConv", [x.name, xs, xz, w, self.const(op.name + "_ws", ws), self.const(op.name + "_wz", wzp),
                                  ys, yz, bias], out, out=out, **conv)
        if out != op.output:
            self.clamp_codes(out, op)

    def float_form(self, op: ir.Op) -> bool:
        """QDQ writes add/mul/concat/requantize/avg-pool as DQ→float op→Q when its inputs are ≤ 8 bits
        (the output may be a 16-bit grid); with a 16-bit input it uses the integer form (float32
        cannot hold products of 16-bit codes and scales exactly)."""
        return self.fmt == "qdq" and all(self.t(n).bits <= 8 for n in op.inputs)

    def check_qop_bits(self, op: ir.Op, *tensors: ir.Tensor) -> None:
        for t in tensors:
            if t.bits > 8:
                raise ExportError(f"op {op.name!r} ({op.kind}): tensor {t.name!r} has {t.bits} bits; QOperator "
                                  "QLinearConv carries 8-bit tensors only. Export with format='qdq' (opset >= 21) "
                                  "or train with act_bits <= 8")
        if op.kind in ("conv2d", "linear") and op.attrs.weight.dtype != np.int8:
            raise ExportError(f"op {op.name!r} ({op.kind}): {op.attrs.weight.dtype} weight codes (weight_bits > 8); "
                              "QLinearConv/ConvInteger/MatMulInteger take 8-bit weights. Export with format='qdq' "
                              "(opset >= 21), use the C backend, or train with weight_bits <= 8")

    def int32_bias(self, op: ir.Op) -> np.ndarray:
        """The bias as int32, as DequantizeLinear and QLinearConv take it; an ExportError naming the layer
        when a code does not fit (wide grids: weights and activations of 12–16 bits)."""
        b = op.attrs.bias
        lo, hi = acc_range(32)
        if b.size and (int(b.min()) < lo or int(b.max()) > hi):
            raise ExportError(f"op {op.name!r} ({op.kind}): bias codes up to {int(np.abs(b).max())} need int64 "
                              "(the grid Sx·Sw is that fine); ONNX's DequantizeLinear and QLinearConv take an int32 "
                              "bias. Use the C backend (qcompile.emit_c) or the reference, or narrower grids")
        return b.astype(np.int32)

    def acc_bound(self, op: ir.Op, x: ir.Tensor, int32: bool) -> int:
        """|bias| + Σ|w|·max|x − zx| of a conv2d/linear; with `int32`, an ExportError where it reaches 2^31
        (onnxruntime's integer kernels accumulate in int32)."""
        w = op.attrs.weight
        bound = max_l1_bounds(w.reshape(w.shape[0], -1), x.magnitude, op.attrs.bias, None)[0]
        if int32 and bound > acc_range(32)[1]:
            raise ExportError(f"op {op.name!r} ({op.kind}): the accumulator can reach {bound} >= 2^31; onnxruntime's "
                              "QLinearConv/MatMulInteger accumulate in int32. Use the C backend or narrower grids")
        return bound

    def op_linear(self, op: ir.Op) -> None:
        if len(self.t(op.inputs[0]).shape) > 1:
            return self.linear_rows(op)
        if op.attrs.acc_bits is not None:
            return self.narrow_weighted(op)
        a, x = op.attrs, self.t(op.inputs[0])
        if self.fmt == "qdq" and a.weight_scale is not None:
            ws = self.weight_scales(op)
            w, wzp = self.weight_codes(a.weight, op.name + "_w", x)
            wf = self.node("DequantizeLinear", [w, self.const(op.name + "_ws", ws), self.const(op.name + "_wz", wzp)],
                           op.name + "_wdq", axis=0)
            bf = self.node("DequantizeLinear", [self.const(op.name + "_b", self.int32_bias(op)),
                                                self.const(op.name + "_bs", np.float32(x.scale) * ws),
                                                self.const(op.name + "_bz", np.zeros(len(ws), np.int32))],
                           op.name + "_bdq", axis=0)
            v = self.node("Gemm", [self.dq(x.name), wf, bf], op.name + "_gemm", transB=1)
            self.q_clamped(v, op)
            return
        self.check_qop_bits(op, x)
        bound = self.acc_bound(op, x, int32=True)
        w, wzp = self.weight_codes(a.weight.T.copy(), op.name + "_wT", x)
        xz = self.const(x.name + "_zp", np.array(x.zero_point, dtype=_np_dtype(x)))
        acc = self.node("MatMulInteger", [x.name, w, xz, self.const(op.name + "_wz", wzp[:1].reshape(()))],
                        op.name + "_acc")
        acc = self.node("Add", [self.node("Cast", [acc], op.name + "_acc64", to=TensorProto.INT64),
                                self.const(op.name + "_b", a.bias.astype(np.int64))], op.name + "_accb")
        self.finish_int(self.requant(acc, a.multiplier, a.shift, op.name, bound, op, (1, -1)), op)

    def linear_rows(self, op: ir.Op) -> None:
        """linear on per-sample (..., I): the codes reshaped to (batch·rows, I), the one-row form, and its
        output codes reshaped back to (batch, ..., O) (every row is independent; reshapes keep the codes)."""
        x, y = self.t(op.inputs[0]), self.t(op.output)
        xr = self.node("Reshape", [x.name, self.const("shape", np.array([-1, x.shape[-1]], np.int64))],
                       x.name + "_rows")
        yr = self.fresh(op.output + "_rows")
        self.rows[xr] = dataclasses.replace(x, name=xr, shape=x.shape[-1:])
        self.rows[yr] = dataclasses.replace(y, name=yr, shape=y.shape[-1:])
        self.emit(dataclasses.replace(op, inputs=[xr], output=yr))
        self.node("Reshape", [yr, self.const("shape", np.array([-1, *y.shape], np.int64))], op.output, out=op.output)

    def narrow_weighted(self, op: ir.Op) -> None:
        """Tiled narrow accumulator: one ConvInteger/MatMulInteger per tile, int64 saturate/wrap."""
        a, x = op.attrs, self.t(op.inputs[0])
        if x.bits > 8:
            raise ExportError(f"op {op.name!r}: a {x.bits}-bit input; ConvInteger/MatMulInteger take 8-bit inputs")
        self.check_qop_bits(op, x)
        w = a.weight.astype(np.int64)
        o = w.shape[0]
        k = int(np.prod(w.shape[1:]))
        tile = a.tile or k
        bits, mode = int(a.acc_bits), a.overflow
        lo, hi = acc_range(bits)
        per_tile = max_l1_bounds(w.reshape(w.shape[0], -1), x.magnitude, 0, tile)[1]
        pair_free = mode == "pairwise" and pairs_saturation_free(w.reshape(w.shape[0], -1), x.magnitude, bits)
        if per_tile > acc_range(32)[1]:
            raise ExportError(f"op {op.name!r} ({op.kind}): one tile of {tile} products can reach {per_tile} >= 2^31; "
                              "ConvInteger/MatMulInteger sum a tile in int32. Use the C backend or shorter tiles")
        if x.signed:
            raise ExportError(f"op {op.name!r}: signed activations; onnxruntime's ConvInteger/MatMulInteger take "
                              "uint8 inputs (train with act_symmetric=False)")
        xz = self.const(x.name + "_zp", np.array(x.zero_point, dtype=np.uint8))
        wz = self.const("w_zp128", np.uint8(128))
        chan_shape = (1, o, 1, 1) if op.kind == "conv2d" else (1, o)
        acc = self.node("Cast", [self.const(op.name + "_b", a.bias.astype(np.int64).reshape(chan_shape))],
                        op.name + "_acc0", to=TensorProto.INT64)
        if op.kind == "conv2d":
            src = x.name
            ph, pw = a.padding
            if ph or pw:
                src = self.node("Pad", [x.name, self.const("pads", np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64)), xz],
                                op.name + "_pad", mode="constant")
            g = int(a.groups)
            cg, kk = w.shape[1], w.shape[2] * w.shape[3]
        for t, k0 in enumerate(range(0, k, tile)):
            k1 = min(k0 + tile, k)
            mask = np.zeros(k, dtype=bool)
            mask[k0:k1] = True
            if op.kind == "conv2d":
                c0, c1 = k0 // kk, (k1 - 1) // kk
                wt = (w.reshape(o, -1) * mask).reshape(w.shape)[:, c0:c1 + 1]
                chans = (np.arange(g)[:, None] * cg + np.arange(c0, c1 + 1)[None, :]).reshape(-1)
                xt = src if len(chans) == g * cg else \
                    self.node("Gather", [src, self.const("chans", chans.astype(np.int64))], op.name + f"_x{t}", axis=1)
                wt_u8 = self.const(op.name + f"_w{t}", (wt + 128).astype(np.uint8))
                part = self.node("ConvInteger", [xt, wt_u8, xz, wz], op.name + f"_p{t}", strides=list(a.stride),
                                 dilations=list(a.dilation), group=g, kernel_shape=list(w.shape[2:]))
            else:
                xt = self.node("Slice", [x.name, self.const("s0", np.array([k0], np.int64)),
                                         self.const("s1", np.array([k1], np.int64)), self.const("ax1", np.array([1], np.int64))],
                               op.name + f"_x{t}")
                wt_u8 = self.const(op.name + f"_w{t}", (w[:, k0:k1].T + 128).astype(np.uint8))
                part = self.node("MatMulInteger", [xt, wt_u8, xz, wz], op.name + f"_p{t}")
            part = self.node("Cast", [part], op.name + f"_p{t}_64", to=TensorProto.INT64)
            if mode == "pairwise" and not pair_free:         # the pair's own saturation
                part = self.clamp64(part, lo, hi, op.name + f"_pair{t}")
            acc = self.node("Add", [acc, part], op.name + f"_acc{t + 1}")
            if mode in ("saturate", "pairwise"):
                acc = self.clamp64(acc, lo, hi, op.name + f"_sat{t + 1}")
        if mode == "wrap":   # wrapping after every tile equals wrapping once (arithmetic mod 2^bits)
            shifted = self.node("Sub", [acc, self.const("acc_lo", np.int64(lo))], op.name + "_wrap0")
            acc = self.node("Add", [self.node("Mod", [shifted, self.const("acc_mod", np.int64(2 ** bits))],
                                              op.name + "_wrap1", fmod=0), self.const("acc_lo", np.int64(lo))],
                            op.name + "_wrapped")
        bound = min(self.acc_bound(op, x, int32=False), hi + 1)
        self.finish_int(self.requant(acc, a.multiplier, a.shift, op.name, bound, op, chan_shape), op)

    def op_matmul(self, op: ir.Op) -> None:
        a, b = (self.t(i) for i in op.inputs)
        if op.attrs.acc_bits is not None:
            raise ExportError(f"op {op.name!r}: a narrow-accumulator activation×activation matmul is not exported; "
                              "set acc_bits=None for matmul layers (QConfig overrides)")
        if self.fmt == "qdq":
            v = self.node("MatMul", [self.dq(a.name), self.dq(b.name)], op.name + "_mm")
            self.q_clamped(v, op)
            return
        acc = self.node("MatMul", [self.to_i64(a.name), self.to_i64(b.name)], op.name + "_acc")
        bound = a.shape[-1] * a.magnitude * b.magnitude
        self.finish_int(self.requant(acc, op.attrs.multiplier, op.attrs.shift, op.name, bound, op), op)

    def op_add(self, op: ir.Op) -> None:
        at = op.attrs
        a, b = op.inputs
        if self.float_form(op):
            # power-of-two scale ratios: Sum (kept in float, QuantizeLinear rounds half to even: exact);
            # otherwise Add, which onnxruntime fuses into QLinearAdd (ties rounded up: rare then)
            pow2 = all(is_power_of_two(m) for m in (at.multiplier_a, at.multiplier_b, at.multiplier))
            kind = "Sum" if pow2 else "Add"
            v = self.node(kind, [self.dq(a), self.dq(b)], op.name + "_add")
            self.q_clamped(v, op)
            return
        sh = self.const("lshift", np.int64(1 << at.left_shift))
        bound_a, bound_b = (self.t(i).magnitude << at.left_shift for i in (a, b))
        ra = self.requant(self.node("Mul", [self.to_i64(a), sh], op.name + "_a"), at.multiplier_a, at.shift_a,
                          op.name + "_ra", bound_a, op)
        rb = self.requant(self.node("Mul", [self.to_i64(b), sh], op.name + "_b"), at.multiplier_b, at.shift_b,
                          op.name + "_rb", bound_b, op)
        s = self.node("Add", [ra, rb], op.name + "_sum")
        bound = requantized_bound(bound_a, at.multiplier_a, at.shift_a) + \
            requantized_bound(bound_b, at.multiplier_b, at.shift_b)
        self.finish_int(self.requant(s, at.multiplier, at.shift, op.name, bound, op), op)

    def op_mul(self, op: ir.Op) -> None:
        a, b = op.inputs
        if self.float_form(op):
            v = self.node("Mul", [self.dq(a), self.dq(b)], op.name + "_mul")
            self.q_clamped(v, op)
            return
        p = self.node("Mul", [self.to_i64(a), self.to_i64(b)], op.name + "_prod")
        bound = self.t(a).magnitude * self.t(b).magnitude
        self.finish_int(self.requant(p, op.attrs.multiplier, op.attrs.shift, op.name, bound, op), op)

    def op_concat(self, op: ir.Op) -> None:
        axis = op.attrs.axis + 1
        if self.float_form(op):
            v = self.node("Concat", [self.dq(i) for i in op.inputs], op.name + "_cat", axis=axis)
            self.q_clamped(v, op)
            return
        parts = [self.requant(self.to_i64(i), m, s, f"{op.name}_{k}", self.t(i).magnitude, op)
                 for k, (i, m, s) in enumerate(zip(op.inputs, op.attrs.multipliers, op.attrs.shifts))]
        self.finish_int(self.node("Concat", parts, op.name + "_cat", axis=axis), op)

    def op_requantize(self, op: ir.Op) -> None:
        """QDQ: DQ → Q where the op keeps the real value (a ReLU, a change of grid); DQ → Mul → Q where it
        scales it (x · c: the multiplier is c·S_x/S_y, not S_x/S_y)."""
        if self.float_form(op):
            x, y = self.t(op.inputs[0]), self.t(op.output)
            factor = op.attrs.multiplier * 2.0 ** (op.attrs.shift - 31) * y.scale / x.scale
            v = self.dq(x.name)
            if abs(factor - 1) > 1e-6:
                v = self.node("Mul", [v, self.const(op.name + "_c", np.float32(factor))], op.name + "_scaled")
            self.q_clamped(v, op)
            return
        self.finish_int(self.requant(self.to_i64(op.inputs[0]), op.attrs.multiplier, op.attrs.shift, op.name,
                                     self.t(op.inputs[0]).magnitude, op), op)

    def op_max_pool2d(self, op: ir.Op) -> None:
        a, x = op.attrs, self.t(op.inputs[0])
        pool = dict(kernel_shape=list(a.kernel), strides=list(a.stride), pads=[*a.padding, *a.padding],
                    ceil_mode=int(a.ceil_mode))
        if x.bits <= 8:
            self.node("MaxPool", [x.name], op.output, out=op.output, **pool)
            return
        v = self.node("MaxPool", [self.node("Cast", [x.name], x.name + "_f", to=TensorProto.FLOAT)],
                      op.name + "_mp", **pool)   # int16 codes are exact in float32
        self.node("Cast", [v], op.output, out=op.output, to=_onnx_dtype(self.t(op.output)))

    def op_avg_pool2d(self, op: ir.Op) -> None:
        a, x = op.attrs, self.t(op.inputs[0])
        if self.float_form(op):
            if a.global_pool:
                v = self.node("GlobalAveragePool", [self.dq(x.name)], op.name + "_gap")
            else:
                v = self.node("AveragePool", [self.dq(x.name)], op.name + "_ap", kernel_shape=list(a.kernel),
                              strides=list(a.stride), pads=[*a.padding, *a.padding], count_include_pad=1)
            self.q_clamped(v, op)
            return
        xi = self.to_i64(x.name)
        count = int(np.prod(x.shape[1:])) if a.global_pool else int(np.prod(a.kernel))
        bound = count * x.magnitude
        if a.global_pool and bound < 2 ** 24:   # integer sums below 2^24 are exact in float32
            xf = self.node("Cast", [xi], op.name + "_xf", to=TensorProto.FLOAT)
            sf = self.node("ReduceSum", [xf, self.const("axes23", np.array([2, 3], np.int64))], op.name + "_sumf",
                           keepdims=1)
            s = self.node("Cast", [sf], op.name + "_sum", to=TensorProto.INT64)
        elif a.global_pool:
            s = self.node("ReduceSum", [xi, self.const("axes23", np.array([2, 3], np.int64))], op.name + "_sum",
                          keepdims=1)
        else:   # window sums of integers below 2^24 are exact in float32
            if bound >= 2 ** 24:
                raise ExportError(f"op {op.name!r}: average-pooling window sums reach {bound} >= 2^24")
            c = x.shape[0]
            xf = self.node("Cast", [xi], op.name + "_xf", to=TensorProto.FLOAT)
            ones = self.const(op.name + "_ones", np.ones((c, 1, *a.kernel), np.float32))
            sf = self.node("Conv", [xf, ones], op.name + "_sumf", group=c, kernel_shape=list(a.kernel),
                           strides=list(a.stride), pads=[*a.padding, *a.padding])
            s = self.node("Cast", [sf], op.name + "_sum", to=TensorProto.INT64)
        self.finish_int(self.requant(s, a.multiplier, a.shift, op.name, bound, op), op)

    def op_adaptive_avg_pool2d(self, op: ir.Op) -> None:
        """Window sums as one float32 MatMul of the centred codes with the 0/1 window matrix (exact below
        2^24), then the per-position requantization in integers: the same codes in both formats."""
        a, x, y = op.attrs, self.t(op.inputs[0]), self.t(op.output)
        (C, H, W), (_, OH, OW) = x.shape, y.shape
        bound = max((he - hs) * (we - ws) for hs, he in zip(a.h_start, a.h_end)
                    for ws, we in zip(a.w_start, a.w_end)) * x.magnitude
        if bound >= 2 ** 24:
            raise ExportError(f"op {op.name!r}: adaptive-pooling window sums reach {bound} >= 2^24")
        rows = np.zeros((H, OH), np.float32)
        cols = np.zeros((W, OW), np.float32)
        for i, (hs, he) in enumerate(zip(a.h_start, a.h_end)):
            rows[hs:he, i] = 1
        for j, (ws, we) in enumerate(zip(a.w_start, a.w_end)):
            cols[ws:we, j] = 1
        xf = self.node("Cast", [self.to_i64(x.name)], op.name + "_xf", to=TensorProto.FLOAT)
        flat = self.node("Reshape", [xf, self.const("shape", np.array([-1, C, H * W], np.int64))], op.name + "_flat")
        sf = self.node("MatMul", [flat, self.const(op.name + "_windows", np.kron(rows, cols))], op.name + "_sumf")
        sf = self.node("Reshape", [sf, self.const("shape", np.array([-1, C, OH, OW], np.int64))], op.name + "_sum4")
        s = self.node("Cast", [sf], op.name + "_sum", to=TensorProto.INT64)
        self.finish_int(self.requant(s, a.multiplier, a.shift, op.name, bound, op, channel_shape=(OH, OW)), op)

    def op_lut(self, op: ir.Op) -> None:
        x, y = self.t(op.inputs[0]), self.t(op.output)
        table = np.asarray(op.attrs.table)
        idx = self.node("Cast", [x.name], op.name + "_idx", to=TensorProto.INT64)
        if x.qmin:
            idx = self.node("Sub", [idx, self.const("lut_qmin", np.int64(x.qmin))], op.name + "_idx0")
        tab = self.const(op.name + "_table", table.astype(_np_dtype(y)))
        self.node("Gather", [tab, idx], op.output, out=op.output, axis=0)

    def op_softmax(self, op: ir.Op) -> None:
        """`core.rowwise.softmax_rows` in int64 on the raw codes (the zero point cancels in mx − x).
        Hidden entries (causal, and the op's `visible` mask: one bool initializer broadcast like it)
        read qmin for the max (a visible one wins) and get e = 0; a row that sees nothing
        (causal with cols < rows) has Σe = 0, counted as 1 so that its r = div_round(0, 2^16) = 0."""
        a, x = op.attrs, self.t(op.inputs[0])
        shape = x.shape if len(x.shape) > 1 else (1, *x.shape)
        visible = softmax_visible(shape[-2], shape[-1], a.causal)
        if a.visible is not None:
            visible = visible & (np.asarray(a.visible) != 0)
        v = self.to_i64(x.name, minus_zp=False)
        mask = None if visible.all() else self.const(op.name + "_visible", visible)
        vm = v if mask is None else \
            self.node("Where", [mask, v, self.const("qmin64", np.int64(x.qmin))], op.name + "_vm")
        mx = self.reduce_last("ReduceMax", vm, op.name + "_max")
        table = np.append(np.asarray(a.table, np.int64), 0)
        dist = self.clamp64(self.node("Sub", [mx, v], op.name + "_d"), 0, len(table) - 1, op.name + "_dc")
        e = self.node("Gather", [self.const(op.name + "_exp", table), dist], op.name + "_e", axis=0)
        if mask is not None:
            e = self.node("Where", [mask, e, self.const("zero64", np.int64(0))], op.name + "_ev")
        total = self.reduce_last("ReduceSum", e, op.name + "_sum")
        if not visible.any(axis=-1).all():
            total = self.clamp64(total, 1, 2 ** 62, op.name + "_sum1")
        num = self.node("Mul", [e, self.const(op.name + "_R", np.int64(a.out_multiplier))], op.name + "_eR")
        den = self.node("Mul", [total, self.const("recip_unit", np.int64(1 << RECIP_BITS))], op.name + "_den")
        r = self.div_round(num, den, op.name + "_div")
        self.finish_int(r, op)

    def op_layer_norm(self, op: ir.Op) -> None:
        """`core.rowwise.layer_norm_rows` in int64 on the raw codes (the zero point cancels in N·x − Σx; not
        centred, N·x − N·zx), then requantize and clamp. ρ = 0 only when every d = 0 (and E = 0): dividing by max(ρ, 1) gives
        div_round(0, 1) = 0, the specified n."""
        a, x = op.attrs, self.t(op.inputs[0])
        n = x.shape[-1]
        w, b = np.asarray(a.weight, np.int64), np.asarray(a.bias, np.int64)
        sq_bound, bound = layer_norm_bounds(n, layer_norm_span(x.qmin, x.qmax, x.zero_point, a.centered), a.eps, w, b)
        if sq_bound >= 2 ** 62:
            raise ExportError(f"op {op.name!r} (layer_norm): Σd² over {n} {x.bits}-bit codes can reach 2^62; "
                              "the exact floor square root needs it below 2^62")
        v = self.to_i64(x.name, minus_zp=False)
        centre = self.reduce_last("ReduceSum", v, op.name + "_sx") if a.centered else \
            self.const(op.name + "_nz", np.int64(n * x.zero_point))
        d = self.node("Sub", [self.node("Mul", [v, self.const(op.name + "_n", np.int64(n))], op.name + "_nx"), centre],
                      op.name + "_d")
        ss = self.reduce_last("ReduceSum", self.node("Mul", [d, d], op.name + "_dd"), op.name + "_ss")
        rho = self.isqrt(self.node("Add", [ss, self.const(op.name + "_eps", np.int64(a.eps))], op.name + "_sse"),
                         op.name + "_rho")
        if a.eps < 1:
            rho = self.clamp64(rho, 1, 2 ** 62, op.name + "_rho1")
        dn = self.node("Mul", [d, self.const("norm_unit", np.int64(1 << NORM_BITS))], op.name + "_dn")
        normed = self.div_round(dn, rho, op.name + "_norm")
        acc = self.node("Add", [self.node("Mul", [normed, self.const(op.name + "_g", w)], op.name + "_ng"),
                                self.const(op.name + "_b", b)], op.name + "_acc")
        self.finish_int(self.requant(acc, a.multiplier, a.shift, op.name, bound, op), op)

    def op_embedding(self, op: ir.Op) -> None:
        """Rows of the table gathered by the id codes (zero point 0): int64 indices, ids past the table
        clamped to its last row by Min (exact on small non-negative int64), one Gather."""
        x, y = self.t(op.inputs[0]), self.t(op.output)
        table = np.asarray(op.attrs.table)
        if table.size and (int(table.min()) < y.qmin or int(table.max()) > y.qmax):
            raise ExportError(f"op {op.name!r} (embedding): table values {table.min()}..{table.max()} leave the "
                              f"output range {y.qmin}..{y.qmax}")
        idx = self.node("Cast", [x.name], op.name + "_idx", to=TensorProto.INT64)
        if len(table) - 1 < x.qmax:
            idx = self.node("Min", [idx, self.const(op.name + "_last", np.int64(len(table) - 1))], op.name + "_idx_min")
        tab = self.const(op.name + "_table", table.astype(_np_dtype(y)))
        self.node("Gather", [tab, idx], op.output, out=op.output, axis=0)

    def op_constant(self, op: ir.Op) -> None:
        """The codes as one (1, ...) initializer, Expanded to (batch, ...) with the input's batch size."""
        value = np.asarray(op.attrs.value).astype(_np_dtype(self.t(op.output)))
        if self.batch_shape is None:
            shape = self.node("Shape", [self.g.inputs[0]], "batch_shape_all")
            self.batch_shape = self.node("Slice", [shape, self.const("s0", np.array([0], np.int64)),
                                                   self.const("s1", np.array([1], np.int64))], "batch_shape")
        shape = self.node("Concat", [self.batch_shape, self.const("ones", np.ones(value.ndim, np.int64))],
                          op.name + "_shape", axis=0)
        self.node("Expand", [self.const(op.name + "_value", value[None]), shape], op.output, out=op.output)

    def op_reshape(self, op: ir.Op) -> None:
        self.node("Reshape", [op.inputs[0], self.const("shape", np.array([-1, *op.attrs.shape], np.int64))],
                  op.output, out=op.output)

    def op_transpose(self, op: ir.Op) -> None:
        self.node("Transpose", [op.inputs[0]], op.output, out=op.output, perm=[0] + [p + 1 for p in op.attrs.perm])

    def op_slice(self, op: ir.Op) -> None:
        a = op.attrs
        self.node("Slice", [op.inputs[0], self.const("st", np.array([a.start], np.int64)),
                            self.const("sp", np.array([a.stop], np.int64)),
                            self.const("ax", np.array([a.axis + 1], np.int64))], op.output, out=op.output)

    # ---- the model ------------------------------------------------------------------------
    def build(self, opset: int, metadata: dict) -> onnx.ModelProto:
        g = self.g
        for name in list(g.tensors) + ["input", "output"]:
            self.names.add(name)
        inputs, outputs = [], []
        for k, name in enumerate(g.inputs):
            t = g.tensor(name)
            fname = "input" if len(g.inputs) == 1 else f"input_{k}"
            inputs.append(helper.make_tensor_value_info(fname, TensorProto.FLOAT, ["batch", *t.shape]))
            self.q(fname, name)
        for op in g.ops:
            self.emit(op)
        for k, name in enumerate(g.outputs):
            t = g.tensor(name)
            fname = "output" if len(g.outputs) == 1 else f"output_{k}"
            s, z = self.scalar_qparams(t)
            self.node("DequantizeLinear", [name, s, z], fname, out=fname)
            outputs.append(helper.make_tensor_value_info(fname, TensorProto.FLOAT, ["batch", *t.shape]))
        graph = helper.make_graph(self.nodes, "qcompile", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qcompile",
                                  producer_version=metadata["qcompile_version"])
        model.ir_version = min(model.ir_version, 10)
        helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        return model


def to_onnx(graph: ir.Graph, format: str = "qdq", opset: int | None = None, weight_dtype: str = "auto") -> onnx.ModelProto:
    """The ONNX model of an integer IR graph (see the module docstring); checked with full_check."""
    ir.verify(graph)
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: choose 'qdq' (QuantizeLinear/DequantizeLinear around float ops) or "
                          "'qop' (QLinearConv and integer ops)")
    if weight_dtype not in ("auto", "int8", "uint8"):
        raise ExportError(f"weight_dtype={weight_dtype!r}: choose 'auto', 'int8' or 'uint8'")
    if weight_dtype == "auto":
        weight_dtype = "int8" if cpu_has_vnni() else "uint8"
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ExportError(f"opset={opset}: per-channel QuantizeLinear/DequantizeLinear need opset >= {MIN_OPSET}")
    wide = [t.name for t in graph.tensors.values() if t.bits > 8] + \
        [op.name for op in graph.ops if isinstance(op.attrs, ir.PerChannel) and op.attrs.weight.dtype != np.int8]
    if wide and opset < 21:
        raise ExportError(f"opset={opset}: tensors {wide[:3]} are 16-bit; 16-bit QuantizeLinear/DequantizeLinear "
                          "need opset >= 21")
    for op in graph.ops:   # conv2d's QLinearConv/Conv take float scales; linear has an 8-bit integer form
        integer_linear = op.kind == "linear" and op.attrs.weight.dtype == np.int8 and \
            graph.tensor(op.inputs[0]).bits <= 8
        if op.kind in ("conv2d", "linear") and op.attrs.weight_scale is None and not integer_linear:
            raise ExportError(f"op {op.name!r}: no weight_scale attr (lower the graph with qcompile.lower)")
    meta = dict(graph.meta)
    meta.setdefault("qcompile_version", "unknown")
    meta.update(format=format, weight_dtype=weight_dtype)
    model = _Builder(graph, format, weight_dtype, opset).build(opset, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def write(graph: ir.Graph, path, format: str = "qdq", opset: int | None = None, *,
          weight_dtype: str = "auto") -> onnx.ModelProto:
    """Write `graph` to `path` as ONNX (see `to_onnx`); returns the model."""
    model = to_onnx(graph, format, opset, weight_dtype)
    onnx.save(model, str(path))
    return model


def onnxruntime_session(path, threads: int = 1):
    """An onnxruntime CPU session with `threads` intra-op threads (`path`: a file or serialized model bytes)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
