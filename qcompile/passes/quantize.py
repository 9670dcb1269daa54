"""Pass `quantize`: insert the quantizers of fully quantized training (paper fig. 1).

Invariant after this pass, for every conv / linear / matmul node L (its layer config is
`config.for_layer(L's module path, L's module type)`):
  - every activation operand of L is the output of an activation Quantizer, possibly through
    grid-preserving ops (relu, max-pool, reshapes) — the model input included; a tensor is
    quantized once, right after it is produced, and every user sees the quantized tensor;
  - quantizers of a kind the config keeps float (`quantize_weights`, `quantize_activations`
    false) are placed all the same, with `float_by_config` set (off, and not a switch), and so
    are the bias roundings of such a layer: the graph has one shape, whatever is quantized;
  - with grad_bits set, a gradient Quantizer sits between that operand and L (identity
    forward, Q_G on the activation gradient leaving L backward), unless the operand comes
    straight from a graph input (no gradient flows there);
  - the weight operand is `weight_quant(get_attr weight)` (symmetric; per output channel
    or per tensor), followed by a gradient Quantizer when quantize_weight_grad is set;
  - L's bias goes through a BiasQuant (`bias_quant`) that rounds it onto the grid
    S_x·S_w the integer layer adds it on, the two scales given as get_attr nodes of the
    operands' quantizers; a folded BatchNorm's eval bias (the BatchNormFold call's fifth
    argument) goes through one the same way;
  - L's result goes through an activation Quantizer (`output_quant`) before any user; when
    `fold_bn` fused a BatchNorm into L, "L's result" is the BatchNormFold call reading L
    (`qcompile.passes.ops.layer_result`), which also reads L's activation operand through L's
    gradient Quantizer, so the whole gradient leaving the fused layer is quantized once.
For every table (relu6, GELU, SiLU...), softmax and LayerNorm node: its operand is on an activation
grid and, with grad_bits, reaches it through a gradient Quantizer (the gradient leaving the op is
quantized); softmax and LayerNorm results go through an activation Quantizer; LayerNorm's affine
weight through a per-tensor weight Quantizer (its bias is rounded by lowering). A float parameter an
add or cat reads (a positional embedding, a class token) goes through a per-tensor weight Quantizer
at `<parameter>_quant` (and its gradient Quantizer with quantize_weight_grad); so does an
embedding's weight (`<layer>.weight_quant`): its result is rows of that grid.
Quantizers are submodules at `<layer>.<role>` (`input_quant`, `weight_quant`,
`output_quant`, `grad_quant`, `input1_quant`, ...). Ops with no quantized form are left in
float and listed in one warning (an UnsupportedOpError when strict).
"""
from __future__ import annotations

import warnings

import torch
from torch import fx

from qcompile.config import QConfig
from qcompile.core.grids import qrange
from qcompile.errors import UnsupportedOpError
from qcompile.passes.ops import (
    WEIGHTED_FUNCTIONS,
    family_of,
    free_path,
    is_grid_preserving,
    is_matmul,
    is_quantizable,
    layer_result,
    module_type,
    quantizer_of,
    op_name,
    verification_error,
)
from qcompile.train.estimators import make_estimator
from qcompile.train.quantizers import BiasQuant, Quantizer


class FloatFallbackWarning(UserWarning):
    """Ops left in float because they have no quantized form."""


def _make(kind: str, cfg: QConfig, layer: str, shape=(), axis=None, generator=None) -> Quantizer:
    bits = {"weight": cfg.weight_bits, "activation": cfg.act_bits, "gradient": cfg.grad_bits}[kind]
    symmetric = {"weight": True, "activation": cfg.act_symmetric, "gradient": False}[kind]
    estimator_name = {"weight": cfg.weight_range, "activation": cfg.act_range, "gradient": cfg.grad_range}[kind]
    fixed = {"weight": cfg.weight_fixed_range, "activation": cfg.act_fixed_range,
             "gradient": cfg.grad_fixed_range}[kind]
    est = make_estimator(estimator_name, momentum=cfg.momentum, interval=cfg.dsgc_interval, fixed=fixed,
                         qrange=qrange(bits, symmetric), symmetric=symmetric, shape=shape, axis=axis,
                         sync=kind != "weight")
    return Quantizer(kind, bits, symmetric, est, axis=axis, pow2=cfg.pow2_scales,
                     stochastic=kind == "gradient" and cfg.stochastic_rounding,
                     on_nonfinite=cfg.on_nonfinite, layer=layer, generator=generator,
                     float_by_config=(kind == "weight" and not cfg.quantize_weights)
                     or (kind == "activation" and not cfg.quantize_activations))


def on_grid(node, gm) -> bool:
    """True when `node`'s value is a quantizer's output, possibly through grid-preserving ops."""
    return grid_source(node, gm) is not None


def grid_source(node, gm):
    """The activation or weight quantizer node whose grid `node`'s value is on (walking back through
    gradient quantizers and grid-preserving ops, as `on_grid` does), or None when it is on no grid."""
    while True:
        if quantizer_of(node, gm, "activation") is not None or quantizer_of(node, gm, "weight") is not None:
            return node
        if quantizer_of(node, gm, "gradient") is not None or is_grid_preserving(node, gm):
            if not node.args or not isinstance(node.args[0], fx.Node):
                return None
            node = node.args[0]
            continue
        return None


def _from_input(node, gm) -> bool:
    """True when `node` is a graph input, possibly through quantizers and grid-preserving ops."""
    while node.op != "placeholder":
        if not (quantizer_of(node, gm) is not None or is_grid_preserving(node, gm)) or not node.args:
            return False
        node = node.args[0]
    return True


def _insert_after(gm, node, path: str, module: Quantizer, role: str, layer: str) -> fx.Node:
    path = free_path(gm, path)
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        q = gm.graph.call_module(path, (node,))
    q.meta["tensor_meta"] = node.meta.get("tensor_meta")
    q.meta["qc_quantizer"] = role
    q.meta["qc_layer"] = layer
    q.meta["qc_module_type"] = "Quantizer"
    return q


def _quantize_bias(gm, node: fx.Node, result: fx.Node, layer: str, float_by_config: bool) -> None:
    """Round L's bias and, for a folded BatchNorm, its eval bias onto the grid S_x·S_w (not when the
    config keeps the layer's weights or activations float: `float_by_config`)."""
    biases = [(node, 2)] if len(node.args) > 2 and isinstance(node.args[2], fx.Node) else []
    if result is not node:
        biases.append((result, 4))
    if not biases:
        return
    with gm.graph.inserting_before(node):
        in_scale = gm.graph.get_attr(f"{grid_source(node.args[0], gm).target}.scale")
        w_scale = gm.graph.get_attr(f"{node.args[1].target}.scale")
    for scale in (in_scale, w_scale):
        scale.meta["qc_layer"] = layer
    for user, index in biases:
        path = free_path(gm, f"{layer}.bias_quant")
        gm.add_submodule(path, BiasQuant(layer, float_by_config))
        with gm.graph.inserting_before(node):
            bq = gm.graph.call_module(path, (user.args[index], in_scale, w_scale))
        bq.meta.update(qc_quantizer="bias", qc_layer=layer, qc_module_type="BiasQuant")
        user.update_arg(index, bq)


def _quantize_operand(gm, node, idx: int, cfg: QConfig, layer: str, generator, result) -> None:
    """Put operand `idx` of `node` on an activation grid (unless it already is one) and, with grad_bits
    set, a gradient Quantizer between it and `node` (also read by `result`, a folded BatchNorm)."""
    arg = node.args[idx]
    suffix = "" if idx == 0 else str(idx)
    if not on_grid(arg, gm):
        q = _insert_after(gm, arg, f"{layer}.input{suffix}_quant", _make("activation", cfg, layer), "activation", layer)
        arg.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
        arg = q
    if cfg.grad_bits is not None and not _from_input(arg, gm):
        g = _insert_after(gm, arg, f"{layer}.grad{suffix}_quant", _make("gradient", cfg, layer, generator=generator),
                          "gradient", layer)
        node.update_arg(idx, g)
        if result is not node:
            result.replace_input_with(arg, g)


def _quantize_weight(gm, node, idx: int, cfg: QConfig, layer: str, generator, path: str, per_channel: bool):
    """Operand `idx` of `node`, a parameter, through a weight Quantizer at `path` (per output channel
    or per tensor) and, with quantize_weight_grad, a gradient Quantizer."""
    w = node.args[idx]
    shape = (w.meta["tensor_meta"].shape[0],) if per_channel else ()
    wq = _insert_after(gm, w, path, _make("weight", cfg, layer, shape, 0 if per_channel else None), "weight", layer)
    node.update_arg(idx, wq)
    if cfg.grad_bits is not None and cfg.quantize_weight_grad:
        wg = _insert_after(gm, wq, f"{path.removesuffix('_quant')}_grad_quant",
                           _make("gradient", cfg, layer, generator=generator), "gradient", layer)
        wq.replace_all_uses_with(wg, delete_user_cb=lambda user: user is not wg)


def parameter_operand(node, gm):
    """The get_attr node of a float parameter that `node` is, possibly through grid-preserving ops
    (a class token expanded over the batch), or the float function of parameters it is (family
    "parameter": a gathered relative-position bias), else None."""
    while node.op != "get_attr" and not node.meta.get("qc_parameter_only"):
        if not is_grid_preserving(node, gm) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    meta = node.meta.get("tensor_meta")
    if node.op != "get_attr":
        return node if meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point else None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return node if isinstance(value, torch.Tensor) and value.is_floating_point() else None


def _parameter_path(p) -> str:
    """Where the weight quantizer of parameter operand `p` goes: `<parameter>_quant`, or for a function of
    parameters `<module>.<node>_quant` (the module that computes it)."""
    if p.op == "get_attr":
        return p.target
    stack = list(p.meta.get("nn_module_stack", {}).values())
    owner = stack[-1][0] if stack and isinstance(stack[-1], tuple) and stack[-1][0] else ""
    return f"{owner}.{p.name}" if owner else p.name


def _output_quant(gm, result, cfg: QConfig, layer: str) -> None:
    out = _insert_after(gm, result, f"{layer}.output_quant", _make("activation", cfg, layer), "activation", layer)
    result.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)


def _quantize_grid_op(gm, node, fam, config: QConfig, generator) -> None:
    """A table / softmax / LayerNorm (operand on a grid, its gradient quantized; softmax and LayerNorm
    results quantized; LayerNorm's affine weight on a weight grid), an embedding (its weight on a
    per-tensor weight grid), or an add / cat reading a parameter (a positional embedding, a class
    token: on a per-tensor weight grid)."""
    layer = node.meta.get("qc_layer", node.name)
    cfg = config.for_layer(layer, module_type(gm, layer))
    if fam.name == "embedding":
        _quantize_weight(gm, node, 1, cfg, layer, generator, f"{layer}.weight_quant", False)
        return
    if fam.name in ("add", "cat"):
        operands = node.args[0] if fam.name == "cat" else node.args[:2]
        for p in {parameter_operand(a, gm) for a in operands if isinstance(a, fx.Node)} - {None}:
            user = next(iter(p.users))
            idx = user.args.index(p)
            path = _parameter_path(p)
            _quantize_weight(gm, user, idx, cfg, path, generator, free_path(gm, f"{path}_quant"), False)
            quantized = user.args[idx]
            p.replace_all_uses_with(quantized, delete_user_cb=lambda u: quantizer_of(u, gm, "weight") is None)
        return
    _quantize_operand(gm, node, 0, cfg, layer, generator, node)
    if fam.name == "layer_norm" and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        _quantize_weight(gm, node, 2, cfg, layer, generator, f"{layer}.weight_quant", False)
    if fam.grid_output:
        _output_quant(gm, node, cfg, layer)


def quantize(gm: fx.GraphModule, config: QConfig) -> fx.GraphModule:
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    fallbacks = []
    for node in list(gm.graph.nodes):
        if not is_matmul(node):
            fam = family_of(node, gm)
            if fam is not None and (fam.grid_input or fam.name in ("add", "cat", "embedding")):
                _quantize_grid_op(gm, node, fam, config, generator)
            elif not is_quantizable(node, gm) and quantizer_of(node, gm) is None:
                fallbacks.append(node)
            continue
        layer = node.meta.get("qc_layer", node.name)
        cfg = config.for_layer(layer, module_type(gm, layer))
        weighted = node.target in WEIGHTED_FUNCTIONS
        result = layer_result(node, gm)
        for idx in ([0] if weighted else [0, 1]):
            _quantize_operand(gm, node, idx, cfg, layer, generator, result)
        if weighted:
            _quantize_weight(gm, node, 1, cfg, layer, generator, f"{layer}.weight_quant",
                             cfg.weight_granularity == "per_channel")
            _quantize_bias(gm, node, result, layer, not (cfg.quantize_weights and cfg.quantize_activations))
        _output_quant(gm, result, cfg, layer)
    if fallbacks:
        listed = ", ".join(f"{n.name} ({op_name(n, gm)})" for n in fallbacks)
        if config.strict:
            raise UnsupportedOpError(f"ops with no quantized form (strict=True): {listed}; make them leaf modules "
                                     "or set strict=False to leave them in float")
        warnings.warn(f"{len(fallbacks)} op(s) have no quantized form and stay in float: {listed}",
                      FloatFallbackWarning, stacklevel=3)
    gm.graph.lint()
    gm.recompile()
    return gm


def _verify_grid_op(gm, node, fam, config: QConfig) -> None:
    """A table / softmax / LayerNorm: operand on a grid, through a gradient Quantizer with grad_bits;
    softmax / LayerNorm: one user, an activation Quantizer; LayerNorm's weight on a weight grid."""
    cfg = config.for_layer(node.meta.get("qc_layer", node.name), None)
    arg = node.args[0]
    if grid_source(arg, gm) is None:
        raise verification_error("quantize", node, gm, "its operand on an activation quantizer's grid")
    if cfg.grad_bits is not None and not _from_input(arg, gm) and quantizer_of(arg, gm, "gradient") is None:
        raise verification_error("quantize", node, gm, "its operand a gradient Quantizer's output (grad_bits is set)")
    if fam.grid_output and (len(node.users) != 1 or quantizer_of(next(iter(node.users)), gm, "activation") is None):
        raise verification_error("quantize", node, gm, "one user, its output activation Quantizer")
    w = node.args[2] if fam.name == "layer_norm" and len(node.args) > 2 else None
    if isinstance(w, fx.Node) and grid_source(w, gm) is None:
        raise verification_error("quantize", node, gm, "its affine weight a weight Quantizer's output")


def verify(gm: fx.GraphModule, config: QConfig) -> None:
    """Raise VerificationError unless every table / softmax / LayerNorm node is quantized as
    `_quantize_grid_op` leaves it (`_verify_grid_op`) and, for every conv/linear/matmul node L: each activation operand
    is on a quantizer grid (`grid_source`), through L's gradient Quantizer when grad_bits is set
    and the operand does not come from a graph input; a weight operand is a weight Quantizer's
    output (possibly through its gradient Quantizer); a bias operand is a BiasQuant's output; and
    L's result (`layer_result`: the BatchNormFold call when a BatchNorm is folded into L) has one
    user, an activation Quantizer, and a folded BatchNorm's eval bias is a BiasQuant's output; where that
    BatchNorm's fold cancels (`fold_cancels`), L reads its weight Quantizer's output directly and that
    quantizer commutes with per-row scaling."""
    for node in gm.graph.nodes:
        fam = family_of(node, gm)
        if fam is not None and fam.grid_input:
            _verify_grid_op(gm, node, fam, config)
        if not is_matmul(node):
            continue
        layer = node.meta.get("qc_layer", node.name)
        cfg = config.for_layer(layer, module_type(gm, layer))
        weighted = node.target in WEIGHTED_FUNCTIONS
        for idx in ([0] if weighted else [0, 1]):
            arg = node.args[idx]
            if not isinstance(arg, fx.Node) or grid_source(arg, gm) is None:
                raise verification_error("quantize", node, gm, f"operand {idx} ({getattr(arg, 'name', arg)}) on an "
                                         "activation quantizer's grid, possibly through grid-preserving ops")
            if cfg.grad_bits is not None and not _from_input(arg, gm) and quantizer_of(arg, gm, "gradient") is None:
                raise verification_error("quantize", node, gm, f"operand {idx} ({arg.name}) to be a gradient "
                                         "Quantizer's output (grad_bits is set)")
        if weighted:
            w = node.args[1]
            if isinstance(w, fx.Node) and quantizer_of(w, gm, "gradient") is not None:
                w = w.args[0]
            if not (isinstance(w, fx.Node) and quantizer_of(w, gm, "weight") is not None):
                raise verification_error("quantize", node, gm, f"weight operand a weight Quantizer's output, not "
                                         f"{getattr(w, 'name', w)!r}")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if isinstance(bias, fx.Node) and not (bias.op == "call_module"
                                                  and isinstance(gm.get_submodule(bias.target), BiasQuant)):
                raise verification_error("quantize", node, gm, f"bias operand a BiasQuant's output, not {bias.name!r}")
        result = layer_result(node, gm)
        if result is not node and not (result.args[4].op == "call_module"
                                       and isinstance(gm.get_submodule(result.args[4].target), BiasQuant)):
            raise verification_error("quantize", result, gm, "eval bias (fifth argument) a BiasQuant's output")
        wq = quantizer_of(node.args[1], gm, "weight") if weighted and isinstance(node.args[1], fx.Node) else None
        if result is not node and gm.get_submodule(result.target).fold_cancels and not (
                wq is not None and wq.commutes_with_row_scaling()):
            raise verification_error("quantize", node, gm, "a weight quantizer that commutes with per-row scaling and "
                                     "no weight-gradient quantizer (the folded BatchNorm's fold_cancels is set)")
        users = list(result.users)
        if len(users) != 1 or quantizer_of(users[0], gm, "activation") is None:
            names = ", ".join(u.name for u in users) or "none"
            raise verification_error("quantize", result, gm, f"one user, the output activation Quantizer of layer "
                                     f"{layer!r}, not: {names}")
