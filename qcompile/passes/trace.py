"""Pass `trace`: float nn.Module → torch.fx GraphModule with shapes in `node.meta`.

Invariant: the input model is not mutated (a deep copy is traced); every node that
produces a tensor carries `meta["tensor_meta"]` (shape, dtype) from running the example
inputs in eval mode under no_grad; call_module nodes carry `meta["qc_module_type"]`. A model
traced in train mode whose eval output is one field of what it returns in training (auxiliary
heads) returns through an `EvalOutput` module (`eval_output`) that picks that field in eval.
Attention is traced in the ops the passes see: every nn.MultiheadAttention of the copy is an
`Attention` on the same parameters (same state_dict keys), and F.scaled_dot_product_attention is
`qcompile.train.attention.scaled_dot_product_attention` while tracing (`qcompile.train.attention`);
torchvision's Swin window attention and patch merging are stand-ins built for the shapes the example
inputs give them (`qcompile.train.windows`).
Failure to trace raises TraceError naming the module and the source line.
"""
from __future__ import annotations

import copy
import linecache
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qcompile.errors import TraceError
from qcompile.passes.ops import verification_error
from qcompile.train.attention import own_attention, scaled_dot_product_attention
from qcompile.train.modes import EvalOutput
from qcompile.train.windows import own_windows


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[str, ...]):
        super().__init__()
        self.leaf_names = set(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def _locate(model: nn.Module, tb) -> tuple[str, str]:
    """(module path, 'file:line: code') of the deepest model frame in a traceback."""
    names = {id(m): (n or "<root>") for n, m in model.named_modules()}
    where_mod, where_line = "<root>", "<unknown line>"
    for frame, lineno in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            code = linecache.getline(frame.f_code.co_filename, lineno).strip()
            where_mod = names[id(owner)]
            where_line = f"{frame.f_code.co_filename}:{lineno}: {code}"
    return where_mod, where_line


def trace(model: nn.Module, example_inputs: tuple, leaf_modules: tuple[str, ...] = (),
          concrete_args: dict | None = None) -> fx.GraphModule:
    model = copy.deepcopy(model)
    tracer = _Tracer(leaf_modules)
    sdpa = F.scaled_dot_product_attention
    try:
        own_attention(model, leaf_modules)
        own_windows(model, example_inputs, leaf_modules)
        F.scaled_dot_product_attention = scaled_dot_product_attention
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises plain TraceError/TypeError/RuntimeError
        module, line = _locate(model, sys.exc_info()[2])
        raise TraceError(
            f"torch.fx cannot trace module {module!r} ({type(model.get_submodule('' if module == '<root>' else module)).__name__}) "
            f"at {line}\n  cause: {type(exc).__name__}: {exc}\n  fix: make that module a leaf "
            f"(QConfig(leaf_modules=({module!r},)) or leaf_modules=... in compile) so it is called "
            "as a black box, or pass concrete_args for the argument the control flow depends on"
        ) from exc
    finally:
        F.scaled_dot_product_attention = sdpa
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            node.meta["qc_module_type"] = type(gm.get_submodule(node.target)).__name__
    modes = {m: m.training for m in list(gm.modules()) + list(model.modules())}
    if model.training:
        _select_eval_output(model, gm, example_inputs)
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise TraceError(f"the traced graph failed to run on the example inputs: {type(exc).__name__}: {exc}") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    return gm


@torch.no_grad()
def _select_eval_output(model: nn.Module, gm: fx.GraphModule, example_inputs: tuple) -> None:
    """When `model` (traced in train mode) returns one tensor in eval but a tuple from the traced graph
    (GoogLeNet's and Inception's namedtuples with auxiliary logits), route the graph's output through
    an EvalOutput picking the field equal to the eval output. Leaves the modules in eval mode (the
    caller restores them)."""
    model.eval()
    gm.eval()
    try:
        ref, out = model(*example_inputs), gm(*example_inputs)
    except Exception:
        return                   # the eval forward itself fails: shape propagation reports it next
    if not isinstance(ref, torch.Tensor) or not isinstance(out, (tuple, list)):
        return
    index = next((i for i, v in enumerate(out) if isinstance(v, torch.Tensor) and v.shape == ref.shape
                  and torch.allclose(v, ref, rtol=1e-5, atol=1e-6)), None)
    if index is None:
        return
    output = next(n for n in gm.graph.nodes if n.op == "output")
    gm.add_submodule("eval_output", EvalOutput(index))
    with gm.graph.inserting_before(output):
        node = gm.graph.call_module("eval_output", (output.args[0],))
    node.meta["qc_module_type"] = "EvalOutput"
    output.args = (node,)
    gm.recompile()


def verify(gm: fx.GraphModule, config=None) -> None:
    """Raise VerificationError unless every node ran under ShapeProp (meta["type"]), every node
    whose value holds a tensor carries meta["tensor_meta"], and every call_module node carries
    meta["qc_module_type"] naming its module's type."""
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if "type" not in node.meta and "tensor_meta" not in node.meta:
            raise verification_error("trace", node, gm, 'meta["type"] / meta["tensor_meta"] from shape propagation '
                                     "on the example inputs (the node was never run)")
        kind = node.meta.get("type")
        if isinstance(kind, type) and issubclass(kind, torch.Tensor) and node.meta.get("tensor_meta") is None:
            raise verification_error("trace", node, gm, f'meta["tensor_meta"] (shape, dtype): it produces a {kind.__name__}')
        if node.op == "call_module" and node.meta.get("qc_module_type") != type(gm.get_submodule(node.target)).__name__:
            raise verification_error("trace", node, gm, f'meta["qc_module_type"] = '
                                     f'{type(gm.get_submodule(node.target)).__name__!r}, not {node.meta.get("qc_module_type")!r}')
