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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.passes.ops import is_grid_preserving, is_matmul, layer_result, quantizer_of

KB = 1024  # the paper's KB (its Table 5 figures are bytes / 1024)
DEFAULT_ACC_BITS = 32


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
    """Forward memory traffic of every conv / linear / matmul layer of `qm` for an input of
    `input_shape` (a tuple, or a list of tuples for several inputs), static vs dynamic
    quantization, with each layer charged as its output estimator decides. `acc_bits`
    overrides every layer's accumulator width."""
    shapes_in = [tuple(int(s) for s in input_shape)] if input_shape and isinstance(input_shape[0], int) \
        else [tuple(int(s) for s in shp) for shp in input_shape]
    if acc_bits is not None and (not isinstance(acc_bits, int) or acc_bits < 1):
        raise ValueError(f"memory_traffic: acc_bits={acc_bits!r} must be a positive integer")
    shapes = _propagate_shapes(qm, shapes_in)
    config = getattr(qm, "config", None)
    default_acc = acc_bits or getattr(config, "acc_bits", None) or DEFAULT_ACC_BITS
    rows = []
    for node in qm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or quantizer_of(node, qm) is not None:
            continue
        if not _is_layer(qm, node):
            continue
        operands = [a for a in node.all_input_nodes if a.op != "get_attr" and a.meta.get("qc_quantizer") != "bias"]
        weight_node, weight_q = None, None
        for a in operands:
            q = quantizer_of(_through_gradient_quantizers(qm, a), qm, "weight")
            if q is not None:
                weight_node, weight_q = _through_gradient_quantizers(qm, a), q
                break
        activations = [a for a in operands if a is not weight_node and _through_gradient_quantizers(qm, a) is not weight_node]
        if not activations or node.name not in shapes:
            continue
        x = activations[0]
        y_shape = shapes[node.name]
        x_shape = shapes[x.name]
        input_elems = sum(_numel(shapes[a.name]) for a in activations if a.name in shapes)
        w_shape = shapes.get(weight_node.name) if weight_node is not None else None
        in_q = [_source_quantizer(qm, a) for a in activations]
        b_in = max((q.bits if q is not None else 32) for q in in_q)
        result = layer_result(node, qm)  # e.g. the BatchNorm correction of a folded layer
        out_qs = [quantizer_of(u, qm, "activation") for u in result.users]
        out_q = next((q for q in out_qs if q is not None), None)
        mod = _module(qm, node)
        b_acc = acc_bits or getattr(mod, "acc_bits", None) or default_acc
        layer = node.meta.get("qc_layer") or (str(node.target) if node.op == "call_module" else node.name)
        rows.append(LayerTraffic(
            layer=layer, node=node.name, kind=_kind(w_shape, x_shape[1] if len(x_shape) > 1 else 1),
            c_in=x_shape[1] if len(x_shape) > 1 else x_shape[-1],
            c_out=y_shape[1] if len(y_shape) > 1 else y_shape[-1],
            in_hw=tuple(x_shape[2:]), out_hw=tuple(y_shape[2:]),
            weight_elems=_numel(w_shape) if w_shape is not None else 0,
            input_elems=input_elems, output_elems=_numel(y_shape),
            b_w=weight_q.bits if weight_q is not None else 0, b_in=b_in,
            b_out=out_q.bits if out_q is not None else 32, b_acc=int(b_acc),
            estimator=out_q.estimator.name if out_q is not None else "none (float output)",
            static=bool(out_q.estimator.static) if out_q is not None else True,
        ))
    if not rows:
        raise ValueError("memory_traffic: no quantized conv / linear / matmul layer in the graph; "
                         "pass the module qcompile.compile returned")
    return MemoryTraffic(shapes_in[0] if len(shapes_in) == 1 else tuple(shapes_in), rows)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
