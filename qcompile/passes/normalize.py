"""Pass `normalize`: one canonical form per op.

Invariant after this pass: conv/linear/LayerNorm/RMSNorm/Embedding modules are calls of F.conv1d/F.conv2d/
F.linear/F.layer_norm/F.rms_norm/F.embedding whose weight and bias are `get_attr` nodes (an nn.Embedding with
max_norm, which renormalizes its weight in place, stays a module: a float fallback) (the modules stay in the hierarchy as parameter
holders, so `state_dict()` keys are unchanged); an F.linear on a `get_attr` weight that no module
made (attention's packed q|k|v projection) is named after it (`qc_layer`: the weight's path less
`_weight`/`.weight`); F.layer_norm takes its five arguments positionally; an einsum of the two
attention forms ("…id,…jd->…ij", "…ij,…jd->…id") is a matmul (with a transpose for the first); activation modules are calls of their
functional form; no call passes `inplace=True`; in-place/alias forms (`+=`, `torch.add`,
`.relu_()`...) are their out-of-place operator or function; a dropout or stochastic-depth call
traced with the model's mode as its `training` constant is a module call (nn.Dropout,
`StochasticDepth`) whose randomness follows the graph module's mode. Every layer node carries
`meta["qc_layer"]` (module path) and `meta["qc_module_type"]`. Every call whose inputs are parameters,
buffers or such calls alone (a function or method call with no tensor input at all, a constant made in
`forward`, included) (Swin v2's continuous position-bias MLP on its coordinate table, the exp of
a logit scale, a bias with a part zeroed) carries `meta["qc_parameter_only"]`: a function of the
parameters, evaluated once in float at lowering (`qcompile.passes.ops`, family "parameter").
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from qcompile.passes.ops import (
    ACTIVATION_MODULES,
    CANONICAL_FUNCTIONS,
    CANONICAL_METHODS,
    CONV_MODULES,
    LINEAR_MODULES,
    WEIGHTED_FUNCTIONS,
    free_path,
    verification_error,
)
from qcompile.train.modes import StochasticDepth


def _conv_function(mod):
    return {1: F.conv1d, 2: F.conv2d}[len(mod.kernel_size)]


def _mode_call(node: fx.Node, training: bool):
    """(module, input) standing for a dropout / stochastic-depth call whose `training` argument is the
    constant `training` (the model's mode when traced), else None."""
    def arg(i, name, default):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
    if node.target is F.dropout and arg(2, "training", True) is training:
        return nn.Dropout(arg(1, "p", 0.5)), node.args[0]
    if getattr(node.target, "__name__", None) == "stochastic_depth" and arg(3, "training", None) is training:
        return StochasticDepth(node.target, arg(1, "p", None), arg(2, "mode", None)), node.args[0]
    return None


def _einsum_as_matmul(node: fx.Node, graph: fx.Graph) -> bool:
    """Rewrite torch.einsum of the two attention forms over equal batch letters into matmul:
    "…id,…jd->…ij" = a @ bᵀ and "…ij,…jd->…id" = a @ b. False (left alone) for any other equation."""
    if node.target is not torch.einsum or len(node.args) != 3 or not isinstance(node.args[0], str):
        return False
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return False
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2 or len({len(parts[0]), len(parts[1]), len(out)}) != 1 or len(out) < 2:
        return False
    (a, b), batch = parts, out[:-2]
    if a[:-2] != batch or b[:-2] != batch:
        return False
    i, k = a[-2:]
    if b[-2:] == k[0] + out[-1] and out[-2:] == i + out[-1] and out[-1] not in a:      # a @ b
        rhs = node.args[2]
    elif b[-1] == k and out[-2:] == i + b[-2] and b[-2] not in a:                       # a @ bᵀ
        with graph.inserting_before(node):
            rhs = graph.call_method("transpose", (node.args[2], -2, -1))
        meta = node.args[2].meta.get("tensor_meta")
        if meta is not None:
            shape = list(meta.shape)
            shape[-2:] = shape[-1], shape[-2]
            rhs.meta["tensor_meta"] = meta._replace(shape=torch.Size(shape))
    else:
        return False
    node.target, node.args = torch.matmul, (node.args[1], rhs)
    return True


def _as_function(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> None:
    """Replace the call of conv/linear/embedding/LayerNorm/RMSNorm module `mod` by its functional form on
    `get_attr` weight and bias nodes."""
    graph = gm.graph
    with graph.inserting_before(node):
        w = graph.get_attr(f"{node.target}.weight") if mod.weight is not None else None
        b = graph.get_attr(f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
        x = node.args[0]
        if isinstance(mod, CONV_MODULES):
            new = graph.call_function(_conv_function(mod), (x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups))
        elif isinstance(mod, nn.Embedding):
            new = graph.call_function(F.embedding, (x, w, mod.padding_idx))
        elif isinstance(mod, nn.LayerNorm):
            new = graph.call_function(F.layer_norm, (x, tuple(mod.normalized_shape), w, b, mod.eps))
        elif isinstance(mod, nn.RMSNorm):
            new = graph.call_function(F.rms_norm, (x, tuple(mod.normalized_shape), w, mod.eps))
        else:
            new = graph.call_function(F.linear, (x, w, b))
    if w is not None:
        w.meta["tensor_meta"] = _extract_tensor_metadata(mod.weight)
    new.meta.update(node.meta)
    new.meta["qc_layer"] = node.target
    new.meta["qc_module_type"] = type(mod).__name__
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _module_path(node: fx.Node, gm: fx.GraphModule) -> str:
    """A free submodule path for `node`'s module: the traced module's own path where fx recorded it."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    path = stack[-1][0] if stack and isinstance(stack[-1], tuple) else node.name
    return free_path(gm, path or node.name)


def normalize(gm: fx.GraphModule, config=None) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and (made := _mode_call(node, gm.training)) is not None:
            mod, x = made
            path = _module_path(node, gm)
            gm.add_submodule(path, mod)
            with graph.inserting_before(node):
                new = graph.call_module(path, (x,))
            new.meta.update(node.meta)
            new.meta["qc_module_type"] = type(mod).__name__
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, CONV_MODULES + LINEAR_MODULES + (nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
                if getattr(mod, "padding_mode", "zeros") != "zeros" or getattr(mod, "max_norm", None) is not None:
                    continue  # stays a module: listed as a float fallback by quantize
                _as_function(gm, node, mod)
            elif type(mod) in ACTIVATION_MODULES:
                kwargs = {"approximate": mod.approximate} if isinstance(mod, nn.GELU) else {}
                with graph.inserting_before(node):
                    new = graph.call_function(ACTIVATION_MODULES[type(mod)], (node.args[0],), kwargs)
                new.meta.update(node.meta)
                new.meta["qc_layer"] = node.target
                node.replace_all_uses_with(new)
                graph.erase_node(node)
        elif node.op == "call_function":
            _einsum_as_matmul(node, graph)
            if node.target is F.layer_norm and node.kwargs:     # positional: (x, shape, weight, bias, eps)
                names = ("input", "normalized_shape", "weight", "bias", "eps")
                given = dict(zip(names, node.args), **node.kwargs)
                node.args, node.kwargs = tuple(given.get(n, d) for n, d in zip(names, (None, None, None, None, 1e-5))), {}
            if node.target is F.linear and "qc_layer" not in node.meta and len(node.args) > 1 and \
                    isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
                path = node.args[1].target
                node.meta["qc_layer"] = path.removesuffix(".weight").removesuffix("_weight")
                node.meta["qc_module_type"] = "Linear"
            if "inplace" in node.kwargs:
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
            target = CANONICAL_FUNCTIONS.get(node.target, node.target)
            if target is not node.target and not node.kwargs:
                node.target = target
        elif node.op == "call_method" and node.target in CANONICAL_METHODS and not node.kwargs:
            node.op, node.target = "call_function", CANONICAL_METHODS[node.target]
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and all(
                a.op == "get_attr" or a.meta.get("qc_parameter_only") for a in node.all_input_nodes) or \
                node.op == "call_module" and node.all_input_nodes and all(
                a.op == "get_attr" or a.meta.get("qc_parameter_only") for a in node.all_input_nodes):
            node.meta["qc_parameter_only"] = True
    graph.lint()
    gm.recompile()
    return gm


# in-place forms normalize rewrites whatever their arguments (an alias such as torch.add is
# only rewritten without keyword arguments, so it may legitimately remain with them)
_INPLACE_FUNCTIONS = {torch.relu_, F.relu_, operator.iadd, operator.imul}
_INPLACE_METHODS = {m for m in CANONICAL_METHODS if m.endswith("_")}


def verify(gm: fx.GraphModule, config=None) -> None:
    """Raise VerificationError unless no conv/linear module is called (except a conv whose
    padding_mode is not "zeros", left for quantize to list as a float fallback), every
    F.conv*/F.linear made from a module reads `get_attr` weight and bias, no activation module
    is called, no call passes inplace=True, no in-place or alias form remains, and no dropout or
    stochastic-depth call has the model's mode as a constant."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and _mode_call(node, gm.training) is not None:
            raise verification_error("normalize", node, gm, "a module call whose randomness follows the graph "
                                     "module's mode (nn.Dropout / StochasticDepth), not a constant training="
                                     f"{gm.training}")
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, CONV_MODULES + LINEAR_MODULES + (nn.LayerNorm, nn.RMSNorm)) and \
                    getattr(mod, "padding_mode", "zeros") == "zeros" or \
                    isinstance(mod, nn.Embedding) and mod.max_norm is None:
                raise verification_error("normalize", node, gm, "a call of F.conv1d/F.conv2d/F.linear/F.layer_norm/F.rms_norm/F.embedding on the "
                                         "module's get_attr weight and bias, not a call of the module")
            if type(mod) in ACTIVATION_MODULES:
                raise verification_error("normalize", node, gm, f"a call of {ACTIVATION_MODULES[type(mod)].__name__}, "
                                         "not of the activation module")
        elif node.op in ("call_function", "call_method"):
            if node.kwargs.get("inplace"):
                raise verification_error("normalize", node, gm, "no inplace=True")
            inplace = _INPLACE_FUNCTIONS if node.op == "call_function" else _INPLACE_METHODS
            aliases = CANONICAL_FUNCTIONS if node.op == "call_function" else CANONICAL_METHODS
            if node.target in inplace or (node.target in aliases and not node.kwargs):
                name = CANONICAL_FUNCTIONS.get(node.target) or CANONICAL_METHODS.get(node.target)
                raise verification_error("normalize", node, gm, f"its out-of-place canonical form {name.__name__}")
            if node.op == "call_function" and node.target in WEIGHTED_FUNCTIONS and "qc_layer" in node.meta:
                w, b = (list(node.args[1:3]) + [None])[:2]
                if not (isinstance(w, fx.Node) and w.op == "get_attr") or "qc_module_type" not in node.meta or \
                        b is not None and not (isinstance(b, fx.Node) and (b.op == "get_attr"
                                                                           or b.meta.get("qc_parameter_only"))):
                    raise verification_error("normalize", node, gm, "a get_attr weight, a bias that is a get_attr or "
                                             'a function of parameters, and meta["qc_module_type"] (a layer made from a module)')
