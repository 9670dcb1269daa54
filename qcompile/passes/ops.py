"""Op tables shared by the passes: which canonical ops are matmuls, which keep a tensor on
its quantization grid, and which have a quantized (integer) form at all.

Invariant: every table lists canonical forms only (what `passes/normalize` produces).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.train.fused_bn import BatchNormFold, fold_weight

# Ops whose reduction runs on the MAC array: their operands get Q_Y / Q_W, their result Q_Y.
CONV_FUNCTIONS = {F.conv1d, F.conv2d}
LINEAR_FUNCTIONS = {F.linear}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
WEIGHTED_FUNCTIONS = CONV_FUNCTIONS | LINEAR_FUNCTIONS

# Module types normalize turns into the functional forms above.
CONV_MODULES = (nn.Conv1d, nn.Conv2d)
LINEAR_MODULES = (nn.Linear,)

# Activation modules and in-place variants, mapped to their canonical function.
ACTIVATION_MODULES = {
    nn.ReLU: F.relu, nn.ReLU6: F.relu6, nn.Hardswish: F.hardswish, nn.SiLU: F.silu,
    nn.Sigmoid: torch.sigmoid, nn.Hardsigmoid: F.hardsigmoid,
}
CANONICAL_FUNCTIONS = {
    torch.relu: F.relu, torch.relu_: F.relu, F.relu_: F.relu,
    F.sigmoid: torch.sigmoid, torch.add: operator.add, operator.iadd: operator.add,
    torch.mul: operator.mul, operator.imul: operator.mul,
}
CANONICAL_METHODS = {"relu_": F.relu, "relu": F.relu, "add_": operator.add, "add": operator.add,
                     "mul_": operator.mul, "mul": operator.mul, "sigmoid": torch.sigmoid}

# Ops after which a quantized tensor is still on its grid (0 is a grid point; no arithmetic).
GRID_PRESERVING_FUNCTIONS = {F.relu, F.max_pool1d, F.max_pool2d, F.adaptive_max_pool2d, torch.flatten,
                             operator.getitem, torch.chunk, torch.split, torch.transpose, torch.permute,
                             torch.reshape, torch.squeeze, torch.unsqueeze}
GRID_PRESERVING_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                           "unsqueeze", "chunk", "split", "expand", "size"}
GRID_PRESERVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity)

# Ops the integer lowering gives a quantized form (besides the matmuls and grid-preserving ops).
QUANTIZABLE_FUNCTIONS = WEIGHTED_FUNCTIONS | MATMUL_FUNCTIONS | GRID_PRESERVING_FUNCTIONS | {
    F.relu6, F.hardswish, F.silu, torch.sigmoid, F.hardsigmoid, operator.add, operator.mul, torch.cat,
    F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean, F.dropout, operator.floordiv,
    fold_weight,  # BatchNorm folded into a weight (passes/fold_bn): a constant after training
}
QUANTIZABLE_METHODS = GRID_PRESERVING_METHODS | {"mean", "dim"}
QUANTIZABLE_MODULES = GRID_PRESERVING_MODULES + (
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d,
    BatchNormFold,  # a per-channel bias in eval (passes/fold_bn)
)


def node_is(node, functions=(), methods=(), modules=(), gm=None) -> bool:
    """True when `node` calls one of `functions`, `methods`, or a module of type in `modules`."""
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_module" and gm is not None and modules:
        return isinstance(gm.get_submodule(node.target), modules)
    return False


def is_matmul(node) -> bool:
    return node.op == "call_function" and (node.target in WEIGHTED_FUNCTIONS or node.target in MATMUL_FUNCTIONS)


def is_grid_preserving(node, gm) -> bool:
    return node_is(node, GRID_PRESERVING_FUNCTIONS, GRID_PRESERVING_METHODS, GRID_PRESERVING_MODULES, gm)


def is_quantizable(node, gm) -> bool:
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    return node_is(node, QUANTIZABLE_FUNCTIONS, QUANTIZABLE_METHODS, QUANTIZABLE_MODULES, gm)


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
