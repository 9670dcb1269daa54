"""`accumulator_bounds(qm)`: the accumulator width each quantized matmul needs to never overflow.

For a layer with integer weights w_int (O, K) in reduction order, inputs |x − zx| <= X (the
input grid's largest integer magnitude) and bias_int, channel o's accumulator can reach at
most B_o = Σ_k |w_int[o, k]|·X + |bias_int[o]| over the whole reduction and
T_o = max_t Σ_(k in tile t) |w_int[o, k]|·X within one tile (the partial sum a tile adds).
The smallest safe signed width is P = ⌈log2(B + 1)⌉ + 1 (Brevitas A2Q's P_min, with the bias);
a width >= P_whole guarantees that no prefix of the reduction overflows, whatever the tiling.
Matmuls of two activations: B = K·A·B' with A, B' their operands' largest integer magnitudes.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.core.accumulator import acc_range, l1_bounds, min_acc_bits
from qcompile.core.grids import bias_codes, quantize_codes
from qcompile.passes.ops import is_matmul, layer_result
from qcompile.passes.quantize import grid_source
from qcompile.train.fused_bn import BatchNormFold
from qcompile.train.quantizers import Quantizer
from qcompile.train.tiled import NarrowAccOp, grid_absmax


@torch.no_grad()
def _constant(node, gm):
    """The current value of a node computed from parameters and buffers alone (a weight, a BN-folded
    weight, a bias), walking back through quantizer nodes; None when it depends on an input."""
    while node is not None and node.op == "call_module" and isinstance(gm.get_submodule(node.target), Quantizer):
        node = node.args[0]
    if node is None:
        return None
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj.detach() if isinstance(obj, torch.Tensor) else obj
    if node.op in ("call_function", "call_module"):     # e.g. a BN-folded weight, a bias rounded by BiasQuant
        args = [(_constant(a, gm) if isinstance(a, fx.Node) else a) for a in node.args]
        if node.kwargs or any(a is None for a, raw in zip(args, node.args) if isinstance(raw, fx.Node)):
            return None
        fn = node.target if node.op == "call_function" else gm.get_submodule(node.target)
        return fn(*args)
    return None


@torch.no_grad()
def _weight_codes(w: torch.Tensor, q: Quantizer, context=()) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer weights, scale) of the current parameter on the grid its quantizer would use now
    (`context`: the quantizer node's further inputs, e.g. an overflow-free grid's input grid and bias)."""
    lo, hi, _ = q.estimator(w, update=False, who=q.layer)
    scale, zp = q.forward_grid(w, lo, hi, *context)
    zp_b = zp.reshape(-1, *[1] * (w.dim() - 1)) if q.axis is not None and zp.dim() else zp
    return quantize_codes(w, scale, zp, q.qrange, q.axis) - zp_b, scale


def accumulator_bounds(qm) -> list[dict]:
    """One row per quantized matmul: layer, kind, K, tile, acc_bits, worst-case |acc| and the smallest
    safe width for the whole reduction (`bound`, `p_min`) and for one tile (`tile_bound`, `p_min_tile`),
    and the margin acc_max − bound when the layer has a narrow accumulator. Needs the input grids,
    i.e. a calibration or a forward pass."""
    rows = []
    for node in qm.graph.nodes:
        op = qm.get_submodule(node.target) if node.op == "call_module" else None
        if not (is_matmul(node) or isinstance(op, NarrowAccOp)):
            continue
        a_src, b_src = grid_source(node.args[0], qm), grid_source(node.args[1], qm)
        if a_src is None or b_src is None:
            continue
        qa, qb = qm.get_submodule(a_src.target), qm.get_submodule(b_src.target)
        layer = node.meta.get("qc_layer", node.name)
        tile = op.tile if isinstance(op, NarrowAccOp) else qm.config.for_layer(layer).acc_tile
        acc_bits = op.acc_bits if isinstance(op, NarrowAccOp) else None
        if qb.kind == "weight":
            w = _constant(node.args[1], qm)
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"accumulator_bounds: the weight of layer {layer!r} (node {node.name}) is not "
                                 "computed from parameters alone")
            context = tuple(_constant(a, qm) if isinstance(a, fx.Node) else a for a in b_src.args[1:])
            w_int, sw = _weight_codes(w, qb, context)
            result = layer_result(node, qm)   # a folded BatchNorm's eval bias is added in the accumulator
            folded = result.op == "call_module" and isinstance(qm.get_submodule(result.target), BatchNormFold)
            bias_node = result.args[4] if folded else (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
            bias_abs = None
            if bias_node is not None:
                b = _constant(bias_node, qm)
                bias_abs = bias_codes(b, qa.scale, sw)[0].abs() if isinstance(b, torch.Tensor) else None
            w_abs = w_int.abs().reshape(w_int.shape[0], -1).to(torch.float64)
            whole, per_tile = l1_bounds(w_abs, grid_absmax(qa.qrange, qa.zero_point), bias_abs, tile)
            K, kind = w_abs.shape[1], ("conv" if w.dim() > 2 else "linear")
        else:
            K = node.args[0].meta["tensor_meta"].shape[-1]
            w_abs = torch.full((1, K), grid_absmax(qb.qrange, qb.zero_point), dtype=torch.float64)
            whole, per_tile = l1_bounds(w_abs, grid_absmax(qa.qrange, qa.zero_point), None, tile)
            kind = "matmul"
        bound, tbound = float(whole.max()), float(per_tile.max())
        row = {"layer": layer, "kind": kind, "K": int(K), "tile": tile, "acc_bits": acc_bits,
               "bound": bound, "p_min": min_acc_bits(bound), "tile_bound": tbound, "p_min_tile": min_acc_bits(tbound),
               "margin": acc_range(acc_bits)[1] - bound if acc_bits is not None else None}
        rows.append(row)
    return rows
