"""Pass `fold_bn`: conv/linear + BatchNorm → one fused layer with the BatchNorm folded.

Invariant after this pass, for every BatchNorm B (config `fold_bn` true for B's path) whose
input is a conv1d/conv2d/linear node L used by B alone (L's weight and bias `get_attr`
nodes, B called once, with running statistics and channels on dim 1):
  - L's weight operand is `fold_weight(W, B.weight, B.running_var, eps)` (W·γ/σ_r), the
    node the `quantize` pass puts the weight quantizer on, and L has no bias;
  - B's call is replaced by a call of a `BatchNormFold` module at B's path (B's own
    parameters and buffers, so `state_dict()` keys are unchanged) with arguments
    (L, x, W, b, e): x is L's activation operand, W and b L's float weight and bias, and
    e = `folded_bias(γ, β, μ_r, σ_r², eps, b, B')` the bias of the eval form, a node of its own
    (so `quantize` rounds it like any layer bias; None in a forward where the fold cancels);
  - that call is L's only user: the layer's result (`qcompile.passes.ops.layer_result`) is
    read after it, so `quantize` puts L's output quantizer after the BatchNorm correction;
  - the fold node's fifth argument and the folded_bias node's seventh are the BatchNormFold module B'
    (a `get_attr` node), which says in each forward whether the fold cancels
    (`BatchNormFold.fold_cancelled`);
  - the BatchNormFold module is complete when made: its λ (`bn_rectification`, 0 when L reads
    the graph input) is read from B's config here, and `fold_cancels` from L's (`_fold_cancels`:
    the weight quantizer `quantize` makes commutes with per-row scaling, no gradient quantizer reads
    the folded weight's gradient, no narrow accumulator its grid); no later pass changes it
    (`narrow_acc` may add the keyword `float_statistics=True` to the call, an edit of the graph).
There is no call of a BatchNorm module where folding applied. Any other BatchNorm stays
a BatchNorm call (a per-channel affine op in eval, `qcompile.train.fused_bn.bn_affine`), tagged
meta["qc_bn"] = "affine" with the reason in meta["qc_bn_reason"].
"""
from __future__ import annotations

import collections

import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.modules.batchnorm import _BatchNorm

from qcompile.config import QConfig
from qcompile.passes.ops import CONV_FUNCTIONS, WEIGHTED_FUNCTIONS, module_type, verification_error
from qcompile.train.fused_bn import BatchNormFold, fold_weight, folded_bias

# which BatchNorm follows which layer function with channels on dim 1
_BN_FOR = {F.conv2d: nn.BatchNorm2d, F.conv1d: nn.BatchNorm1d, F.linear: nn.BatchNorm1d}


def _fold_cancels(cfg: QConfig) -> bool:
    """True where a layer with config `cfg` lets the fold cancel in training with batch statistics: its
    weight quantizer, as `quantize` makes it, commutes with per-row scaling (off, or symmetric per-channel
    current min-max without power-of-two steps: `Quantizer.commutes_with_row_scaling`), no gradient quantizer
    reads the folded weight's gradient and no narrow accumulator reads the folded weight's grid."""
    commutes = not cfg.quantize_weights or (cfg.weight_range == "current" and cfg.weight_granularity == "per_channel"
                                            and not cfg.pow2_scales)
    return commutes and not (cfg.grad_bits is not None and cfg.quantize_weight_grad) and \
        cfg.acc_bits is None and cfg.grad_acc_bits is None


def _why_not_foldable(bn_node: fx.Node, bn: _BatchNorm, gm: fx.GraphModule, calls: collections.Counter) -> str | None:
    """None when `bn_node` can be folded into its producer, else the reason it cannot."""
    layer = bn_node.args[0] if bn_node.args else None
    if bn_node.kwargs or len(bn_node.args) != 1 or not isinstance(layer, fx.Node):
        return "not called with a single tensor argument"
    if not (layer.op == "call_function" and layer.target in WEIGHTED_FUNCTIONS):
        return f"its input {layer.name} is not a conv/linear"
    if len(layer.users) != 1:
        return f"the output of {layer.name} has other users besides the BatchNorm"
    if calls[bn_node.target] != 1:
        return "the BatchNorm module is called more than once"
    if not bn.track_running_stats:
        return "track_running_stats=False (batch statistics in eval: not an affine op)"
    if type(bn) is not _BN_FOR[layer.target]:
        return f"{type(bn).__name__} after {layer.target.__name__}"
    weight, bias = layer.args[1], layer.args[2] if len(layer.args) > 2 else None
    if weight.op != "get_attr" or (bias is not None and bias.op != "get_attr") or layer.kwargs:
        return f"the weight/bias of {layer.name} are not parameters"
    if layer.target is F.linear and len(layer.meta["tensor_meta"].shape) != 2:
        return "the linear output is not (batch, features)"
    if weight.meta["tensor_meta"].shape[0] != bn.num_features:
        return f"{bn.num_features} BatchNorm features for {weight.meta['tensor_meta'].shape[0]} output channels"
    return None


def _reaches_input(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when `node` is a graph input or a parameter-free, single-input chain from one (no gradient
    leaves a layer reading it)."""
    while node.op != "placeholder":
        inputs = node.all_input_nodes
        if len(inputs) != 1 or node.op == "get_attr":
            return False
        if node.op == "call_module" and next(gm.get_submodule(node.target).parameters(), None) is not None:
            return False
        node = inputs[0]
    return True


def fold_bn(gm: fx.GraphModule, config: QConfig) -> fx.GraphModule:
    graph = gm.graph
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, _BatchNorm):
            continue
        cfg = config.for_layer(node.target, type(bn))
        reason = "fold_bn=False" if not cfg.fold_bn else _why_not_foldable(node, bn, gm, calls)
        if reason is not None:
            node.meta["qc_bn"], node.meta["qc_bn_reason"] = "affine", reason
            continue
        layer = node.args[0]
        x, weight = layer.args[0], layer.args[1]
        bias = layer.args[2] if len(layer.args) > 2 else None
        layer_name = layer.meta.get("qc_layer", layer.name)
        fused = BatchNormFold(bn, layer_name, layer.target, layer.args[3:] if layer.target in CONV_FUNCTIONS else (),
                              freeze_steps=cfg.bn_freeze_steps,
                              rectification=config.for_layer(node.target, BatchNormFold).bn_rectification,
                              propagates_gradient=not _reaches_input(x, gm), sync=cfg.bn_sync)
        fused.fold_cancels = _fold_cancels(config.for_layer(layer_name, module_type(gm, layer_name)))
        gm.add_submodule(node.target, fused)
        with graph.inserting_before(layer):
            gamma = graph.get_attr(f"{node.target}.weight") if bn.affine else None
            beta = graph.get_attr(f"{node.target}.bias") if bn.affine else None
            mean = graph.get_attr(f"{node.target}.running_mean")
            var = graph.get_attr(f"{node.target}.running_var")
            module = graph.get_attr(node.target)
            folded = graph.call_function(fold_weight, (weight, gamma, var, bn.eps, module))
            eval_bias = graph.call_function(folded_bias, (gamma, beta, mean, var, bn.eps, bias, module))
        folded.meta["tensor_meta"] = weight.meta["tensor_meta"]
        eval_bias.meta["tensor_meta"] = var.meta["tensor_meta"] = mean.meta["tensor_meta"] = \
            _extract_tensor_metadata(bn.running_var)
        for n, t in ((gamma, bn.weight), (beta, bn.bias)):
            if n is not None:
                n.meta["tensor_meta"] = _extract_tensor_metadata(t)
        for n in (gamma, beta, mean, var, module, folded, eval_bias):
            if n is not None:
                n.meta["qc_layer"] = layer_name
        layer.args = (x, folded, None, *layer.args[3:])
        with graph.inserting_after(layer):
            out = graph.call_module(node.target, (layer, x, weight, bias, eval_bias))
        out.meta.update(node.meta)
        out.meta.update(qc_layer=layer_name, qc_bn=node.target, qc_module_type=type(fused).__name__)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def verify(gm: fx.GraphModule, config: QConfig) -> None:
    """Raise VerificationError unless every BatchNorm still called is tagged meta["qc_bn"] ==
    "affine" with a reason, and every BatchNormFold call reads a layer L (conv/linear) whose weight
    operand is fold_weight(...), which has no bias and no user but that call, whose activation
    operand is the call's second argument, and whose fifth argument is the folded_bias node."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _BatchNorm):
            if node.meta.get("qc_bn") != "affine" or not node.meta.get("qc_bn_reason"):
                raise verification_error("fold_bn", node, gm, 'no BatchNorm call where folding applied: a BatchNorm '
                                         'left unfolded is tagged meta["qc_bn"] = "affine" with meta["qc_bn_reason"]')
        elif isinstance(mod, BatchNormFold):
            layer = node.args[0] if node.args else None
            if not (isinstance(layer, fx.Node) and layer.op == "call_function" and layer.target in WEIGHTED_FUNCTIONS):
                raise verification_error("fold_bn", node, gm, "its first argument to be the conv/linear it is folded into")
            weight = layer.args[1]
            if not (isinstance(weight, fx.Node) and weight.op == "call_function" and weight.target is fold_weight):
                raise verification_error("fold_bn", layer, gm, f"weight operand fold_weight(W, γ, σ², eps) (BatchNorm "
                                         f"{node.target!r} folded into it), not {getattr(weight, 'name', weight)!r}")
            if (len(layer.args) > 2 and layer.args[2] is not None) or "bias" in layer.kwargs:
                raise verification_error("fold_bn", layer, gm, f"no bias (BatchNorm {node.target!r} adds the folded bias)")
            if set(layer.users) != {node}:
                raise verification_error("fold_bn", layer, gm, f"no user but {node.name!r} (the layer's result is read "
                                         "after the BatchNorm correction)")
            if len(node.args) < 5 or not (isinstance(node.args[4], fx.Node) and node.args[4].target is folded_bias):
                raise verification_error("fold_bn", node, gm, "fifth argument the folded_bias(γ, β, μ, σ², eps, b) node "
                                         "(the bias of the eval form)")
            for user, at in ((weight, 4), (node.args[4], 6)):
                module = user.args[at] if len(user.args) > at else None
                if not (isinstance(module, fx.Node) and module.op == "get_attr" and module.target == node.target):
                    raise verification_error("fold_bn", user, gm, f"the BatchNormFold module {node.target!r} as an "
                                             "argument (it says whether the fold cancels in a forward)")
            if len(node.args) < 2 or node.args[1] is not layer.args[0]:
                raise verification_error("fold_bn", node, gm, f"second argument {layer.name}'s activation operand")
