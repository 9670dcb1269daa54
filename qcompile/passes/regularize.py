"""Pass `regularize`: register the training loss terms in `gm.regularizers`.

Invariant after this pass: `gm.regularizers` (what `qm.regularization()` sums) holds
  "log_barrier" — a `qcompile.train.log_barrier.LogBarrier` over every accumulator op that keeps
                  its exact accumulator (`narrow_acc` made it so: layer config `log_barrier=True`
                  and `acc_bits` set), in graph order, and the graph has exactly one node calling
                  it (target "regularizers.log_barrier"), before the output, with no user, whose
                  arguments are one tuple per such op node N:
                      (getitem(N, 1), N.args[1], N.args[2],
                       N.kwargs["a_scale"], N.kwargs["a_zero_point"], N.kwargs["b_scale"])
                  — the exact accumulator, b and bias operands and the input / weight grids, all
                  edges of the graph; the barrier's compile-time facts per op (`BarrierSite`) come
                  from N.meta["qc_accumulator"]. The node computes the term in a training forward;
                  `qm.regularization()` takes it (one term per training forward);
  "bn_rectification" — a `qcompile.train.bn_rectification.BNRectificationLoss` over every folded
                  BatchNorm whose config has `bn_rectification` > 0 (and a gradient to rectify),
                  a module whose forward() takes no argument and returns a scalar;
and nothing when no term is enabled. This pass changes no module another pass made.
"""
from __future__ import annotations

import operator

from torch import fx

from qcompile.config import QConfig
from qcompile.errors import QCompileError, VerificationError
from qcompile.passes.ops import module_type, verification_error
from qcompile.train.bn_rectification import BNRectificationLoss, add_bn_rectification
from qcompile.train.fused_bn import BatchNormFold
from qcompile.train.log_barrier import BarrierSite, LogBarrier
from qcompile.train.tiled import NarrowAccOp

BARRIER = "regularizers.log_barrier"          # the target of the barrier's node


def _exact_output(node: fx.Node) -> fx.Node | None:
    """getitem(node, 1): the exact accumulator of an op that keeps it (made by `narrow_acc`)."""
    return next((u for u in node.users if u.op == "call_function" and u.target is operator.getitem
                 and u.args[0] is node and u.args[1] == 1), None)


def barrier_arguments(node: fx.Node) -> tuple:
    """What the barrier node reads of accumulator op node `node`, in the order LogBarrier.forward takes it."""
    return (_exact_output(node), node.args[1], node.args[2], node.kwargs["a_scale"], node.kwargs["a_zero_point"],
            node.kwargs["b_scale"])


def _site(node: fx.Node, gm: fx.GraphModule, config: QConfig) -> BarrierSite:
    acc = node.meta["qc_accumulator"]
    a, w = acc["grids"]
    layer = node.meta.get("qc_layer", node.name)
    cfg = config.for_layer(layer, module_type(gm, layer))
    return BarrierSite(layer=layer, kind=acc["kind"], acc_bits=acc["acc_bits"],
                       tile=acc["tile"], a_qrange=tuple(a["qrange"]), weight_qmax=w["qrange"][1],
                       weight_current=w["estimator"] == "current" and w["symmetric"] and not w["overflow_free"],
                       weight_per_channel=w["axis"] is not None,
                       weight=float(cfg.barrier_weight), bound_weight=float(cfg.barrier_bound_weight))


def _keeps_exact(node: fx.Node) -> bool:
    return node.op == "call_module" and bool(node.meta.get("qc_accumulator", {}).get("keep_exact"))


def regularize(gm: fx.GraphModule, config: QConfig) -> fx.GraphModule:
    graph = gm.graph
    stale = [n for n in graph.nodes if n.op == "call_module" and n.target == BARRIER]
    for node in stale:
        graph.erase_node(node)                                   # run twice: one barrier node
    sites = [n for n in graph.nodes if _keeps_exact(n)]
    lost = [n.name for n in sites if _exact_output(n) is None]
    if lost:
        raise QCompileError(f"regularize: accumulator op node(s) {lost} keep their exact accumulator but nothing reads "
                            "it as getitem(op, 1); the graph was edited after `narrow_acc`")
    if sites:
        gm.regularizers["log_barrier"] = LogBarrier([_site(n, gm, config) for n in sites], config.barrier_t0,
                                                    config.barrier_growth, config.barrier_interval)
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(output):
            call = graph.call_module(BARRIER, tuple(barrier_arguments(n) for n in sites))
        call.meta.update(qc_module_type="LogBarrier", qc_regularizer="log_barrier")
    elif config.log_barrier:
        raise QCompileError("QConfig.log_barrier=True but no layer has a narrow accumulator: the barrier keeps "
                            "an acc_bits-bit accumulator from overflowing; set acc_bits (or disable log_barrier)")
    add_bn_rectification(gm)
    if stale or sites:                                           # the graph changed
        graph.lint()
        gm.recompile()
    return gm


def verify(gm: fx.GraphModule, config: QConfig) -> None:
    """Raise VerificationError unless gm.regularizers holds exactly the terms the config asks for:
    "log_barrier" over exactly the accumulator ops with acc_bits whose layer sets log_barrier (in
    graph order), called by exactly one node of the graph, with no user, whose arguments are, per
    op node N, (getitem(N, 1), N's b and bias operands, N's a_scale, a_zero_point and b_scale
    inputs); no such node without the term; and "bn_rectification" over exactly the folded
    BatchNorms with λ > 0 that pass a gradient on."""
    barrier = [n for n in gm.graph.nodes if n.op == "call_module" and n.target != BARRIER
               and isinstance(op := gm.get_submodule(n.target), NarrowAccOp) and op.acc_bits is not None
               and config.for_layer(op.layer, module_type(gm, op.layer)).log_barrier]
    layers = [gm.get_submodule(n.target).layer for n in barrier]
    rectified = [name for name, m in gm.named_modules() if isinstance(m, BatchNormFold) and m.propagates_gradient
                 and config.for_layer(name, BatchNormFold).bn_rectification > 0]
    expected = {"log_barrier": (LogBarrier, layers), "bn_rectification": (BNRectificationLoss, sorted(rectified))}
    expected = {k: v for k, v in expected.items() if v[1]}
    terms = dict(getattr(gm, "regularizers", {}).items())
    for name in sorted(terms.keys() | expected.keys()):
        where = f"verify after pass 'regularize': gm.regularizers[{name!r}]"
        if name not in terms:
            raise VerificationError(f"{where} is missing; the config asks for it over {len(expected[name][1])} layer(s)")
        if name not in expected:
            raise VerificationError(f"{where} ({type(terms[name]).__name__}) is a term the config does not ask for")
        kind, members = expected[name]
        term = terms[name]
        got = None if not isinstance(term, kind) else \
            [s.layer for s in term.sites] if name == "log_barrier" else sorted(n for n, _ in term.blocks)
        if got != members:
            raise VerificationError(f"{where} ({type(term).__name__}): expected a {kind.__name__} over exactly "
                                    f"the layers {members}")
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == BARRIER]
    if not barrier:
        if calls:
            raise verification_error("regularize", calls[0], gm, "no log-barrier node (no layer asks for the barrier)")
        return
    if not calls:
        raise VerificationError(f"verify after pass 'regularize': no node calls {BARRIER!r}; expected one, reading "
                                f"the exact accumulators of {layers}")
    if len(calls) > 1:
        raise verification_error("regularize", calls[1], gm, f"no second node calling {BARRIER!r} (one term per "
                                 "training forward)")
    call = calls[0]
    if call.users:
        raise verification_error("regularize", call, gm, "no user (qm.regularization() takes the term)")
    if call.kwargs or len(call.args) != len(barrier):
        raise verification_error("regularize", call, gm, f"{len(barrier)} argument tuples, one per op of {layers}")
    names = ("exact accumulator getitem(op, 1)", "b operand", "bias operand", "a_scale", "a_zero_point", "b_scale")
    sites = terms["log_barrier"].sites
    for node, args, site in zip(barrier, call.args, sites):
        want = barrier_arguments(node)
        if want[0] is None:
            raise verification_error("regularize", node, gm, "a getitem(op, 1) user: the op keeps its exact accumulator "
                                     "for the log barrier")
        if not isinstance(args, (tuple, list)) or len(args) != len(want):
            raise verification_error("regularize", call, gm, f"for layer {site.layer!r} a tuple {names}")
        for what, w, g in zip(names, want, args):
            if w is not g:
                raise verification_error("regularize", call, gm, f"for layer {site.layer!r} the {what} of "
                                         f"{node.name!r} ({getattr(w, 'name', w)!r}), not {getattr(g, 'name', g)!r}")
        op = gm.get_submodule(node.target)
        if (site.kind, site.acc_bits, site.tile) != (op.kind, op.acc_bits, op.tile):
            raise verification_error("regularize", call, gm, f"site {site.layer!r} with {op.kind}, acc_bits={op.acc_bits}, "
                                     f"tile={op.tile} (its op's), not {site.kind}, {site.acc_bits}, {site.tile}")
