"""Pass `narrow_acc`: quantized matmuls → tiled narrow-accumulator ops.

Invariant after this pass: every conv1d / conv2d / linear / matmul / bmm node whose layer
config has `acc_bits` or `grad_acc_bits` set is a call of the module `<layer>.accumulator`
(a `qcompile.train.tiled.NarrowAccOp`) with the same operands (a, b, bias); its operands' grids
are the quantizers the op reads its scales from (shown in its repr), and, when gradients
are quantized (`grad_bits`), it owns `<layer>.accumulator.grad_output_quant`, the gradient
quantizer of its backward matmuls. Layers with neither option are left exactly as
`quantize` made them (the plain quantized op).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from qcompile.config import QConfig
from qcompile.errors import QCompileError, UnsupportedOpError
from qcompile.passes.ops import (
    CONV_FUNCTIONS,
    LINEAR_FUNCTIONS,
    is_matmul,
    verification_error,
)
from qcompile.passes.quantize import _free_path, _make, _module_type, grid_source
from qcompile.train.tiled import NarrowAccOp

_CONV_DEFAULTS = (None, 1, 0, 1, 1)  # bias, stride, padding, dilation, groups


def _conv_params(node):
    names = ("bias", "stride", "padding", "dilation", "groups")
    values = list(node.args[2:]) + list(_CONV_DEFAULTS[len(node.args) - 2:])
    params = dict(zip(names, values))
    params.update({k: v for k, v in node.kwargs.items() if k in names})
    if isinstance(params["padding"], str):
        raise UnsupportedOpError(f"narrow_acc: node {node.name!r} uses padding={params['padding']!r}; "
                                 "the tiled op needs explicit integer padding")
    return params


def _kind(node) -> str:
    if node.target in CONV_FUNCTIONS:
        return "conv1d" if node.target is F.conv1d else "conv2d"
    if node.target in LINEAR_FUNCTIONS:
        return "linear"
    return "matmul"


def _check_matmul_shapes(node) -> None:
    shapes = [a.meta.get("tensor_meta").shape if isinstance(a, fx.Node) and a.meta.get("tensor_meta") is not None
              else None for a in node.args[:2]]
    if any(s is None for s in shapes):
        return
    a, b = shapes
    if len(a) < 2 or len(b) < 2 or not (len(b) == 2 or tuple(a[:-2]) == tuple(b[:-2])):
        raise UnsupportedOpError(f"narrow_acc: matmul node {node.name!r} with shapes {tuple(a)} @ {tuple(b)}; "
                                 "the tiled op supports 2-d b or equal batch dimensions (no broadcasting, "
                                 "no 1-d operands); set acc_bits=None for this layer in QConfig.overrides")


def narrow_acc(gm: fx.GraphModule, config: QConfig) -> fx.GraphModule:
    generator = torch.Generator().manual_seed(config.seed + 1) if config.seed is not None else None
    for node in list(gm.graph.nodes):
        if not is_matmul(node):
            continue
        layer = node.meta.get("qc_layer", node.name)
        cfg = config.for_layer(layer, _module_type(gm, layer))
        if cfg.acc_bits is None and cfg.grad_acc_bits is None:
            continue
        kind = _kind(node)
        grids = []
        for idx in (0, 1):
            src = grid_source(node.args[idx], gm)
            if src is None:
                raise QCompileError(f"narrow_acc: operand {idx} of node {node.name!r} ({layer}) is on no "
                                    "quantizer grid; the pass runs after `quantize`")
            grids.append(gm.get_submodule(src.target))
        conv = _conv_params(node) if kind.startswith("conv") else {}
        if kind == "matmul":
            _check_matmul_shapes(node)
            bias = None
        elif kind == "linear":
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        else:
            bias = conv.pop("bias")
        grad_q = _make("gradient", cfg, layer, generator=generator) if cfg.grad_bits is not None else None
        op = NarrowAccOp(kind, layer, grids, acc_bits=cfg.acc_bits, tile=cfg.tile, overflow=cfg.overflow,
                         grad_acc_bits=cfg.grad_acc_bits if cfg.grad_acc_bits is not None else cfg.acc_bits,
                         acc_grad=cfg.acc_grad, grad_output_quant=grad_q, **conv)
        path = _free_path(gm, f"{layer}.accumulator")
        gm.add_submodule(path, op)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (node.args[0], node.args[1], bias))
        new.meta.update(node.meta)
        new.meta["qc_module_type"] = "NarrowAccOp"
        new.meta["qc_accumulator"] = {"acc_bits": cfg.acc_bits, "tile": cfg.tile, "overflow": cfg.overflow,
                                      "grad_acc_bits": op.grad_acc_bits, "acc_grad": cfg.acc_grad}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm



def verify(gm: fx.GraphModule, config: QConfig) -> None:
    """Raise VerificationError unless no conv/linear/matmul node remains for a layer whose config
    sets acc_bits or grad_acc_bits, and every NarrowAccOp call is such a layer's, with that
    config's acc_bits, its operands on the grids of the quantizers it reads its scales from, and
    a gradient quantizer of its own exactly when grad_bits is set."""
    for node in gm.graph.nodes:
        if is_matmul(node):
            layer = node.meta.get("qc_layer", node.name)
            cfg = config.for_layer(layer, _module_type(gm, layer))
            if cfg.acc_bits is not None or cfg.grad_acc_bits is not None:
                raise verification_error("narrow_acc", node, gm, f"a call of the NarrowAccOp '{layer}.accumulator' "
                                         f"(acc_bits={cfg.acc_bits}, grad_acc_bits={cfg.grad_acc_bits}), not the "
                                         "plain op")
        elif node.op == "call_module" and isinstance(op := gm.get_submodule(node.target), NarrowAccOp):
            cfg = config.for_layer(op.layer, _module_type(gm, op.layer))
            if (cfg.acc_bits is None and cfg.grad_acc_bits is None) or op.acc_bits != cfg.acc_bits:
                raise verification_error("narrow_acc", node, gm, f"acc_bits={cfg.acc_bits} from layer "
                                         f"{op.layer!r}'s config, not {op.acc_bits}")
            for idx, grid in enumerate(op.grids):
                src = grid_source(node.args[idx], gm) if isinstance(node.args[idx], fx.Node) else None
                if src is None or gm.get_submodule(src.target) is not grid:
                    raise verification_error("narrow_acc", node, gm, f"operand {idx} on the grid of the quantizer "
                                             f"it reads its scale from ({grid.layer!r} {grid.kind})")
            if (op.grad_output_quant is None) != (cfg.grad_bits is None):
                raise verification_error("narrow_acc", node, gm, "a grad_output_quant exactly when grad_bits is set "
                                         f"(grad_bits={cfg.grad_bits})")
