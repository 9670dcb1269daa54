"""Pass `narrow_acc`: quantized matmuls → tiled narrow-accumulator ops.

Invariant after this pass: every conv1d / conv2d / linear / matmul / bmm node whose layer
config has `acc_bits` or `grad_acc_bits` set is a call of the module `<layer>.accumulator`
(a `qcompile.train.tiled.NarrowAccOp`) with the same operands (a, b, bias) and the keyword
inputs a_scale, a_zero_point, b_scale, b_zero_point: get_attr nodes of the `scale` and
`zero_point` buffers of the quantizers whose grids the operands are on (`grid_source`), the
only way the op learns its grids. The op is complete when made (no later pass changes it): its
operands' code ranges are constructor arguments equal to those quantizers' `qrange`; it keeps its
exact accumulator (`keep_exact`) exactly when the layer config sets `log_barrier` and
`acc_bits`, and then returns (y, exact), read by getitem(op, 0) (every former user of the
layer's result reads it) and getitem(op, 1) (for the log barrier, see `regularize`); when
gradients are quantized (`grad_bits`), it owns `<layer>.accumulator.grad_output_quant`, the
gradient quantizer of its backward matmuls. The op node's meta["qc_accumulator"] records the
compile-time facts (kind, mode, keep_exact, and per operand its quantizer's path, qrange,
symmetric, axis and estimator). When `acc_bits` is set and a BatchNorm is folded into the layer,
the BatchNormFold call (`layer_result`) has the keyword `float_statistics=True`: its batch
statistics come from a float conv, since the accumulator may overflow. Layers with neither
option are left exactly as `quantize` made them (the plain quantized op).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from qcompile.config import QConfig
from qcompile.errors import QCompileError, UnsupportedOpError
from qcompile.passes.ops import (
    CONV_FUNCTIONS,
    LINEAR_FUNCTIONS,
    free_path,
    is_matmul,
    layer_result,
    module_type,
    verification_error,
)
from qcompile.passes.quantize import _make, grid_source
from qcompile.train.quantizers import BiasQuant, OverflowFreeWeights
from qcompile.train.tiled import NarrowAccOp

_CONV_DEFAULTS = (None, 1, 0, 1, 1)  # bias, stride, padding, dilation, groups
GRID_PREFIXES = ("a", "b")           # the op's operands, in order
GRID_BUFFERS = ("scale", "zero_point")  # what the op reads of each operand's quantizer, as keyword inputs


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


def _make_overflow_free(gm, node, layer: str, cfg: QConfig, sources, quantizers, bias) -> OverflowFreeWeights:
    """Make layer `layer`'s weight quantizer an OverflowFreeWeights (same grid options and estimator),
    called as weight_quant(w, a_scale, a_zero_point, float bias) and moved (with its gradient
    quantizer) right after the latest of the input's quantizer, the weight and the bias, so it reads
    the input grid of the same forward and runs before anything reads its scale. The bias is the one
    the deployed accumulator starts from: the layer's own, or a folded BatchNorm's eval bias (which
    holds the layer's; in training the accumulator adds none, so the bound is conservative there)."""
    wq, old = sources[1], quantizers[1]
    if old.kind != "weight":
        raise UnsupportedOpError(f"narrow_acc: layer {layer!r} ({node.name}) multiplies two activations; "
                                 "overflow_free_weights bounds a weight's ℓ1 norm (set it for weighted layers only)")
    fold = layer_result(node, gm)
    bias_quant = fold.args[4] if fold is not node else bias
    raw_bias = None
    if bias_quant is not None:
        if not (bias_quant.op == "call_module" and isinstance(gm.get_submodule(bias_quant.target), BiasQuant)):
            raise QCompileError(f"narrow_acc: the bias of layer {layer!r} is not a BiasQuant's output")
        raw_bias = bias_quant.args[0]
    new = OverflowFreeWeights(old.bits, old.symmetric, old.estimator, axis=old.axis, pow2=old.pow2,
                              on_nonfinite=old.on_nonfinite, layer=old.layer, acc_bits=cfg.acc_bits,
                              input_qrange=quantizers[0].qrange)
    parent, _, name = wq.target.rpartition(".")
    setattr(gm.get_submodule(parent), name, new)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    after = [sources[0], wq.args[0]] + ([raw_bias] if isinstance(raw_bias, fx.Node) else [])
    anchor = max(after, key=order.__getitem__)
    followers = [u for u in wq.users if u.op == "call_module" and u.meta.get("qc_quantizer") == "gradient"]
    if order[wq] < order[anchor]:
        anchor.append(wq)
        for g in reversed(followers):
            wq.append(g)
    with gm.graph.inserting_before(wq):
        grid = [gm.graph.get_attr(f"{sources[0].target}.{what}") for what in GRID_BUFFERS]
    for g in grid:
        g.meta["qc_layer"] = layer
    wq.args = (wq.args[0], *grid, raw_bias)
    return new


def narrow_acc(gm: fx.GraphModule, config: QConfig) -> fx.GraphModule:
    generator = torch.Generator().manual_seed(config.seed + 1) if config.seed is not None else None
    for node in list(gm.graph.nodes):
        if not is_matmul(node):
            continue
        layer = node.meta.get("qc_layer", node.name)
        cfg = config.for_layer(layer, module_type(gm, layer))
        if cfg.acc_bits is None and cfg.grad_acc_bits is None:
            continue
        kind = _kind(node)
        sources = []
        for idx in (0, 1):
            src = grid_source(node.args[idx], gm)
            if src is None:
                raise QCompileError(f"narrow_acc: operand {idx} of node {node.name!r} ({layer}) is on no "
                                    "quantizer grid; the pass runs after `quantize`")
            sources.append(src)
        quantizers = [gm.get_submodule(src.target) for src in sources]
        conv = _conv_params(node) if kind.startswith("conv") else {}
        if kind == "matmul":
            _check_matmul_shapes(node)
            bias = None
        elif kind == "linear":
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        else:
            bias = conv.pop("bias")
        if cfg.overflow_free_weights:
            quantizers[1] = _make_overflow_free(gm, node, layer, cfg, sources, quantizers, bias)
        keep_exact = bool(cfg.log_barrier) and cfg.acc_bits is not None
        grad_q = _make("gradient", cfg, layer, generator=generator) if cfg.grad_bits is not None else None
        op = NarrowAccOp(kind, layer, acc_bits=cfg.acc_bits, tile=cfg.acc_tile, overflow=cfg.overflow,
                         grad_acc_bits=cfg.grad_acc_bits if cfg.grad_acc_bits is not None else cfg.acc_bits,
                         acc_grad=cfg.acc_grad, a_qrange=quantizers[0].qrange, b_qrange=quantizers[1].qrange,
                         keep_exact=keep_exact, grad_output_quant=grad_q, **conv)
        path = free_path(gm, f"{layer}.accumulator")
        gm.add_submodule(path, op)
        with gm.graph.inserting_before(node):
            grid = {}
            for prefix, src in zip(GRID_PREFIXES, sources):
                for what in GRID_BUFFERS:
                    grid[f"{prefix}_{what}"] = gm.graph.get_attr(f"{src.target}.{what}")
                    grid[f"{prefix}_{what}"].meta["qc_layer"] = layer
            new = gm.graph.call_module(path, (node.args[0], node.args[1], bias), grid)
        new.meta.update(node.meta)
        new.meta["qc_module_type"] = "NarrowAccOp"
        new.meta["qc_accumulator"] = {
            "kind": kind, "acc_bits": cfg.acc_bits, "tile": cfg.acc_tile, "overflow": cfg.overflow,
            "grad_acc_bits": op.grad_acc_bits, "acc_grad": cfg.acc_grad, "keep_exact": keep_exact,
            "grids": tuple({"quantizer": src.target, "qrange": tuple(q.qrange), "symmetric": bool(q.symmetric),
                            "axis": q.axis, "estimator": q.estimator.name,
                            "overflow_free": isinstance(q, OverflowFreeWeights)} for src, q in zip(sources, quantizers)),
        }
        result = new
        if keep_exact:
            with gm.graph.inserting_after(new):
                result = gm.graph.call_function(operator.getitem, (new, 0))
            with gm.graph.inserting_after(result):
                exact = gm.graph.call_function(operator.getitem, (new, 1))
            result.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "qc_layer")})
            exact.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "qc_layer")})
            exact.meta["qc_exact_accumulator"] = path
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        fold = layer_result(new, gm)
        if cfg.acc_bits is not None and fold is not result:       # a BatchNorm folded into the layer
            fold.update_kwarg("float_statistics", True)
    gm.graph.lint()
    gm.recompile()
    return gm



def verify(gm: fx.GraphModule, config: QConfig) -> None:
    """Raise VerificationError unless no conv/linear/matmul node remains for a layer whose config
    sets acc_bits or grad_acc_bits, and every NarrowAccOp call is such a layer's, with that
    config's acc_bits; its keyword inputs {a,b}_{scale,zero_point} are get_attr nodes of the
    buffers of the quantizers its operands are on, whose code ranges the op was given; it keeps its
    exact accumulator exactly when the config sets log_barrier (and acc_bits), and is then read
    only through getitem(op, 0) (at least once) and getitem(op, 1); and it has a gradient quantizer
    of its own exactly when grad_bits is set; a BatchNorm folded into it is called with
    float_statistics=True exactly when acc_bits is set, and its fold never cancels; its weight quantizer is
    an OverflowFreeWeights exactly when the config sets overflow_free_weights, and then reads get_attr nodes
    of the scale and zero point of operand 0's quantizer, after that quantizer in the graph."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if is_matmul(node):
            layer = node.meta.get("qc_layer", node.name)
            cfg = config.for_layer(layer, module_type(gm, layer))
            if cfg.acc_bits is not None or cfg.grad_acc_bits is not None:
                raise verification_error("narrow_acc", node, gm, f"a call of the NarrowAccOp '{layer}.accumulator' "
                                         f"(acc_bits={cfg.acc_bits}, grad_acc_bits={cfg.grad_acc_bits}), not the "
                                         "plain op")
        elif node.op == "call_module" and isinstance(op := gm.get_submodule(node.target), NarrowAccOp):
            cfg = config.for_layer(op.layer, module_type(gm, op.layer))
            if (cfg.acc_bits is None and cfg.grad_acc_bits is None) or op.acc_bits != cfg.acc_bits:
                raise verification_error("narrow_acc", node, gm, f"acc_bits={cfg.acc_bits} from layer "
                                         f"{op.layer!r}'s config, not {op.acc_bits}")
            for idx, prefix in enumerate(GRID_PREFIXES):
                src = grid_source(node.args[idx], gm) if len(node.args) > idx and isinstance(node.args[idx], fx.Node) \
                    else None
                if src is None:
                    raise verification_error("narrow_acc", node, gm, f"operand {idx} on a quantizer's grid")
                for what in GRID_BUFFERS:
                    arg = node.kwargs.get(f"{prefix}_{what}")
                    if not (isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target == f"{src.target}.{what}"):
                        raise verification_error("narrow_acc", node, gm, f"keyword input {prefix}_{what} = get_attr "
                                                 f"'{src.target}.{what}' (the grid operand {idx} is on), not "
                                                 f"{getattr(arg, 'target', arg)!r}")
                qrange = tuple(getattr(op, f"{prefix}_qrange"))
                if qrange != tuple(gm.get_submodule(src.target).qrange):
                    raise verification_error("narrow_acc", node, gm, f"{prefix}_qrange = the qrange of {src.target!r} "
                                             f"({tuple(gm.get_submodule(src.target).qrange)}), not {qrange}")
            _verify_weight_grid(node, gm, cfg, order)
            keep = bool(cfg.log_barrier) and cfg.acc_bits is not None
            if op.keep_exact != keep:
                raise verification_error("narrow_acc", node, gm, f"keep_exact={keep} (log_barrier={cfg.log_barrier}, "
                                         f"acc_bits={cfg.acc_bits} in layer {op.layer!r}'s config)")
            if keep:
                index = [u.args[1] if u.op == "call_function" and u.target is operator.getitem and u.args[0] is node
                         else None for u in node.users]
                if None in index or set(index) - {0, 1} or 0 not in index:
                    raise verification_error("narrow_acc", node, gm, "its (y, exact) read only through getitem(op, 0) "
                                             "and getitem(op, 1), y at least once")
            if (op.grad_output_quant is None) != (cfg.grad_bits is None):
                raise verification_error("narrow_acc", node, gm, "a grad_output_quant exactly when grad_bits is set "
                                         f"(grad_bits={cfg.grad_bits})")
            fold = layer_result(node, gm)
            if fold is not node and fold.op == "call_module" and \
                    fold.kwargs.get("float_statistics", False) != (cfg.acc_bits is not None):
                raise verification_error("narrow_acc", fold, gm, f"float_statistics={cfg.acc_bits is not None}: batch "
                                         "statistics from a float conv exactly when the layer's accumulator is narrow")
            if fold is not node and fold.op == "call_module" and gm.get_submodule(fold.target).fold_cancels:
                raise verification_error("narrow_acc", fold, gm, "fold_cancels=False: the accumulator op reads the "
                                         "folded weight's grid")


def _verify_weight_grid(node, gm, cfg: QConfig, order: dict) -> None:
    """The overflow-free part of `verify` for accumulator op node `node`."""
    wq = grid_source(node.args[1], gm)
    free = isinstance(gm.get_submodule(wq.target), OverflowFreeWeights)
    if free != bool(cfg.overflow_free_weights):
        raise verification_error("narrow_acc", node, gm, f"an OverflowFreeWeights weight quantizer exactly when "
                                 f"overflow_free_weights is set ({cfg.overflow_free_weights})")
    if not free:
        return
    src = grid_source(node.args[0], gm)
    reads = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in wq.args[1:3]]
    if reads != [f"{src.target}.{what}" for what in GRID_BUFFERS] or order[wq] < order[src]:
        raise verification_error("narrow_acc", wq, gm, f"called after {src.target!r} with get_attr nodes of its "
                                 f"scale and zero_point, not {reads}")
