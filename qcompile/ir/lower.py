"""Pass `lower`: a trained QuantizedGraphModule (eval mode, calibrated) → the integer IR.

Invariant of the result (`qcompile.ir.Graph`): every tensor is integer codes on a grid
(scale, zero point); every op is one of the IR kinds, its attrs an instance of the kind's
dataclass (`ir.SPEC`) holding integers only; the graph input is the codes of the first
activation quantizer's grid; training-only nodes (gradient quantizers, estimators,
regularizers, dropout) are gone.

How each trained-graph node becomes integer ops:
  - activation Quantizer: its eval grid qparams(estimator lo, hi). Right after a conv /
    linear / matmul it is that op's output grid (requantization inside the op); after
    anything else it is a `requantize` op (or nothing, when the grid is already the same).
  - conv / linear / matmul: weight codes of `weight_quant`'s grid (int8, int16 above 8 bits),
    bias round(b / (Sx·Sw[o])) never saturated (int32 where it fits, else int64; a code past
    2^53 is an error naming the layer), multiplier Sx·Sw[o]/Sy. A folded BatchNorm (BatchNormFold in
    eval) adds its per-channel shift to that bias.
  - relu, max-pool, reshapes, transpose, chunk/split, cat: stay on a grid (relu clamps at
    the zero point).
  - unary activations (relu6, hardswish, silu, sigmoid, hardsigmoid, gelu, tanh): a lookup table over the
    input codes, computed with the same torch functions the trained graph runs in eval, so the
    table equals the trained graph's result code for code.
  - a standalone BatchNorm (one that folds into no conv): a depthwise 1×1 conv2d with weight
    codes ±127 at scale |γ/σ|/127 and bias β − γμ/σ, i.e. per-channel requantization plus a
    per-channel offset, on an input of any width.
  - add, mul, cat, average pooling: fixed-point rescaling of each operand.
A float-region op (one with no quantizer right after it) writes straight onto the grid
of the quantizer it flows into when only grid-preserving ops lie between (relu, pooling by
max, reshapes, cat); otherwise onto a 16-bit intermediate grid covering the exact range
its operands' grids allow.
"""
from __future__ import annotations

import importlib.metadata
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile import ir
from qcompile.core.accumulator import overflow_free_scale
from qcompile.core.grids import bias_codes, code_range, max_code_magnitude, quantize_codes, storage_bits
from qcompile.core.requant import quantize_multiplier
from qcompile.core.rowwise import (
    NORM_BITS,
    exp_table,
    layer_norm_bounds,
    layer_norm_eps,
    layer_norm_span,
    softmax_multiplier,
)
from qcompile.errors import CalibrationError, QCompileError, UnsupportedOpError
from qcompile.passes.ops import family_of, op_name
from qcompile.train.estimators import minmax
from qcompile.train.attention import attention_softmax
from qcompile.train.log_barrier import LogBarrier
from qcompile.train.modes import EvalOutput
from qcompile.train.quantizers import BiasQuant, OverflowFreeWeights, Quantizer
from qcompile.train.tiled import NarrowAccOp

WIDE_BITS = 16
AFFINE_CODE = 127                 # |weight code| of a standalone BatchNorm's depthwise 1×1 conv (int8)
BIAS_CODE_EXACT = 2 ** 53         # float64 rounds b / (Sx·Sw) exactly below this
EXACT_ACCUMULATOR = {"acc_bits": None, "tile": None, "overflow": "saturate"}
# families a value flows through onto the grid of the quantizer after them (no arithmetic in eval)
SINK_FAMILIES = {"relu", "max_pool", "reshape", "transpose", "pad", "identity", "dropout", "cat"}


def eval_field(node: fx.Node, qm) -> fx.Node:
    """The node an EvalOutput call picks in eval: field `index` of the outputs it reads (a namedtuple's
    constructor call or a tuple of nodes)."""
    src = node.args[0]
    fields = src.args if isinstance(src, fx.Node) else src
    return fields[qm.get_submodule(node.target).index]


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows along one axis: output i reads [⌊i·size/out⌋, ⌈(i+1)·size/out⌉)."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


class LoweringError(QCompileError):
    """The trained graph cannot be lowered as it is (mode, calibration, an op, a shape)."""


# ---- values the lowering tracks per fx node ------------------------------------------
@dataclass
class Const:
    """A value known at lowering time (parameters, folded weights, shapes, python ints)."""
    value: object


@dataclass
class Weight:
    """Weight codes of a weight quantizer's grid: codes (O, ...) integers in the narrowest storage that
    holds them (int8 for an 8-bit grid: lowering keeps every layer's codes at once), scale (O,) float64,
    `bits` wide."""
    codes: np.ndarray
    scale: np.ndarray
    bits: int = 8

    @property
    def per_tensor(self) -> bool:
        return len(set(self.scale.tolist())) == 1


@dataclass
class Acc:
    """A conv / linear / matmul result waiting for its output quantizer."""
    kind: str
    node: fx.Node
    inputs: list
    attrs: dict                  # keyword arguments of the IR attrs class, with weight (a Weight) and as_1d
    bias: np.ndarray | None      # float, added before requantization (layer bias + folded BN)
    out_channels: int


@dataclass
class Input:
    """The float graph input, before its input quantizer."""
    node: fx.Node


@dataclass
class Pieces:
    """The result of chunk/split: (tensor name, axis, [(start, stop), ...])."""
    tensor: str
    axis: int
    bounds: list


def _t(name: str, shape, grid: "Grid") -> ir.Tensor:
    return ir.Tensor(name, tuple(int(d) for d in shape), grid.bits, grid.signed, grid.scale, grid.zero_point)


@dataclass(frozen=True)
class Grid:
    scale: float
    zero_point: int
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return ir.code_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return ir.code_range(self.bits, self.signed)[1]

    @property
    def real_range(self) -> tuple[float, float]:
        return self.scale * (self.qmin - self.zero_point), self.scale * (self.qmax - self.zero_point)


def _of(t: ir.Tensor) -> Grid:
    return Grid(t.scale, t.zero_point, t.bits, t.signed)


def wide_grid(lo: float, hi: float, scale_hint: float, pow2: bool) -> Grid:
    """A 16-bit signed grid covering [min(lo, 0), max(hi, 0)], as fine as `scale_hint` when it fits."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = code_range(WIDE_BITS, True)
    scale = max(scale_hint, (hi - lo) / (qmax - qmin), 1e-12)
    if pow2:
        scale = 2.0 ** math.ceil(math.log2(scale))
    zp = int(min(max(round(qmin - lo / scale), qmin), qmax))
    while scale * (qmax - zp) < hi * (1 - 1e-9) or scale * (qmin - zp) > lo * (1 - 1e-9):
        scale *= 2.0 if pow2 else 1.0 + 1e-6
        zp = int(min(max(round(qmin - lo / scale), qmin), qmax))
    return Grid(float(scale), zp, WIDE_BITS, True)


def _storage(codes: np.ndarray, narrowest: int) -> np.ndarray:
    """Integer codes in the narrowest of int8/int16/int32/int64, at least `narrowest` bits wide."""
    return codes.astype(f"int{storage_bits(int(codes.min(initial=0)), int(codes.max(initial=0)), narrowest)}")


SATURATING_MULTIPLIER = 2.0 ** 16


def _multiplier(real: float, where: str) -> tuple[int, int]:
    """(m, s) of a requantization multiplier whose result is clamped next to a code range of at most
    16 bits (every op's r, the add's final one included). A multiplier M >= 2^16 (an output grid
    collapsed to its SCALE_EPS floor, e.g. a layer whose outputs are all 0) becomes 2^16, which is
    exact: for an integer v != 0, |v|·M >= 2^16 > qmax − qmin with either multiplier, so
    clamp(z + round(v·M)) is qmin or qmax by the sign of v alone, and v = 0 gives z for both."""
    if not math.isfinite(real):
        raise LoweringError(f"node {where!r}: requantization multiplier {real} is not finite")
    return quantize_multiplier(min(real, SATURATING_MULTIPLIER))


def _quantizer_grid(q: Quantizer, path: str) -> Grid:
    """The eval-mode grid of a static activation quantizer (errors name the quantizer)."""
    if not q.enabled:
        raise LoweringError(f"quantizer {path!r} is disabled (qm.set_quantization(False)?): the graph is not "
                            "quantized there; enable quantization before lowering")
    if q.estimator.name == "current":
        raise LoweringError(f"quantizer {path!r} uses the 'current' (dynamic) range estimator: its grid depends on "
                            "each input, which has no integer form; train with act_range='hindsight', 'running', "
                            "'dsgc' or 'fixed'")
    if not bool(q.estimator.initialized):
        raise CalibrationError(f"quantizer {path!r} has no range yet: run qm.calibrate(batches) or train a few "
                               "steps before lowering")
    if q.axis is not None or q.estimator.lo.numel() != 1:
        raise LoweringError(f"activation quantizer {path!r} is per channel; lowering supports per-tensor activations")
    scale, zp = q.grid(q.estimator.lo, q.estimator.hi)
    qmin, qmax = q.qrange
    signed = qmin < 0
    return Grid(float(scale), int(zp), q.bits, signed)


class _Lowering:
    def __init__(self, qm: fx.GraphModule):
        self.qm = qm
        self.config = qm.config
        self.pow2 = bool(qm.config.pow2_scales)
        self.modules = dict(qm.named_modules())
        self.tensors: dict[str, ir.Tensor] = {}
        self.ops: list[ir.Op] = []
        self.producer: dict[str, ir.Op] = {}
        self.inputs: list[str] = []
        self.val: dict[fx.Node, object] = {}

    # ---- helpers ------------------------------------------------------------------
    def fail(self, node: fx.Node, what: str, cls=LoweringError):
        layer = node.meta.get("qc_layer")
        where = f"node {node.name!r} ({op_name(node, self.qm)}{', layer ' + repr(layer) if layer else ''})"
        raise cls(f"{where}: {what}")

    def module(self, node):
        return self.modules[node.target] if node.op == "call_module" else None

    def shape(self, node) -> tuple[int, ...]:
        tm = node.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            self.fail(node, "has no recorded shape (tensor_meta); compile with example inputs")
        return tuple(int(d) for d in tm.shape[1:])

    def tensor_of(self, node, arg) -> ir.Tensor:
        v = self.val[arg] if isinstance(arg, fx.Node) else Const(arg)
        if isinstance(v, str):
            return self.tensors[v]
        if isinstance(v, Input):
            self.fail(node, "reads the float graph input directly; only a quantizer may consume the input "
                      "(compile quantizes every conv/linear input; other uses of the input are not lowered)")
        if isinstance(v, Acc):
            self.fail(node, "reads a conv/linear/matmul result before its output quantizer")
        if isinstance(v, Weight):
            return self.constant(arg, v)
        self.fail(node, f"expects a quantized tensor operand, got {type(v).__name__}")

    def constant(self, node, w: Weight) -> ir.Tensor:
        """The codes of a parameter on its weight grid (a positional embedding, a class token) as a
        `constant` tensor, once per node: the parameter's leading dimension is the batch's (size 1)."""
        name = node.name + "_codes"
        if name not in self.tensors:
            if w.codes.ndim < 2 or w.codes.shape[0] != 1 or not w.per_tensor:
                self.fail(node, f"a parameter of shape {w.codes.shape} read as an activation: lowered only with a "
                          "leading batch dimension of 1 (broadcast over the batch) on a per-tensor grid")
            grid = Grid(float(w.scale[0]), 0, w.bits, True)
            self.add_tensor(name, w.codes.shape[1:], grid)
            self.emit("constant", node, [], name, value=_storage(w.codes[0], 8))
        return self.tensors[name]

    def add_tensor(self, name: str, shape, grid: Grid) -> str:
        self.tensors[name] = _t(name, shape, grid)
        return name

    def emit(self, kind: str, node: fx.Node, inputs: list[str], out: str, **attrs) -> str:
        op = ir.Op(kind, node.name, list(inputs), out, ir.SPEC[kind](**attrs))
        self.ops.append(op)
        self.producer[out] = op
        return out

    def consumers(self, name: str) -> set:
        """The fx nodes that read tensor `name` other than through an alias of it."""
        return {u for n, v in self.val.items() if v == name for u in n.users if self.val.get(u) != name}

    def clamp_attrs(self, grid: Grid) -> dict:
        return {"act_min": grid.qmin, "act_max": grid.qmax}

    def sink_grid(self, node: fx.Node) -> Grid | None:
        """The grid of the activation quantizer `node` flows into through grid-preserving ops only."""
        while len(node.users) == 1:
            user = next(iter(node.users))
            mod = self.module(user)
            if isinstance(mod, Quantizer):
                if mod.kind == "activation":
                    return _quantizer_grid(mod, user.target)
                if mod.kind == "gradient":
                    node = user
                    continue
                return None
            fam = family_of(user, self.qm)
            if fam is not None and fam.name in SINK_FAMILIES:
                node = user
                continue
            return None
        return None

    # ---- the walk --------------------------------------------------------------------
    def run(self) -> ir.Graph:
        outputs = []
        needed = self.needed()
        for node in self.qm.graph.nodes:
            if node.op == "output":
                outputs = self.lower_output(node)
            elif node in needed:
                self.val[node] = self.lower_node(node)
        return ir.Graph(self.inputs, outputs, self.tensors, self.ops)

    def needed(self) -> set:
        """The nodes the eval outputs depend on: through an EvalOutput only its field's (an auxiliary
        head's nodes are left out), and nothing that only a training-time output reads."""
        output = next(n for n in self.qm.graph.nodes if n.op == "output")
        seen, stack = set(), list(output.all_input_nodes)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            stack.extend([eval_field(node, self.qm)] if isinstance(self.module(node), EvalOutput)
                         else node.all_input_nodes)
        return seen

    def lower_eval_output(self, node):
        return self.val[eval_field(node, self.qm)]

    def lower_output(self, node) -> list[str]:
        args = node.args[0]
        items = list(args) if isinstance(args, (tuple, list)) else [args]
        names = []
        for a in items:
            t = self.tensor_of(node, a)
            names.append(t.name)
        return names

    def is_const(self, node) -> bool:
        """A parameter, or a call on constants alone (a function or method call with no tensor input: a
        constant made in forward)."""
        deps = node.all_input_nodes
        return node.op == "get_attr" or (node.op in ("call_function", "call_method") or deps != []) and \
            all(isinstance(self.val.get(d), Const) for d in deps) and not isinstance(self.module(node), Quantizer)

    def fold_const(self, node):
        if node.op == "get_attr":
            obj = self.qm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return Const(obj.detach() if isinstance(obj, torch.Tensor) else obj)
        args = fx.node.map_arg(node.args, lambda n: self.val[n].value)
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.val[n].value)
        with torch.no_grad():
            if node.op == "call_function":
                return Const(node.target(*args, **kwargs))
            if node.op == "call_method":
                return Const(getattr(args[0], node.target)(*args[1:], **kwargs))
            return Const(self.module(node)(*args, **kwargs))

    def is_weight_view(self, node) -> bool:
        """A grid-preserving op (other than expand over the batch) on a per-tensor weight grid's codes and
        constants: an indexed, reshaped or permuted parameter (a relative-position bias table)."""
        fam = family_of(node, self.qm)
        src = self.val.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        return (fam is not None and fam.grid_preserving and fam.name != "expand" and node.op != "call_module"
                and isinstance(src, Weight) and src.per_tensor
                and all(isinstance(self.val.get(d), (Const, Weight)) for d in node.all_input_nodes))

    def fold_weight_view(self, node) -> Weight:
        value = lambda n: torch.from_numpy(self.val[n].codes) if isinstance(self.val[n], Weight) else self.val[n].value
        args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
        codes = node.target(*args, **kwargs) if node.op == "call_function" else \
            getattr(args[0], node.target)(*args[1:], **kwargs)
        src = self.val[node.args[0]]
        codes = codes.numpy()
        return Weight(codes, np.full(codes.shape[0] if codes.ndim else 1, src.scale[0]), src.bits)

    def lower_node(self, node: fx.Node):
        if node.op == "placeholder":
            return Input(node)
        if isinstance(self.module(node), BiasQuant):    # lowering rounds the bias itself, on the eval grids
            return self.val[node.args[0]]
        if isinstance(self.module(node), LogBarrier):   # a training-only loss term: no integer form
            return None
        if self.is_const(node):
            return self.fold_const(node)
        if self.is_weight_view(node):
            return self.fold_weight_view(node)
        mod = self.module(node)
        if isinstance(mod, Quantizer):
            return self.lower_quantizer(node, mod)
        if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim"):
            x = node.args[0]
            shape = (self.batch_dim(x),) + self.shape(x)
            return Const(torch.Size(shape) if node.args[1] == "shape" else len(shape))
        if node.op == "call_method" and node.target in ("size", "dim"):
            x = node.args[0]
            shape = (self.batch_dim(x),) + self.shape(x)
            if node.target == "dim":
                return Const(len(shape))
            return Const(torch.Size(shape) if len(node.args) < 2 and "dim" not in node.kwargs
                         else shape[node.args[1] if len(node.args) > 1 else node.kwargs["dim"]])
        if isinstance(mod, NarrowAccOp):
            return self.lower_narrow(node, mod)
        fam = family_of(node, self.qm)
        rule = RULES.get(fam.name) if fam is not None else None
        if rule is None:
            self.fail(node, "has no integer form; supported ops are conv2d, linear, matmul, the activations "
                      "relu/relu6/hardswish/silu/sigmoid/hardsigmoid/gelu/tanh, softmax, LayerNorm, add, mul, cat, "
                      "max/avg pooling, BatchNorm, reshapes, transpose, chunk/split, indexing and dropout. Replace "
                      "the op or keep it out of the "
                      "deployed graph", UnsupportedOpError)
        return rule(self, node)

    # ---- one lowering rule per op family (qcompile.passes.ops.FAMILIES) ----------------------
    def lower_matmul(self, node):
        return Acc("matmul", node, [self.tensor_of(node, node.args[0]).name, self.tensor_of(node, node.args[1]).name],
                   {}, None, 0)

    def lower_identity(self, node):
        """Dropout, stochastic depth and nn.Identity: identity in eval."""
        if getattr(node.target, "__name__", "") == "stochastic_depth" and \
                (node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)):
            self.fail(node, "stochastic depth is called with training=True as a constant while the model was "
                      "compiled in eval mode, so it stays random in eval; pass the module's own mode")
        return self.val[node.args[0]]

    def lower_unary(self, node):
        return self.lower_lut(node, lambda v: node.target(v, **node.kwargs))

    def lower_batchnorm(self, node):
        """A BatchNorm that folds into no conv before it: the per-channel affine y = a_c·x + b_c with
        a = γ/√(σ²+ε), b = β − a·μ (in float64)."""
        bn = self.module(node)
        if bn.training:
            self.fail(node, "is in training mode; call qm.eval() before lowering")
        a = (bn.weight.double() if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)
        b = (bn.bias.double() if bn.bias is not None else 0.0) - a * bn.running_mean.double()
        return self.lower_affine(node, self.tensor_of(node, node.args[0]), a.detach().numpy(), b.detach().numpy())

    def lower_affine(self, node, t: ir.Tensor, a: np.ndarray, b: np.ndarray):
        """y = a_c·x + b_c per channel (axis 0 of the per-sample shape; a standalone BatchNorm, a LayerScale
        multiply): a depthwise 1×1 conv2d whose weight code is ±AFFINE_CODE at scale |a_c|/AFFINE_CODE with
        bias b_c, i.e. integer per-channel requantization plus a per-channel offset, on inputs of any width.
        (C, L) and (C,) inputs are reshaped to (C, 1, L) around it. Its multipliers Sx·|a_c|/(127·Sy) are
        not powers of two even with pow2_scales: no choice of grids makes an arbitrary a_c one."""
        shape, channels = tuple(self.shape(node)), t.shape[0]
        x = t.name
        if len(t.shape) != 3:
            x = self.add_tensor(node.name + "_in2d", (channels, 1, int(np.prod(t.shape[1:], dtype=np.int64))), _of(t))
            self.emit("reshape", node, [t.name], x, shape=self.tensors[x].shape)
        codes = (np.sign(a) * AFFINE_CODE).astype(np.int64).reshape(channels, 1, 1, 1)
        weight = Weight(codes, np.where(a != 0, np.abs(a) / AFFINE_CODE, 1.0))
        grid = self.sink_grid(node)
        if grid is None:
            lo, hi = _of(t).real_range
            ends = np.concatenate([a * lo + b, a * hi + b])
            grid = wide_grid(float(ends.min()), float(ends.max()), 0.0, self.pow2)
        acc = Acc("conv2d", node, [x], {"weight": weight, "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1),
                                        "groups": channels, **EXACT_ACCUMULATOR}, torch.from_numpy(b), channels)
        if x == t.name:
            return self.finish_acc(node, acc, grid, shape)
        out = self.finish_acc(node, acc, grid, self.tensors[x].shape, name=node.name + "_2d")
        self.add_tensor(node.name, shape, grid)
        return self.emit("reshape", node, [out], node.name, shape=shape)

    def per_channel(self, node, value, t: ir.Tensor) -> np.ndarray:
        """A constant multiplier broadcast over `t` as one value per channel (axis 0 of the per-sample
        shape), in float64: a number, or a tensor of shape (C, 1, ...) after leading ones."""
        v = torch.as_tensor(value).detach().double()
        rank = len(t.shape)
        while v.dim() > rank and v.shape[0] == 1:
            v = v[0]
        if v.numel() == 1:
            return np.full(t.shape[0], float(v.reshape(())))
        if v.dim() == rank and v.shape[0] == t.shape[0] and v[0].numel() == 1:
            return v.reshape(-1).numpy()
        self.fail(node, f"multiplies a tensor of per-sample shape {t.shape} by a constant of shape "
                  f"{tuple(torch.as_tensor(value).shape)}; only one value per channel (axis 1) is lowered")

    def lower_shape_arithmetic(self, node):
        self.fail(node, "integer arithmetic on a non-constant value")

    def batch_dim(self, node) -> int:
        return int(node.meta["tensor_meta"].shape[0])

    # ---- quantizers ---------------------------------------------------------------------
    def lower_quantizer(self, node, q: Quantizer):
        """A quantizer call's value: a weight's codes, an activation on its grid (a call with relu="before" /
        "after" rectifies its operand / result as a relu node would, `rectified`), a gradient quantizer's
        operand as it is."""
        relu = node.kwargs.get("relu")
        if relu == "before":
            src = self.rectified(node, self.tensor_of(node, node.args[0]), node.name + "_relu")
        else:
            src = self.val[node.args[0]]
        if relu == "after":
            return self.rectified(node, self.tensors[self.activation_codes(node, q, src)], node.name + "_relu")
        if q.kind == "gradient":
            return src
        if q.kind == "weight":
            if not isinstance(src, Const):
                self.fail(node, "weight quantizer input is not a constant (a parameter or a function of parameters)")
            w = src.value.float()
            if q.estimator.static:
                if not bool(q.estimator.initialized):
                    raise CalibrationError(f"weight quantizer {node.target!r} has no range yet: train or calibrate")
                lo, hi = q.estimator.lo, q.estimator.hi
            else:
                lo, hi = minmax(w, q.axis)
            scale, zp = q.grid(lo, hi)
            if isinstance(q, OverflowFreeWeights):
                scale = self.overflow_free(node, q, w, scale)
            if bool((zp != 0).any()):
                self.fail(node, "weight grid is not symmetric (zero point ≠ 0)")
            codes = quantize_codes(w, scale, zp, q.qrange, q.axis)
            scale = np.broadcast_to(scale.double().numpy(), (w.shape[0],)).copy()
            return Weight(_storage(codes.to(torch.int64).numpy(), 8), scale, q.bits)
        return self.activation_codes(node, q, src)

    def activation_codes(self, node, q: Quantizer, src) -> str:
        """The tensor of activation quantizer call `node` on `src` (the lowered value of its operand)."""
        grid = _quantizer_grid(q, node.target)
        shape = self.shape(node)
        if isinstance(src, Input):
            if self.inputs:
                self.fail(node, "a second quantizer of the graph input; the integer graph has one input grid")
            self.inputs.append(self.add_tensor(node.name, shape, grid))
            return node.name
        if isinstance(src, Acc):
            return self.finish_acc(node, src, grid, shape)
        if isinstance(src, str):
            t = self.tensors[src]
            if _of(t) == grid:
                return src
            return self.requantize(node, t, grid, shape)
        self.fail(node, f"quantizes a {type(src).__name__}, not a tensor")

    def overflow_free(self, node, q: OverflowFreeWeights, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The scale of an overflow-free weight grid for the eval grid of the layer's input, the quantizer
        whose buffers the node reads (what the weight quantizer computes in an eval forward)."""
        path = node.args[1].target.rpartition(".")[0]
        grid = _quantizer_grid(self.qm.get_submodule(path), path)
        bias = None if node.args[3] is None else self.val[node.args[3]].value
        return overflow_free_scale(w, scale, q.qrange, bias, torch.tensor(grid.scale),
                                   max_code_magnitude(q.input_qrange, grid.zero_point), q.acc_bits, q.pow2)

    def requantize(self, node, t: ir.Tensor, grid: Grid, shape, name=None) -> str:
        m, s = _multiplier(t.scale / grid.scale, node.name)
        out = self.add_tensor(name or node.name, shape, grid)
        return self.emit("requantize", node, [t.name], out, multiplier=m, shift=s, **self.clamp_attrs(grid))

    # ---- conv / linear / matmul -----------------------------------------------------------
    def lower_weighted(self, node):
        args = list(node.args) + [None] * (7 - len(node.args))
        x = self.tensor_of(node, args[0])
        w = self.val[args[1]]
        if not isinstance(w, Weight):
            self.fail(node, "weight is not the output of a weight quantizer")
        b = self.val[args[2]] if isinstance(args[2], fx.Node) else Const(args[2])
        bias = None if b.value is None else b.value.float()
        acc = EXACT_ACCUMULATOR    # a plain layer: narrow_acc made every narrow one a NarrowAccOp
        if node.target is F.linear:
            return Acc("linear", node, [x.name], {"weight": w, **acc}, bias, w.codes.shape[0])
        if isinstance(args[4], str):
            self.fail(node, f"padding={args[4]!r}; lower only numeric padding (set it explicitly in the model)")
        if node.target is F.conv1d:
            one = lambda v: (1 if v is None else int(v[0] if isinstance(v, (tuple, list)) else v))
            stride, padding, dilation = (1, one(args[3])), (0, one(args[4]) if args[4] else 0), (1, one(args[5]))
            return self.conv1d_as_2d(node, x, w, bias, {"stride": stride, "padding": padding, "dilation": dilation,
                                                         "groups": int(args[6] or 1), **acc})
        pair = lambda v: tuple(int(i) for i in (v if isinstance(v, (tuple, list)) else (v, v)))
        stride, padding, dilation = pair(args[3] or 1), args[4] or 0, pair(args[5] or 1)
        attrs = {"weight": w, "stride": stride, "padding": pair(padding), "dilation": dilation,
                 "groups": int(args[6] or 1), **acc}
        return Acc("conv2d", node, [x.name], attrs, bias, w.codes.shape[0])

    def conv1d_as_2d(self, node, x: ir.Tensor, w: Weight, bias, attrs: dict) -> Acc:
        """conv1d on (C, L) = reshape to (C, 1, L), conv2d with (1, k) kernels, reshape back (in finish_acc)."""
        if len(x.shape) != 2:
            self.fail(node, f"conv1d on per-sample shape {x.shape}; expected (C, L)")
        x2 = self.add_tensor(node.name + "_in2d", (x.shape[0], 1, x.shape[1]), _of(x))
        self.emit("reshape", node, [x.name], x2, shape=(x.shape[0], 1, x.shape[1]))
        w2 = Weight(w.codes.reshape(w.codes.shape[0], w.codes.shape[1], 1, -1), w.scale)
        return Acc("conv2d", node, [x2], {"weight": w2, "as_1d": True, **attrs}, bias, w.codes.shape[0])

    def lower_narrow(self, node, mod):
        """A NarrowAccOp(a, b, bias): the tiled narrow-accumulator conv2d / linear / matmul."""
        acc = {"acc_bits": mod.acc_bits, "tile": mod.tile, "overflow": mod.overflow}
        x = self.tensor_of(node, node.args[0])
        if mod.kind == "matmul":
            return Acc("matmul", node, [x.name, self.tensor_of(node, node.args[1]).name], acc, None, 0)
        w = self.val[node.args[1]]
        if not isinstance(w, Weight):
            self.fail(node, "weight is not the output of a weight quantizer")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = self.val[b].value.float() if isinstance(b, fx.Node) else None
        if mod.kind == "conv1d":   # NarrowAccOp keeps conv1d geometry as (1, k) pairs
            return self.conv1d_as_2d(node, x, w, bias, {"stride": tuple(mod.stride), "padding": tuple(mod.padding),
                                                         "dilation": tuple(mod.dilation), "groups": int(mod.groups),
                                                         **acc})
        if mod.kind == "linear":
            return Acc("linear", node, [x.name], {"weight": w, **acc}, bias, w.codes.shape[0])
        pair = lambda v: tuple(int(i) for i in (v if isinstance(v, (tuple, list)) else (v, v)))
        attrs = {"weight": w, "stride": pair(mod.stride), "padding": pair(mod.padding),
                 "dilation": pair(mod.dilation), "groups": int(mod.groups), **acc}
        return Acc("conv2d", node, [x.name], attrs, bias, w.codes.shape[0])

    def lower_bn_fold(self, node):
        mod = self.module(node)
        acc = self.val[node.args[0]]
        if not isinstance(acc, Acc):
            self.fail(node, "BatchNormFold must directly follow its conv/linear")
        if mod.training:
            self.fail(node, "is in training mode; call qm.eval() before lowering")
        bias = self.val[node.args[4]].value.float()     # the folded_bias node (its BiasQuant is transparent)
        total = bias if acc.bias is None else acc.bias + bias
        return Acc(acc.kind, acc.node, acc.inputs, acc.attrs, total, acc.out_channels)

    def finish_acc(self, node, acc: Acc, grid: Grid, shape, name: str | None = None) -> str:
        """Emit the conv/linear/matmul writing onto the output quantizer's grid."""
        x = self.tensors[acc.inputs[0]]
        if acc.attrs.get("as_1d"):
            out = None
        else:
            out = self.add_tensor(name or node.name, shape, grid)
        if acc.kind == "matmul":
            b = self.tensors[acc.inputs[1]]
            m, s = _multiplier(x.scale * b.scale / grid.scale, node.name)
            return self.emit("matmul", acc.node, acc.inputs, out, multiplier=m, shift=s,
                             acc_bits=acc.attrs.get("acc_bits"), tile=acc.attrs.get("tile"),
                             overflow=acc.attrs.get("overflow", "saturate"), **self.clamp_attrs(grid))
        w: Weight = acc.attrs["weight"]
        if acc.attrs.get("as_1d"):
            o, length = shape
            conv_out = self.finish_acc(node, Acc(acc.kind, acc.node, acc.inputs,
                                                 {k: v for k, v in acc.attrs.items() if k != "as_1d"},
                                                 acc.bias, acc.out_channels), grid, (o, 1, length),
                                       name=node.name + "_2d")
            out = self.add_tensor(node.name, shape, grid)
            return self.emit("reshape", node, [conv_out], out, shape=tuple(shape))
        in_scale = x.scale * w.scale                       # (O,) float64
        ms = [_multiplier(float(r), node.name) for r in in_scale / grid.scale]
        bias = np.zeros(acc.out_channels, dtype=np.int64)
        if acc.bias is not None:
            codes, scale = bias_codes(acc.bias, torch.tensor(x.scale), torch.from_numpy(w.scale))
            if not bool((codes.abs() < BIAS_CODE_EXACT).all()):
                worst = int(codes.abs().argmax()) if codes.dim() else 0
                self.fail(node, f"bias {float(acc.bias.reshape(-1)[worst]):.4g} of output channel {worst} needs "
                          f"{float(codes.abs().max()):.3g} codes at scale Sx·Sw = {float(scale.reshape(-1)[worst]):.3g}"
                          " (>= 2^53, past what float64 rounds exactly): the input or weight range collapsed; "
                          "check the ranges of its quantizers")
            bias = codes.numpy().astype(np.int64)
        attrs = {k: v for k, v in acc.attrs.items() if k != "weight"}
        return self.emit(acc.kind, acc.node, acc.inputs, out, weight=_storage(w.codes, 8),
                         bias=_storage(bias, 32),
                         weight_scale=tuple(float(v) for v in w.scale),
                         multiplier=np.array([m for m, _ in ms], dtype=np.int64),
                         shift=np.array([s for _, s in ms], dtype=np.int64), **attrs, **self.clamp_attrs(grid))

    # ---- grid-preserving ops --------------------------------------------------------------
    def lower_relu(self, node):
        return self.rectified(node, self.tensor_of(node, node.args[0]), node.name)

    def rectified(self, node, t: ir.Tensor, name: str) -> str:
        """relu of tensor `t` for `node` (a relu, or a quantizer call with `relu=`), on t's grid: a clamp at
        its zero point, folded into the table or clamp of the op that made t where no other node reads t,
        else a requantize op writing tensor `name`."""
        grid = _of(t)
        op = self.producer.get(t.name)
        if op is not None and self.consumers(t.name) <= {node}:
            if isinstance(op.attrs, ir.Lut):
                op.attrs.table = np.maximum(op.attrs.table, grid.zero_point)
                return t.name
            if isinstance(op.attrs, ir.Clamp):
                op.attrs.act_min = max(op.attrs.act_min, grid.zero_point)
                return t.name
        out = self.add_tensor(name, self.shape(node), grid)
        return self.emit("requantize", node, [t.name], out, multiplier=1 << 30, shift=1,
                         act_min=max(grid.qmin, grid.zero_point), act_max=grid.qmax)

    def lower_reshape(self, node):
        t = self.tensor_of(node, node.args[0])
        if self.batch_dim(node) != self.batch_dim(node.args[0]):
            self.fail(node, "changes the batch dimension; the integer graph keeps samples independent")
        shape = self.shape(node)
        if shape == t.shape:
            return t.name
        out = self.add_tensor(node.name, shape, _of(t))
        return self.emit("reshape", node, [t.name], out, shape=shape)

    def dim_arg(self, node, d, ndim_with_batch: int) -> int:
        d = int(d) % ndim_with_batch
        if d == 0:
            self.fail(node, "operates on the batch dimension; the integer graph keeps samples independent")
        return d - 1

    def lower_transpose(self, node):
        t = self.tensor_of(node, node.args[0])
        nd = len(t.shape) + 1
        if node.target in (torch.transpose, "transpose", torch.swapaxes, "swapaxes"):
            a, b = (self.dim_arg(node, d, nd) for d in node.args[1:3])
            perm = list(range(nd - 1))
            perm[a], perm[b] = perm[b], perm[a]
        else:
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            full = [int(d) % nd for d in dims]
            if full[0] != 0:
                self.fail(node, "moves the batch dimension")
            perm = [d - 1 for d in full[1:]]
        out = self.add_tensor(node.name, self.shape(node), _of(t))
        return self.emit("transpose", node, [t.name], out, perm=tuple(perm))

    def lower_split(self, node):
        t = self.tensor_of(node, node.args[0])
        nd = len(t.shape) + 1
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        axis = self.dim_arg(node, dim, nd)
        size = t.shape[axis]
        arg = node.args[1]
        if node.target in (torch.chunk, "chunk"):
            step = -(-size // int(arg))
            bounds = [(i, min(i + step, size)) for i in range(0, size, step)]
        elif isinstance(arg, int):
            bounds = [(i, min(i + arg, size)) for i in range(0, size, arg)]
        else:
            starts = np.cumsum([0] + list(arg))
            bounds = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        return Pieces(t.name, axis, bounds)

    def lower_getitem(self, node):
        if isinstance(self.module(node.args[0]), NarrowAccOp):   # (y, exact): the exact sum only feeds the barrier
            return self.val[node.args[0]] if node.args[1] == 0 else None
        src = self.val[node.args[0]]
        if isinstance(src, Pieces):
            start, stop = src.bounds[node.args[1]]
            t = self.tensors[src.tensor]
            out = self.add_tensor(node.name, self.shape(node), _of(t))
            return self.emit("slice", node, [t.name], out, axis=src.axis, start=start, stop=stop)
        return self.lower_index(node)

    def lower_index(self, node):
        """x[:, ...]: the batch axis whole, then integers (a slice of one, its axis dropped) and unit-step
        slices: `slice` ops and a reshape."""
        t = self.tensor_of(node, node.args[0])
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if not index or index[0] != slice(None) or Ellipsis in index or None in index:
            self.fail(node, f"indexes a tensor with {index!r}: lowered only x[:, i or a:b, ...] (the batch whole)")
        name, shape = t.name, list(t.shape)
        for axis, item in enumerate(index[1:]):
            if isinstance(item, int):
                start, stop = item % shape[axis], item % shape[axis] + 1
            elif isinstance(item, slice) and item.step in (None, 1):
                start, stop, _ = item.indices(shape[axis])
            else:
                self.fail(node, f"index {item!r} on axis {axis + 1}: only integers and unit-step slices are lowered")
            if (start, stop) == (0, shape[axis]):
                continue
            shape[axis] = stop - start
            name = self.emit("slice", node, [name], self.add_tensor(f"{node.name}_{axis}", shape, _of(t)),
                             axis=axis, start=start, stop=stop)
        out_shape = self.shape(node)
        if tuple(out_shape) == tuple(self.tensors[name].shape):
            return name
        return self.emit("reshape", node, [name], self.add_tensor(node.name, out_shape, _of(t)), shape=out_shape)

    def lower_expand(self, node):
        """x.expand(batch, ...) of a parameter or a tensor: only the batch axis may grow (per sample it is
        the identity)."""
        src = self.val[node.args[0]]
        before = node.args[0].meta["tensor_meta"].shape
        if tuple(before[1:]) != tuple(node.meta["tensor_meta"].shape[1:]):
            self.fail(node, f"expands {tuple(before)} to {tuple(node.meta['tensor_meta'].shape)}: only the batch axis "
                      "may grow")
        return src

    def lower_pad(self, node):
        """F.pad with zeros (constant mode, value 0: the zero point): per padded axis, a concat of the
        tensor with `constant` blocks of zero-point codes before and after it."""
        t = self.tensor_of(node, node.args[0])
        pads = [int(p) for p in node.args[1]]
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        if mode != "constant" or value not in (None, 0) or min(pads, default=0) < 0 or len(pads) // 2 > len(t.shape):
            self.fail(node, f"pads {pads} with mode {mode!r}, value {value!r}: lowered only zero padding "
                      "(constant mode, value 0) of per-sample axes")
        grid, identity = _of(t), _multiplier(1.0, node.name)
        name, shape = t.name, list(t.shape)
        for i in range(len(pads) // 2):
            axis, sizes = len(shape) - 1 - i, pads[2 * i:2 * i + 2]
            if not any(sizes):
                continue
            parts = []
            for size, where in zip(sizes, ("before", "after")):
                if size:
                    block = shape[:axis] + [size] + shape[axis + 1:]
                    parts.append(self.emit("constant", node, [], self.add_tensor(f"{node.name}_{axis}_{where}", block, grid),
                                           value=_storage(np.full(block, grid.zero_point), 8)))
            parts.insert(1 if sizes[0] else 0, name)
            shape[axis] += sum(sizes)
            name = self.emit("concat", node, parts, self.add_tensor(f"{node.name}_{axis}", shape, grid), axis=axis,
                             multipliers=[identity[0]] * len(parts), shifts=[identity[1]] * len(parts),
                             **self.clamp_attrs(grid))
        return name

    def pool_args(self, node, mod, names, defaults):
        if mod is not None:
            vals = [getattr(mod, n) for n in names]
        else:
            vals = list(node.args[1:]) + [None] * len(names)
            vals = [node.kwargs.get(n, vals[i]) for i, n in enumerate(names)]
        vals = [d if v is None else v for v, d in zip(vals, defaults)]
        return vals

    def lower_maxpool(self, node):
        t = self.tensor_of(node, node.args[0])
        mod = self.module(node)
        pair = lambda v: tuple(int(i) for i in (v if isinstance(v, (tuple, list)) else (v, v)))
        if node.target is F.max_pool1d or isinstance(mod, nn.MaxPool1d):
            self.fail(node, "1-d max pooling has no integer form here")
        if isinstance(mod, nn.AdaptiveMaxPool2d) or node.target is F.adaptive_max_pool2d:
            out_hw = self.shape(node)[1:]
            k = self.adaptive_kernel(node, t.shape[1:], out_hw)
            kernel, stride, padding, dilation, ceil = k, k, (0, 0), (1, 1), False
        else:
            kernel, stride, padding, dilation, ceil = self.pool_args(
                node, mod, ["kernel_size", "stride", "padding", "dilation", "ceil_mode"], [None, None, 0, 1, False])
            stride = stride if stride not in (None, []) else kernel
            kernel, stride, padding, dilation = pair(kernel), pair(stride), pair(padding), pair(dilation)
        if dilation != (1, 1):
            self.fail(node, "dilated max pooling has no integer form here")
        out = self.add_tensor(node.name, self.shape(node), _of(t))
        return self.emit("max_pool2d", node, [t.name], out, kernel=kernel, stride=stride, padding=padding,
                         ceil_mode=bool(ceil))

    def adaptive_kernel(self, node, in_hw, out_hw):
        if any(i % o for i, o in zip(in_hw, out_hw)):
            self.fail(node, f"adaptive pooling {tuple(in_hw)} → {tuple(out_hw)} with uneven windows; use input sizes "
                      "that divide evenly")
        return tuple(i // o for i, o in zip(in_hw, out_hw))

    def lower_avgpool(self, node):
        t = self.tensor_of(node, node.args[0])
        mod = self.module(node)
        in_shape, out_shape = t.shape, self.shape(node)
        if len(in_shape) != 3:
            self.fail(node, f"pooling over per-sample shape {in_shape}; only (C, H, W) is lowered")
        pair = lambda v: tuple(int(i) for i in (v if isinstance(v, (tuple, list)) else (v, v)))
        reshape_after = None
        if node.target in ("mean", torch.mean):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = sorted(int(d) % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims]))
            if dims != [2, 3]:
                self.fail(node, f"mean over dims {dims}; only the spatial mean (dims 2, 3) is lowered")
            kernel, stride, padding, glob = tuple(in_shape[1:]), tuple(in_shape[1:]), (0, 0), True
            if out_shape != (in_shape[0], 1, 1):
                reshape_after = out_shape
        elif isinstance(mod, nn.AdaptiveAvgPool2d) or node.target is F.adaptive_avg_pool2d:
            if any(i % o for i, o in zip(in_shape[1:], out_shape[1:])):
                return self.lower_adaptive_avgpool(node, t, out_shape)
            k = self.adaptive_kernel(node, in_shape[1:], out_shape[1:])
            glob = tuple(out_shape[1:]) == (1, 1)
            kernel, stride, padding = k, k, (0, 0)
        else:
            kernel, stride, padding, ceil, include_pad, divisor = self.pool_args(
                node, mod, ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"],
                [None, None, 0, False, True, None])
            stride = stride if stride not in (None, []) else kernel
            kernel, stride, padding = pair(kernel), pair(stride), pair(padding)
            if ceil or divisor is not None or (not include_pad and padding != (0, 0)):
                self.fail(node, "average pooling with ceil_mode, divisor_override or count_include_pad=False "
                          "has no integer form here")
            glob = False
        count = kernel[0] * kernel[1]
        grid = self.sink_grid(node) if reshape_after is None else None
        grid = grid or _of(t)
        m, s = _multiplier(t.scale / (count * grid.scale), node.name)
        pooled_shape = (in_shape[0], 1, 1) if reshape_after is not None else out_shape
        name = node.name if reshape_after is None else node.name + "_pooled"
        out = self.add_tensor(name, pooled_shape, grid)
        self.emit("avg_pool2d", node, [t.name], out, kernel=kernel, stride=stride, padding=padding,
                  global_pool=glob, multiplier=m, shift=s, **self.clamp_attrs(grid))
        if reshape_after is None:
            return out
        self.add_tensor(node.name, reshape_after, grid)
        return self.emit("reshape", node, [out], node.name, shape=tuple(reshape_after))

    def lower_adaptive_avgpool(self, node, t: ir.Tensor, out_shape):
        """Adaptive average pooling whose windows are uneven, overlapping or repeated (an output
        larger than its input): PyTorch's windows, one requantization per output position."""
        rows, cols = (adaptive_windows(i, o) for i, o in zip(t.shape[1:], out_shape[1:]))
        grid = self.sink_grid(node) or _of(t)
        ms = [_multiplier(t.scale / ((he - hs) * (we - ws) * grid.scale), node.name)
              for hs, he in rows for ws, we in cols]
        out = self.add_tensor(node.name, out_shape, grid)
        return self.emit("adaptive_avg_pool2d", node, [t.name], out,
                         h_start=tuple(r[0] for r in rows), h_end=tuple(r[1] for r in rows),
                         w_start=tuple(c[0] for c in cols), w_end=tuple(c[1] for c in cols),
                         multiplier=np.array([m for m, _ in ms], np.int64), shift=np.array([s for _, s in ms], np.int64),
                         **self.clamp_attrs(grid))

    # ---- lookup tables ----------------------------------------------------------------------
    def lower_lut(self, node, fn):
        t = self.tensor_of(node, node.args[0])
        codes = torch.arange(t.qmin, t.qmax + 1, dtype=torch.float32)
        x = (codes - t.zero_point) * torch.tensor(t.scale, dtype=torch.float32)
        with torch.no_grad():
            y = fn(x)
        grid = self.sink_grid(node)
        if grid is None:
            lo, hi = float(y.min()), float(y.max())
            grid = wide_grid(lo, hi, 0.0, self.pow2)
        table = quantize_codes(y, torch.tensor(grid.scale), torch.tensor(float(grid.zero_point)), (grid.qmin, grid.qmax))
        out = self.add_tensor(node.name, self.shape(node), grid)
        return self.emit("lut", node, [t.name], out, table=table.to(torch.int64).numpy())

    # ---- embedding / softmax / LayerNorm ---------------------------------------------------------
    def lower_embedding(self, node):
        """F.embedding(ids, weight codes): the graph input is the token ids, an unsigned grid of scale 1
        (8 bits for up to 256 rows, else 16); the result is on the weight's grid."""
        src, w = self.val[node.args[0]], self.val[node.args[1]]
        if not isinstance(src, Input):
            self.fail(node, "reads ids that are not the graph input; lowered only as the model's first op")
        if not isinstance(w, Weight) or not w.per_tensor:
            self.fail(node, "weight is not the output of a per-tensor weight quantizer")
        if self.inputs:
            self.fail(node, "a second graph input; the integer graph has one input")
        vocab = w.codes.shape[0]
        if vocab > 1 << 16:
            self.fail(node, f"{vocab} rows: token ids are at most 16 bits")
        ids = self.add_tensor(src.node.name, self.shape(src.node), Grid(1.0, 0, 8 if vocab <= 256 else 16, False))
        self.inputs.append(ids)
        out = self.add_tensor(node.name, self.shape(node), Grid(float(w.scale[0]), 0, w.bits, True))
        return self.emit("embedding", node, [ids], out, table=_storage(w.codes, 8))

    # ---- softmax / LayerNorm --------------------------------------------------------------------
    def out_grid(self, node) -> Grid:
        grid = self.sink_grid(node)
        if grid is None:
            self.fail(node, "has no output quantizer (compile puts one right after softmax and LayerNorm)")
        return grid

    def lower_softmax(self, node):
        """softmax over the last axis: attention_softmax(x, scale, causal, visible), F.softmax(x, -1),
        x.softmax(-1). A `visible` mask loses its leading axes of size 1 past the per-sample rank."""
        t = self.tensor_of(node, node.args[0])
        visible = None
        if node.target is attention_softmax:
            args = list(node.args) + [node.kwargs.get("visible")] * (4 - len(node.args))
            if isinstance(args[3], fx.Node) and not isinstance(self.val.get(args[3]), Const):
                self.fail(node, "its attention mask follows the input; a constant mask (a buffer, or one made "
                          "without the input) is lowered")
            scale, causal, visible = (self.val[a].value if isinstance(a, fx.Node) else a for a in args[1:4])
            scale, causal = float(scale), bool(causal)
        else:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim is None or int(dim) % (len(t.shape) + 1) != len(t.shape):
                self.fail(node, f"softmax over dim {dim}: lowered over the last axis only")
            scale, causal = 1.0, False
        if visible is not None:
            visible = visible.to(torch.int8).numpy()
            while visible.ndim > len(t.shape) and visible.shape[0] == 1:
                visible = visible[0]
            if visible.ndim > len(t.shape):
                self.fail(node, f"visible mask of shape {visible.shape} spans the batch axis of {t.shape}")
        grid = self.out_grid(node)
        out = self.add_tensor(node.name, self.shape(node), grid)
        return self.emit("softmax", node, [t.name], out, table=exp_table(t.scale * scale),
                         out_multiplier=softmax_multiplier(grid.scale), causal=causal, visible=visible,
                         **self.clamp_attrs(grid))

    def norm_args(self, node):
        """(x, normalized shape, weight, bias, eps, centred, unit/S_g, E) of F.layer_norm, F.rms_norm or
        F.normalize (p = 2 over the last axis) (`qcompile.core.rowwise`)."""
        args = list(node.args) + [None] * 5
        x = self.tensor_of(node, args[0])
        n = x.shape[-1]
        if node.target is F.normalize:
            p, dim = node.kwargs.get("p", args[1] if args[1] is not None else 2.0), node.kwargs.get("dim", args[2])
            eps = node.kwargs.get("eps", args[3] if args[3] is not None else 1e-12)
            if float(p) != 2.0 or dim is None or int(dim) % (len(x.shape) + 1) != len(x.shape):
                self.fail(node, f"F.normalize with p={p}, dim={dim}: lowered for p=2 over the last axis only")
            return x, (n,), None, None, False, 1.0, int(round(float(eps) ** 2 * n * n / x.scale ** 2))
        if node.target is F.rms_norm:
            eps = node.kwargs.get("eps", args[3])
            eps = torch.finfo(torch.float32).eps if eps is None else float(eps)
            return x, tuple(args[1]), args[2], None, False, math.sqrt(n), layer_norm_eps(eps, n, x.scale)
        eps = node.kwargs.get("eps", args[4] if args[4] is not None else 1e-5)
        return x, tuple(args[1]), args[2], args[3], True, math.sqrt(n), layer_norm_eps(float(eps), n, x.scale)

    def lower_layer_norm(self, node):
        """F.layer_norm / F.rms_norm / F.normalize over the last axis; the weight codes from the weight
        quantizer, the bias rounded onto the unit S_g·√N / 2^NORM_BITS (F.normalize: S_g / 2^NORM_BITS) of
        the op's accumulator (`qcompile.core.rowwise`)."""
        x, shape, w, b, centered, unit, eps_code = self.norm_args(node)
        n = x.shape[-1]
        if shape != (n,):
            self.fail(node, f"LayerNorm over {shape}: lowered over the last axis only (normalized_shape = ({n},))")
        if layer_norm_bounds(n, layer_norm_span(x.qmin, x.qmax, x.zero_point, centered), eps_code, 0, 0)[0] >= 1 << 62:
            self.fail(node, f"LayerNorm over {n} elements of {x.bits} bits: Σd² + eps can pass 2^62 "
                      "(qcompile.core.rowwise); narrower input grids or rows fit")
        weight = self.val[w] if w is not None else Weight(np.ones(n, np.int64), np.ones(1))
        if not isinstance(weight, Weight):
            self.fail(node, "weight is not the output of a weight quantizer")
        unit = float(weight.scale[0]) * unit / 2 ** NORM_BITS
        beta = np.zeros(n) if b is None else self.val[b].value.double().numpy()
        grid = self.out_grid(node)
        m, s = _multiplier(unit / grid.scale, node.name)
        out = self.add_tensor(node.name, self.shape(node), grid)
        return self.emit("layer_norm", node, [x.name], out, weight=_storage(weight.codes.reshape(n), 8),
                         bias=np.round(beta / unit).astype(np.int64), eps=eps_code, multiplier=m, shift=s,
                         centered=centered, **self.clamp_attrs(grid))

    # ---- add / mul / cat ----------------------------------------------------------------------
    def lower_scaled(self, node, x, c: float):
        """x · c for a python number c > 0 (attention's q · d^-½): the same codes on a grid c times
        coarser, or requantized onto the grid of the quantizer it flows into."""
        t = self.tensor_of(node, x)
        grid = self.sink_grid(node) or Grid(t.scale * c, t.zero_point, t.bits, t.signed)
        m, s = _multiplier(t.scale * c / grid.scale, node.name)
        out = self.add_tensor(node.name, self.shape(node), grid)
        return self.emit("requantize", node, [t.name], out, multiplier=m, shift=s, **self.clamp_attrs(grid))

    def same_rank(self, node, t: ir.Tensor, rank: int) -> ir.Tensor:
        """`t` with leading 1s up to `rank` per-sample axes (numpy broadcasting of add/mul operands,
        made explicit so that every backend aligns the batch axis)."""
        if len(t.shape) == rank:
            return t
        name = f"{t.name}_as{rank}d"
        if name not in self.tensors:
            shape = (1,) * (rank - len(t.shape)) + tuple(t.shape)
            self.emit("reshape", node, [t.name], self.add_tensor(name, shape, _of(t)), shape=shape)
        return self.tensors[name]

    def lower_binary(self, node):
        numbers = [a for a in node.args[:2] if isinstance(a, (int, float))]
        if node.target is operator.mul and len(numbers) == 1 and numbers[0] > 0:
            return self.lower_scaled(node, next(a for a in node.args[:2] if isinstance(a, fx.Node)), float(numbers[0]))
        if not all(isinstance(a, fx.Node) for a in node.args[:2]):
            self.fail(node, "adds a python constant, or multiplies by one ≤ 0; only tensor ⊕ tensor and "
                      "x · c with c > 0 are lowered")
        consts = [isinstance(self.val.get(a), Const) for a in node.args[:2]]
        if node.target is operator.mul and consts.count(True) == 1:    # a LayerScale: per channel
            c, x = node.args[:2] if consts[0] else node.args[1::-1]
            t = self.tensor_of(node, x)
            a = self.per_channel(node, self.val[c].value, t)
            return self.lower_affine(node, t, a, np.zeros_like(a))
        a, b = (self.same_rank(node, self.tensor_of(node, x), len(self.shape(node))) for x in node.args[:2])
        (alo, ahi), (blo, bhi) = _of(a).real_range, _of(b).real_range
        shape = self.shape(node)
        if node.target is operator.add:
            grid = self.sink_grid(node) or wide_grid(alo + blo, ahi + bhi, min(a.scale, b.scale), self.pow2)
            left = 20 if max(a.bits, b.bits) <= 8 else 12
            twice_max = 2 * max(a.scale, b.scale)
            ma, sa = _multiplier(a.scale / twice_max, node.name)
            mb, sb = _multiplier(b.scale / twice_max, node.name)
            m, s = _multiplier(twice_max / (2 ** left * grid.scale), node.name)
            out = self.add_tensor(node.name, shape, grid)
            return self.emit("add", node, [a.name, b.name], out, left_shift=left, multiplier_a=ma, shift_a=sa,
                             multiplier_b=mb, shift_b=sb, multiplier=m, shift=s, **self.clamp_attrs(grid))
        prods = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
        grid = self.sink_grid(node) or wide_grid(min(prods), max(prods), a.scale * b.scale, self.pow2)
        m, s = _multiplier(a.scale * b.scale / grid.scale, node.name)
        out = self.add_tensor(node.name, shape, grid)
        return self.emit("mul", node, [a.name, b.name], out, multiplier=m, shift=s, **self.clamp_attrs(grid))

    def lower_cat(self, node):
        items = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ts = [self.tensor_of(node, x) for x in items]
        axis = self.dim_arg(node, dim, len(ts[0].shape) + 1)
        grid = self.sink_grid(node)
        if grid is None:
            grids = {_of(t) for t in ts}
            if len(grids) == 1:
                grid = grids.pop()
            else:
                lo = min(_of(t).real_range[0] for t in ts)
                hi = max(_of(t).real_range[1] for t in ts)
                grid = wide_grid(lo, hi, min(t.scale for t in ts), self.pow2)
        ms = [_multiplier(t.scale / grid.scale, node.name) for t in ts]
        out = self.add_tensor(node.name, self.shape(node), grid)
        return self.emit("concat", node, [t.name for t in ts], out, axis=axis, multipliers=[m for m, _ in ms],
                         shifts=[s for _, s in ms], **self.clamp_attrs(grid))


def check_ready(qm: fx.GraphModule) -> None:
    """Raise a clear error unless `qm` is in eval mode with every activation grid fixed."""
    if not hasattr(qm, "config"):
        raise LoweringError("lower() takes the QuantizedGraphModule returned by qcompile.compile")
    floats = [n for n, m in qm.named_modules() if getattr(m, "float_by_config", False) and isinstance(m, Quantizer)]
    if floats:
        raise LoweringError(f"quantizer {floats[0]!r} (and {len(floats) - 1} more) is float by config "
                            "(quantize_weights / quantize_activations = False): such a graph has no integer form; "
                            "compile with both True to deploy")
    training = [n for n, m in qm.named_modules() if m.training]
    if training:
        raise LoweringError(f"the graph is in training mode (e.g. module {training[0] or '<root>'!r}); call qm.eval() "
                            "before lowering: lowering uses the eval-mode grids and BatchNorm running statistics")


def lower(qm: fx.GraphModule) -> ir.Graph:
    """The integer IR of a trained QuantizedGraphModule in eval mode (see the module docstring)."""
    check_ready(qm)
    graph = _Lowering(qm).run()
    if not graph.inputs:
        raise LoweringError("the graph input is never quantized; nothing to lower")
    graph.meta = {"qcompile_version": importlib.metadata.version("qcompile"), "config": qm.config.to_dict()}
    return ir.verify(graph)


RULES = {
    "conv": _Lowering.lower_weighted, "linear": _Lowering.lower_weighted, "matmul": _Lowering.lower_matmul,
    "batchnorm_fold": _Lowering.lower_bn_fold, "getitem": _Lowering.lower_getitem,
    "identity": _Lowering.lower_identity, "dropout": _Lowering.lower_identity, "relu": _Lowering.lower_relu,
    "reshape": _Lowering.lower_reshape, "transpose": _Lowering.lower_transpose, "split": _Lowering.lower_split,
    "max_pool": _Lowering.lower_maxpool, "avg_pool": _Lowering.lower_avgpool, "lut": _Lowering.lower_unary,
    "batchnorm": _Lowering.lower_batchnorm, "add": _Lowering.lower_binary, "mul": _Lowering.lower_binary,
    "cat": _Lowering.lower_cat, "shape": _Lowering.lower_shape_arithmetic,
    "eval_output": _Lowering.lower_eval_output, "softmax": _Lowering.lower_softmax,
    "layer_norm": _Lowering.lower_layer_norm, "expand": _Lowering.lower_expand,
    "embedding": _Lowering.lower_embedding, "pad": _Lowering.lower_pad,
}
