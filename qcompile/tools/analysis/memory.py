"""Memory traffic of static vs dynamic quantization, per conv / linear / matmul layer.

The model is section 6 of `in-hindsight-range-estimation.txt` (forward pass):

  static  (eq. 4): |W|·b_w + |X|·b_in + |Y|·b_out
  dynamic (eq. 5): |W|·b_w + |X|·b_in + |Y|·b_acc  (accumulator output written)
                                      + |Y|·b_acc  (read back once its range is known)
                                      + |Y|·b_out  (written quantized)

where |W| is the number of weight elements (C_out·C_in/groups·k², so depthwise layers
count C·k²), |X| and |Y| the number of input and output elements of the layer (batch
included; eq. 4's C_in·W·H and C_out·W·H when the stride is 1), and the widths come from
the layer's own quantizers: b_w from its weight quantizer, b_in from the activation
quantizer its input comes from, b_out from its output quantizer (after the layer's result
BatchNormFold call when a BatchNorm is folded into it, `qcompile.passes.ops.layer_result`), b_acc from the layer's
accumulator width (`acc_bits` of a narrow-accumulator op, else the config's `acc_bits`,
else 32). The paper prints the read-back term of eq. 5 with b_a; its Table 5 figures are
reproduced only with b_acc (the accumulator values are read back at full width), which
is what section 3.2 describes and what is used here.

Each layer is then charged as configured: the static cost when its output quantizer's
estimator is static (in-hindsight, DSGC, fixed), the dynamic cost otherwise (current,
running min-max). Invariant: dynamic − static = 2·|Y|·b_acc ≥ 0 for every layer, and the
totals are the sums of the rows.

The backward pass (figure 1 of the paper, "follows analogously") runs one matmul per operand
O of the layer that needs a gradient: G_O = ∂(G̃_Y, the other operands). Each reads G̃_Y and
every other operand, and writes G_O:

  static  (backward): Σ_O [ |Y|·b_gy + Σ_{O' ≠ O} |O'|·b_O' + |O|·b_gO ]
  dynamic (backward): static + Σ_{O with a quantized gradient} 2·|O|·b_acc'

- b_gy is the width of the gradient quantizer Q_G that wrote G̃_Y: the one on the edge into
  the next layer, reached through the ops between, which are taken as fused (ReLU masks,
  pooling, reshapes, residual adds, folded BatchNorm). It is 32 where G_Y is float (the loss
  gradient of the last layer, or a consumer without Q_G).
- b_gO is the width of the operand's own Q_G (an activation's G_X, quantized before it is
  propagated) or 32 for a float gradient. The weight gradient is written in FP32 as in the
  paper, or at its Q_G's width with `quantize_weight_grad`.
- The model's input needs no gradient: the first layer has no G_X matmul.
- b_acc' is the backward accumulator width: `grad_acc_bits` of the layer's accumulator op,
  else the forward b_acc.

A quantized G_O is charged the dynamic cost when its Q_G's estimator is dynamic. A float one
has none: it is written once. Invariant: backward dynamic − static = 2·Σ|O|·b_acc' over the
quantized gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.passes.ops import is_grid_preserving, is_matmul, layer_result, quantizer_of

KB = 1024  # the paper's KB (its Table 5 figures are bytes / 1024)
DEFAULT_ACC_BITS = 32


@dataclass(frozen=True)
class Operand:
    """One operand of a layer as its backward pass sees it: size and width read, and the gradient the
    backward writes for it (width, whether a quantizer with a static estimator produces it)."""
    elems: int
    bits: int
    grad_bits: int            # 32: a float gradient
    grad_quantized: bool
    grad_static: bool
    needs_grad: bool          # False for the model's input
    grad_estimator: str


@dataclass(frozen=True)
class LayerTraffic:
    """One layer's forward traffic in bits, with the shapes and widths it was computed from."""
    layer: str
    node: str
    kind: str
    c_in: int
    c_out: int
    in_hw: tuple[int, ...]
    out_hw: tuple[int, ...]
    weight_elems: int
    input_elems: int
    output_elems: int
    b_w: int
    b_in: int
    b_out: int
    b_acc: int
    estimator: str
    static: bool
    operands: tuple[Operand, ...] = ()
    b_gy: int = 32
    b_acc_backward: int = 32

    @property
    def static_bits(self) -> int:
        return self.weight_elems * self.b_w + self.input_elems * self.b_in + self.output_elems * self.b_out

    @property
    def dynamic_bits(self) -> int:
        return self.static_bits + 2 * self.output_elems * self.b_acc

    @property
    def static_bytes(self) -> float:
        return self.static_bits / 8

    @property
    def dynamic_bytes(self) -> float:
        return self.dynamic_bits / 8

    @property
    def configured_bytes(self) -> float:
        """The cost under this layer's own output estimator (static or dynamic)."""
        return self.static_bytes if self.static else self.dynamic_bytes

    @property
    def delta(self) -> float:
        """(dynamic − static) / static: the paper's 'Delta' column."""
        return self.dynamic_bits / self.static_bits - 1

    # ---- backward pass -----------------------------------------------------------------------
    @property
    def gradient_ops(self) -> int:
        return sum(o.needs_grad for o in self.operands)

    @property
    def backward_static_bits(self) -> int:
        reads = sum(o.elems * o.bits for o in self.operands)
        return sum(self.output_elems * self.b_gy + reads - o.elems * o.bits + o.elems * o.grad_bits
                   for o in self.operands if o.needs_grad)

    def _backward_overhead(self, only_dynamic: bool) -> int:
        return sum(2 * o.elems * self.b_acc_backward for o in self.operands
                   if o.needs_grad and o.grad_quantized and not (only_dynamic and o.grad_static))

    @property
    def backward_dynamic_bits(self) -> int:
        return self.backward_static_bits + self._backward_overhead(only_dynamic=False)

    @property
    def backward_configured_bits(self) -> int:
        """The cost under each gradient quantizer's own estimator."""
        return self.backward_static_bits + self._backward_overhead(only_dynamic=True)

    @property
    def grad_estimator(self) -> str:
        names = sorted({o.grad_estimator for o in self.operands if o.needs_grad and o.grad_quantized})
        return "/".join(names) or "none (float gradients)"


@dataclass
class MemoryTraffic:
    """Per-layer rows and network totals (bytes) for one input shape."""
    input_shape: tuple[int, ...]
    layers: list[LayerTraffic]

    @property
    def static_bytes(self) -> float:
        return sum(r.static_bytes for r in self.layers)

    @property
    def dynamic_bytes(self) -> float:
        return sum(r.dynamic_bytes for r in self.layers)

    @property
    def configured_bytes(self) -> float:
        return sum(r.configured_bytes for r in self.layers)

    @property
    def delta(self) -> float:
        return self.dynamic_bytes / self.static_bytes - 1 if self.layers else 0.0

    @property
    def backward_static_bytes(self) -> float:
        return sum(r.backward_static_bits for r in self.layers) / 8

    @property
    def backward_dynamic_bytes(self) -> float:
        return sum(r.backward_dynamic_bits for r in self.layers) / 8

    @property
    def backward_configured_bytes(self) -> float:
        return sum(r.backward_configured_bits for r in self.layers) / 8

    def totals(self) -> dict[str, tuple[float, float, float]]:
        """{"forward" | "backward" | "training step": (static, dynamic, as configured) bytes}."""
        fwd = (self.static_bytes, self.dynamic_bytes, self.configured_bytes)
        bwd = (self.backward_static_bytes, self.backward_dynamic_bytes, self.backward_configured_bytes)
        return {"forward": fwd, "backward": bwd, "training step": tuple(a + b for a, b in zip(fwd, bwd))}

    def backward_table(self, markdown: bool = True) -> str:
        """Every layer's backward matmuls (G_X and G_W, or both operands of an act×act matmul), then the
        totals; KB of 1024 bytes."""
        head = ["layer", "gradient matmuls", "b_gy", "operand b / b_g", "static KB", "dynamic KB", "delta",
                "gradient estimator", "as configured KB"]
        rows = []
        for r in self.layers:
            d = r.backward_dynamic_bits / r.backward_static_bits - 1
            widths = ", ".join(f"{o.bits}/{o.grad_bits if o.needs_grad else '-'}" for o in r.operands)
            rows.append([r.layer, str(r.gradient_ops), str(r.b_gy), widths, f"{r.backward_static_bits / 8 / KB:.1f}",
                         f"{r.backward_dynamic_bits / 8 / KB:.1f}", f"+{100 * d:.0f}%", r.grad_estimator,
                         f"{r.backward_configured_bits / 8 / KB:.1f}"])
        d = self.backward_dynamic_bytes / self.backward_static_bytes - 1
        rows.append([f"**total ({len(self.layers)} layers)**", "", "", "", f"{self.backward_static_bytes / KB:.1f}",
                     f"{self.backward_dynamic_bytes / KB:.1f}", f"+{100 * d:.0f}%", "",
                     f"{self.backward_configured_bytes / KB:.1f}"])
        return _format(head, rows, markdown)

    def table(self, markdown: bool = True) -> str:
        """Every layer, then the totals; sizes in KB (1024 bytes) as in the paper's Table 5."""
        head = ["layer", "kind", "C_in", "C_out", "in H×W", "out H×W", "b_w/b_in/b_out/b_acc",
                "static KB", "dynamic KB", "delta", "output estimator", "as configured KB"]
        rows = []
        for r in self.layers:
            rows.append([r.layer, r.kind, str(r.c_in), str(r.c_out), "×".join(map(str, r.in_hw)) or "-",
                         "×".join(map(str, r.out_hw)) or "-", f"{r.b_w}/{r.b_in}/{r.b_out}/{r.b_acc}",
                         f"{r.static_bytes / KB:.1f}", f"{r.dynamic_bytes / KB:.1f}", f"+{100 * r.delta:.0f}%",
                         f"{r.estimator} ({'static' if r.static else 'dynamic'})", f"{r.configured_bytes / KB:.1f}"])
        rows.append([f"**total ({len(self.layers)} layers)**", "", "", "", "", "", "",
                     f"{self.static_bytes / KB:.1f}", f"{self.dynamic_bytes / KB:.1f}", f"+{100 * self.delta:.0f}%",
                     "", f"{self.configured_bytes / KB:.1f}"])
        return _format(head, rows, markdown)


def _format(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i].strip("*")) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.strip("*").ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([fmt(head), "-" * (sum(widths) + 2 * len(widths))] + [fmt(row) for row in rows])


# ---- reading the graph ----------------------------------------------------------------------
def _module(qm, node):
    if node.op != "call_module":
        return None
    try:
        return qm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _through_gradient_quantizers(qm, node):
    while quantizer_of(node, qm, "gradient") is not None and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _source_quantizer(qm, node):
    """The weight/activation quantizer a tensor comes from (through gradient quantizers and
    single-input ops that keep it on its grid), or None when it is a float tensor."""
    seen = 0
    while seen < 64:
        q = quantizer_of(node, qm)
        if q is not None and q.kind != "gradient":
            return q
        if q is not None or is_grid_preserving(node, qm):
            if not node.args or not isinstance(node.args[0], fx.Node):
                return None
            node = node.args[0]
            seen += 1
            continue
        return None
    return None


def _is_layer(qm, node) -> bool:
    if is_matmul(node):
        return True
    mod = _module(qm, node)
    if mod is not None and quantizer_of(node, qm) is None and getattr(mod, "acc_bits", "absent") != "absent":
        return True
    return any(quantizer_of(_through_gradient_quantizers(qm, a), qm, "weight") is not None
               for a in node.all_input_nodes)


def _propagate_shapes(qm, input_shapes: list[tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Output shape of every tensor node for inputs of `input_shapes`: the traced shapes when they
    match, otherwise one forward pass on zeros in eval mode with quantization off (no state changes)."""
    placeholders = [n for n in qm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(input_shapes):
        raise ValueError(f"memory_traffic: the graph has {len(placeholders)} input(s) "
                         f"({', '.join(n.name for n in placeholders)}) but {len(input_shapes)} input shape(s) were given")
    traced = [tuple(n.meta["tensor_meta"].shape) if hasattr(n.meta.get("tensor_meta"), "shape") else None
              for n in placeholders]
    if traced == list(input_shapes):
        return {n.name: tuple(n.meta["tensor_meta"].shape) for n in qm.graph.nodes
                if hasattr(n.meta.get("tensor_meta"), "shape")}
    shapes: dict[str, tuple[int, ...]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            first = out[0] if isinstance(out, tuple) and out else out    # (y, exact) of an accumulator op
            if isinstance(first, torch.Tensor):
                shapes[n.name] = tuple(first.shape)
            return out

    dtypes = [n.meta["tensor_meta"].dtype if hasattr(n.meta.get("tensor_meta"), "dtype") else torch.float32
              for n in placeholders]
    inputs = [torch.zeros(s, dtype=d) for s, d in zip(input_shapes, dtypes)]
    modes = {m: m.training for m in qm.modules()}
    qm.eval()
    try:
        with torch.no_grad(), qm.quantization_disabled():
            _Recorder(qm).run(*inputs)
    except Exception as exc:
        raise ValueError(f"memory_traffic: the graph does not run on inputs of shape {input_shapes}: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    return shapes


def _kind(weight_shape, c_in: int) -> str:
    if weight_shape is None:
        return "matmul"
    if len(weight_shape) == 2:
        return "linear"
    kernel = "×".join(str(k) for k in weight_shape[2:])
    groups = c_in // weight_shape[1] if weight_shape[1] else 1
    if groups == 1:
        return f"conv {kernel}"
    if groups == c_in and weight_shape[0] == c_in:
        return f"conv {kernel} DW"
    return f"conv {kernel} g={groups}"


def memory_traffic(qm, input_shape, acc_bits: int | None = None) -> MemoryTraffic:
    """Memory traffic of every conv / linear / matmul layer of `qm` for an input of `input_shape` (a
    tuple, or a list of tuples for several inputs), static vs dynamic quantization: forward (each
    layer charged as its output estimator decides) and backward (as its gradient quantizers'
    estimators decide). `acc_bits` overrides every layer's accumulator width, forward and backward."""
    shapes_in = [tuple(int(s) for s in input_shape)] if input_shape and isinstance(input_shape[0], int) \
        else [tuple(int(s) for s in shp) for shp in input_shape]
    if acc_bits is not None and (not isinstance(acc_bits, int) or acc_bits < 1):
        raise ValueError(f"memory_traffic: acc_bits={acc_bits!r} must be a positive integer")
    shapes = _propagate_shapes(qm, shapes_in)
    trainable = {name for name, p in qm.named_parameters() if p.requires_grad}
    config = getattr(qm, "config", None)
    default_acc = acc_bits or getattr(config, "acc_bits", None) or DEFAULT_ACC_BITS
    rows = []
    for node in qm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or quantizer_of(node, qm) is not None:
            continue
        if not _is_layer(qm, node):
            continue
        weight_node, weight_q = None, None
        for a in operands_nodes(node):
            q = quantizer_of(_through_gradient_quantizers(qm, a), qm, "weight")
            if q is not None:
                weight_node, weight_q = _through_gradient_quantizers(qm, a), q
                break
        activations = [a for a in operands_nodes(node)
                       if a is not weight_node and _through_gradient_quantizers(qm, a) is not weight_node]
        if not activations or node.name not in shapes:
            continue
        x = activations[0]
        y_shape = shapes[node.name]
        x_shape = shapes[x.name]
        input_elems = sum(_numel(shapes[a.name]) for a in activations if a.name in shapes)
        w_shape = shapes.get(weight_node.name) if weight_node is not None else None
        in_q = [_source_quantizer(qm, a) for a in activations]
        b_in = max(_width(q) for q in in_q)
        result = layer_result(node, qm)  # e.g. the BatchNorm correction of a folded layer
        out_qs = [quantizer_of(u, qm, "activation") for u in result.users]
        out_q = next((q for q in out_qs if q is not None), None)
        mod = _module(qm, node)
        b_acc = acc_bits or getattr(mod, "acc_bits", None) or default_acc
        layer = node.meta.get("qc_layer") or (str(node.target) if node.op == "call_module" else node.name)
        operands = [_operand(qm, a, _numel(shapes[a.name]), _width(q), _needs_grad(a, trainable))
                    for a, q in zip(activations, in_q)]
        if weight_node is not None:
            operands.append(_operand(qm, next(a for a in operands_nodes(node) if _through_gradient_quantizers(qm, a)
                                              is weight_node), _numel(w_shape), _width(weight_q), True, weight=True))
        inner = getattr(mod, "grad_output_quant", None)      # an accumulator op re-quantizes G_Y itself
        b_gy = inner.bits if inner is not None else _incoming_gradient_bits(qm, layer_result(node, qm))
        rows.append(LayerTraffic(
            layer=layer, node=node.name, kind=_kind(w_shape, x_shape[1] if len(x_shape) > 1 else 1),
            c_in=x_shape[1] if len(x_shape) > 1 else x_shape[-1],
            c_out=y_shape[1] if len(y_shape) > 1 else y_shape[-1],
            in_hw=tuple(x_shape[2:]), out_hw=tuple(y_shape[2:]),
            weight_elems=_numel(w_shape) if w_shape is not None else 0,
            input_elems=input_elems, output_elems=_numel(y_shape),
            b_w=_width(weight_q) if weight_q is not None else 0, b_in=b_in,
            b_out=_width(out_q), b_acc=int(b_acc),
            estimator="none (float output)" if _width(out_q) == 32 else out_q.estimator.name,
            static=True if _width(out_q) == 32 else bool(out_q.estimator.static),
            operands=tuple(operands), b_gy=b_gy,
            b_acc_backward=int(acc_bits or getattr(mod, "grad_acc_bits", None) or b_acc),
        ))
    if not rows:
        raise ValueError("memory_traffic: no quantized conv / linear / matmul layer in the graph; "
                         "pass the module qcompile.compile returned")
    return MemoryTraffic(shapes_in[0] if len(shapes_in) == 1 else tuple(shapes_in), rows)


def _width(q) -> int:
    """Bits a tensor is stored with: its quantizer's, or 32 when it is float (no quantizer, or one the
    config keeps float)."""
    return 32 if q is None or q.float_by_config else q.bits


def operands_nodes(node) -> list:
    """The tensor operands of a layer node: its inputs but constants and the rounded bias."""
    return [a for a in node.all_input_nodes if a.op != "get_attr" and a.meta.get("qc_quantizer") != "bias"]


def _operand(qm, node, elems: int, bits: int, needs_grad: bool, weight: bool = False) -> Operand:
    """An operand read at `bits`; its gradient is quantized by the gradient quantizer `node` calls, if any
    (an activation's Q_G, or a weight's with quantize_weight_grad), else float (FP32)."""
    gq = quantizer_of(node, qm, "gradient")
    if gq is None:
        return Operand(elems, bits, 32, False, True, needs_grad, "float" if not weight else "FP32 weight gradient")
    return Operand(elems, bits, gq.bits, True, bool(gq.estimator.static), needs_grad, gq.estimator.name)


def _needs_grad(node, trainable: set) -> bool:
    """Whether a tensor depends on a trainable parameter (the model's input alone does not)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr" and str(n.target) in trainable:
            return True
        stack.extend(n.all_input_nodes)
    return False


def _incoming_gradient_bits(qm, node) -> int:
    """Width of the gradient G̃_Y arriving at `node` in the backward pass: the widest gradient quantizer
    reached through `node`'s users (the ops between are taken as fused), 32 where a path reaches the
    graph output or a layer without one (a float gradient)."""
    widths, stack, seen = [], list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        q = quantizer_of(u, qm, "gradient")
        if q is not None:
            widths.append(q.bits)
        elif u.op == "output" or (quantizer_of(u, qm) is None and _is_layer(qm, u)):
            widths.append(32)
        else:
            stack.extend(u.users)
    return max(widths, default=32)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
