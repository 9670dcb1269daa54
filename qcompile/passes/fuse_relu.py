"""Pass `fuse_relu`: a relu next to an activation quantizer becomes that quantizer call's `relu=` argument.

Invariant after this pass: no F.relu node is the only reader of an activation Quantizer call (such a call
now has `relu="after"` and stands where the relu stood), and no activation Quantizer call without `relu`
reads an F.relu node that only it reads (such a call has `relu="before"` and reads the relu's input); a
call's `relu` is None, "before" or "after", on activation quantizers only. The graph computes what it
computed before, in value and gradient, in every mode: the call is Q(relu(x)) or relu(Q(x)). A training
step on the quantizers' one-pass path then does the relu in the quantizer's pass over the tensor,
forward and backward, where it took a pass of its own each way (`qcompile.train.quantizers`); lowering
gives the relu the integer form a relu node has (a clamp at the zero point).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx

from qcompile.config import QConfig
from qcompile.passes.ops import verification_error
from qcompile.train.quantizers import RELU_PLACES, Quantizer


def _activation_quantizer(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(node.target)
    return isinstance(mod, Quantizer) and mod.kind == "activation"


def _is_relu(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.relu and len(node.args) == 1 and not node.kwargs


def _fusable_after(relu: fx.Node, gm: fx.GraphModule) -> bool:
    """relu(Q(x)) where the relu alone reads the quantizer call."""
    q = relu.args[0]
    return (isinstance(q, fx.Node) and _activation_quantizer(q, gm) and q.kwargs.get("relu") is None
            and list(q.users) == [relu])


def _fusable_before(relu: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The quantizer call of Q(relu(x)) where it alone reads the relu, else None."""
    users = list(relu.users)
    if len(users) == 1 and _activation_quantizer(users[0], gm) and users[0].args[0] is relu \
            and users[0].kwargs.get("relu") is None and relu not in users[0].args[1:]:
        return users[0]
    return None


def fuse_relu(gm: fx.GraphModule, config: QConfig) -> fx.GraphModule:
    for relu in [n for n in gm.graph.nodes if _is_relu(n)]:
        if _fusable_after(relu, gm):
            q = relu.args[0]
            q.kwargs = {**q.kwargs, "relu": "after"}
            relu.replace_all_uses_with(q)
        else:
            q = _fusable_before(relu, gm)
            if q is None:
                continue
            q.args = (relu.args[0], *q.args[1:])
            q.kwargs = {**q.kwargs, "relu": "before"}
        gm.graph.erase_node(relu)
    gm.graph.lint()
    gm.recompile()
    return gm


def verify(gm: fx.GraphModule, config: QConfig) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Quantizer):
            relu = node.kwargs.get("relu")
            if relu not in RELU_PLACES or relu is not None and not _activation_quantizer(node, gm):
                raise verification_error("fuse_relu", node, gm, "relu=None, or 'before' / 'after' on an activation "
                                         f"quantizer (got {relu!r})")
        if _is_relu(node) and (_fusable_after(node, gm) or _fusable_before(node, gm) is not None):
            raise verification_error("fuse_relu", node, gm, "no relu that only an activation quantizer reads, or "
                                     "that reads only an activation quantizer call (the pass fuses it into the call)")
