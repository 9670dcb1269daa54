"""The op table: the one classification of ops in qcompile, by family.

Each `Family` lists the canonical forms of one kind of op (what `passes/normalize` produces:
functions, tensor methods, module types) and says what the passes need to know of it:
  matmul           a reduction on the MAC array: its operands get Q_Y / Q_W, its result Q_Y;
  grid_preserving  a quantized input stays on its grid (0 is a grid point; no arithmetic);
  grid_input       its operand is quantized (Q_Y, and Q_G on the gradient leaving it backward):
                   an op whose integer form reads codes (a table, softmax, LayerNorm);
  grid_output      its result is quantized right after it (Q_Y): softmax, LayerNorm.
A node computed from parameters and buffers alone (`meta["qc_parameter_only"]`, set by `normalize`)
is of the family "parameter" whatever it calls: no quantizer inside, evaluated in float at lowering;
its result gets a weight grid where an activation op reads it.
Every op of a family is quantizable: `quantize` leaves ops of no family in float (with a
warning), and lowering has one rule per family (`qcompile.ir.lower.RULES`).
Invariant: a function, method or module type belongs to at most one family.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.errors import VerificationError
from qcompile.train.fused_bn import BatchNormFold, fold_weight, folded_bias
from qcompile.train.quantizers import Quantizer
from qcompile.train.attention import attention_softmax, head_scale
from qcompile.train.modes import EvalOutput, StochasticDepth


@dataclass(frozen=True)
class Family:
    name: str
    functions: frozenset = frozenset()
    methods: frozenset = frozenset()
    modules: tuple = ()
    names: frozenset = frozenset()      # library functions matched by __name__ (torchvision's stochastic_depth)
    matmul: bool = False
    grid_preserving: bool = False
    grid_input: bool = False
    grid_output: bool = False


def _family(name, functions=(), methods=(), modules=(), names=(), **flags) -> Family:
    return Family(name, frozenset(functions), frozenset(methods), tuple(modules), frozenset(names), **flags)


FAMILIES = (
    _family("conv", {F.conv1d, F.conv2d}, matmul=True),
    _family("linear", {F.linear}, matmul=True),
    _family("matmul", {torch.matmul, operator.matmul, torch.bmm, torch.mm}, matmul=True),
    _family("relu", {F.relu}, modules=(nn.ReLU,), grid_preserving=True),
    _family("max_pool", {F.max_pool1d, F.max_pool2d, F.adaptive_max_pool2d},
            modules=(nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d), grid_preserving=True),
    _family("reshape", {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze},
            {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "unflatten"}, (nn.Flatten,),
            grid_preserving=True),
    _family("expand", methods={"expand"}, grid_preserving=True),
    _family("transpose", {torch.transpose, torch.permute, torch.swapaxes}, {"transpose", "permute", "swapaxes"},
            grid_preserving=True),
    _family("split", {torch.chunk, torch.split}, {"chunk", "split"}, grid_preserving=True),
    _family("getitem", {operator.getitem}, grid_preserving=True),
    _family("pad", {F.pad}, grid_preserving=True),                       # with zeros (lowering checks)
    _family("identity", modules=(nn.Identity,), grid_preserving=True),
    _family("dropout", {F.dropout}, modules=(nn.Dropout, StochasticDepth), names={"stochastic_depth"}),  # eval: identity
    _family("eval_output", modules=(EvalOutput,)),                                     # eval: one output field
    _family("outputs"),                                    # a namedtuple of outputs (matched by type, family_of)
    _family("shape", {operator.floordiv, operator.eq, builtins.getattr, torch._assert, head_scale},  # shapes
            {"size", "dim"}),
    _family("avg_pool", {F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean}, {"mean"},
            (nn.AvgPool2d, nn.AdaptiveAvgPool2d)),
    _family("lut", {F.relu6, F.hardswish, F.silu, torch.sigmoid, F.hardsigmoid, F.gelu, torch.tanh},  # a table
            grid_input=True),
    _family("softmax", {attention_softmax, F.softmax, torch.softmax}, {"softmax"}, grid_input=True, grid_output=True),
    _family("layer_norm", {F.layer_norm, F.rms_norm, F.normalize}, grid_input=True, grid_output=True),
    _family("embedding", {F.embedding}),                                   # rows of its weight grid
    _family("batchnorm", modules=(nn.BatchNorm1d, nn.BatchNorm2d)),                      # standalone: a table
    _family("batchnorm_fold", {fold_weight, folded_bias}, modules=(BatchNormFold,)),     # folded: a bias in eval
    _family("add", {operator.add}),
    _family("mul", {operator.mul}),
    _family("cat", {torch.cat}),
    _family("parameter"),                      # computed from parameters alone (matched by meta, family_of)
)
_BY_FUNCTION = {f: fam for fam in FAMILIES for f in fam.functions}
_BY_METHOD = {m: fam for fam in FAMILIES for m in fam.methods}
_BY_NAME = {n: fam for fam in FAMILIES for n in fam.names}
_BY_MODULE = tuple((t, fam) for fam in FAMILIES for t in fam.modules)
_OUTPUTS = next(fam for fam in FAMILIES if fam.name == "outputs")
_PARAMETER = next(fam for fam in FAMILIES if fam.name == "parameter")

CONV_FUNCTIONS = FAMILIES[0].functions
LINEAR_FUNCTIONS = FAMILIES[1].functions
WEIGHTED_FUNCTIONS = CONV_FUNCTIONS | LINEAR_FUNCTIONS

# Module types normalize turns into the functional forms above.
CONV_MODULES = (nn.Conv1d, nn.Conv2d)
LINEAR_MODULES = (nn.Linear,)

# Activation modules and in-place variants, mapped to their canonical function (normalize's rewrites).
ACTIVATION_MODULES = {
    nn.ReLU: F.relu, nn.ReLU6: F.relu6, nn.Hardswish: F.hardswish, nn.SiLU: F.silu,
    nn.Sigmoid: torch.sigmoid, nn.Hardsigmoid: F.hardsigmoid, nn.GELU: F.gelu, nn.Tanh: torch.tanh,
}
CANONICAL_FUNCTIONS = {
    torch.relu: F.relu, torch.relu_: F.relu, F.relu_: F.relu,
    F.sigmoid: torch.sigmoid, F.tanh: torch.tanh, torch.add: operator.add, operator.iadd: operator.add,
    torch.mul: operator.mul, operator.imul: operator.mul,
}
CANONICAL_METHODS = {"relu_": F.relu, "relu": F.relu, "add_": operator.add, "add": operator.add,
                     "mul_": operator.mul, "mul": operator.mul, "sigmoid": torch.sigmoid}


def free_path(gm, path: str) -> str:
    """`path`, or `path_1`, `path_2`... where a submodule already sits there (a layer called more than
    once): where a pass puts a module it adds."""
    candidate, i = path, 0
    while True:
        try:
            gm.get_submodule(candidate)
        except AttributeError:
            return candidate
        i += 1
        candidate = f"{path}_{i}"


def family_of(node, gm=None) -> Family | None:
    """The family of what `node` calls (None: no family — not quantizable — or not a call)."""
    if node.meta.get("qc_parameter_only"):
        return _PARAMETER
    if node.op == "call_function":
        if isinstance(node.target, type) and issubclass(node.target, tuple):
            return _OUTPUTS
        return _BY_FUNCTION.get(node.target) or _BY_NAME.get(getattr(node.target, "__name__", None))
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        return next((fam for t, fam in _BY_MODULE if isinstance(mod, t)), None)
    return None


def is_matmul(node) -> bool:
    fam = family_of(node)
    return fam is not None and fam.matmul


def is_grid_preserving(node, gm) -> bool:
    fam = family_of(node, gm)
    return fam is not None and fam.grid_preserving


def is_quantizable(node, gm) -> bool:
    return node.op in ("placeholder", "output", "get_attr") or family_of(node, gm) is not None


def quantizer_of(node, gm, kind: str | None = None):
    """The Quantizer module `node` calls (of `kind` — weight, activation, gradient — when given),
    else None: the one test of "is this a quantizer" (a node of an older snapshot whose module a
    later pass replaced calls none)."""
    if node.op != "call_module":
        return None
    try:
        mod = gm.get_submodule(node.target)
    except AttributeError:
        return None
    return mod if isinstance(mod, Quantizer) and kind in (None, mod.kind) else None


def module_type(gm, layer: str):
    """The type of the module at path `layer` of `gm` (the type a layer's config is looked up by), or None."""
    try:
        return type(gm.get_submodule(layer))
    except AttributeError:
        return None


def layer_result(node, gm):
    """The node holding the result of conv/linear/accumulator `node`: `getitem(node, 0)` when the node
    returns (y, exact) (an accumulator keeping its exact sum, see `passes/narrow_acc`), then the
    BatchNormFold call folded into it (its only user, reading it as first argument; see
    `passes/fold_bn`), else the node itself."""
    items = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem and u.args[0] is node]
    if items and len(items) == len(node.users):
        node = next((u for u in items if u.args[1] == 0), node)
    if len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and user.args and user.args[0] is node and \
                isinstance(gm.get_submodule(user.target), BatchNormFold):
            return user
    return node


def op_name(node, gm=None) -> str:
    """A short human name of what a node does ('conv2d', 'BatchNorm2d', '.view', ...)."""
    if node.op == "call_module":
        if gm is not None:
            try:
                return type(gm.get_submodule(node.target)).__name__
            except AttributeError:
                pass
        return node.meta.get("qc_module_type", str(node.target))
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def verification_error(pass_name: str, node, gm, expected: str):
    """The VerificationError of a pass's `verify`: names the pass, the node, what it calls and
    what the pass's invariant expected there."""
    calls = {"call_module": f"calls module {node.target!r} ({op_name(node, gm)})",
             "call_function": f"calls {op_name(node, gm)}", "call_method": f"calls .{node.target}()",
             "get_attr": f"reads {node.target!r}"}.get(node.op, node.op)
    layer = f", layer {node.meta['qc_layer']!r}" if node.meta.get("qc_layer") else ""
    return VerificationError(f"verify after pass {pass_name!r}: node {node.name!r} ({calls}{layer}): expected {expected}; "
                             "the pass broke its invariant, or the graph was edited after it")
