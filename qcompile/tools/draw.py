"""Pass diagrams: every snapshot of the pipeline as a graph, diffed against the one before.

`draw(qm, out_dir)` turns each `qm.pass_snapshots[i].graph` into a networkx DiGraph
(`graph_to_nx`) whose node attributes answer "what sits here": op, target, shape, dtype,
and for quantizers their role, bits, grid, estimator (static or dynamic), range, scale and
zero point, and the pass that inserted them; for accumulator ops their width, tile and
overflow statistics. It writes, per pass, `NN_<pass>.dot` always, `NN_<pass>.svg` (with
Graphviz `dot` when it is on PATH, otherwise with qcompile's own layered layout) and one
self-contained `index.html` (no network access) with the passes in order, each diagram
beside its diff against the previous pass.

Invariants: a node's identity across snapshots is its fx name (graph copies keep names);
the diff of pass k lists exactly the names only in k (added), only in k-1 (removed), and
the names in both whose op, target, inputs or module type differ (changed). Live module
state is read from `qm` when the snapshot's module path still resolves, and from
`node.meta` otherwise, so snapshots of modules later passes removed still draw.
"""
from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from torch import fx, nn

from qcompile.passes.ops import is_matmul, is_quantizable, op_name
from qcompile.train.quantizers import Quantizer

# category -> (fill colour, border colour, legend text)
CATEGORIES = {
    "weight_quantizer": ("#ffd6a5", "#c26a00", "weight quantizer Q_W"),
    "activation_quantizer": ("#bde0fe", "#1d6fb8", "activation quantizer Q_Y"),
    "gradient_quantizer": ("#e2c6ff", "#7b2cbf", "gradient quantizer Q_G (identity forward, quantizes backward)"),
    "bias_quantizer": ("#fff0db", "#c26a00", "bias rounded onto the accumulator grid S_x·S_w"),
    "narrow_acc": ("#ffadad", "#b00020", "narrow-accumulator op (tiled, b-bit accumulator)"),
    "regularizer": ("#e2f0cb", "#4f772d", "training loss term computed in the graph (log barrier)"),
    "matmul": ("#caffbf", "#2d6a4f", "conv / linear / matmul (exact accumulator)"),
    "float_fallback": ("#e9ecef", "#d00000", "float fallback (no quantized form)"),
    "io": ("#ffffff", "#212529", "graph input / output"),
    "param": ("#f8f9fa", "#868e96", "parameter or buffer (get_attr)"),
    "op": ("#fdfdfd", "#495057", "other op"),
    "collapsed": ("#fff3bf", "#8d6e00", "collapsed repeated block"),
    "boundary": ("#ffffff", "#adb5bd", "outside the drawn prefix"),
}
DIFF_COLOURS = {"added": "#2b9348", "changed": "#f77f00", "removed": "#d00000"}
AUTO_COLLAPSE_NODES = 150  # graphs with more nodes collapse repeated blocks when collapse="auto"
FORMATS = ("dot", "svg", "html")
RENDERERS = ("auto", "graphviz", "layered")


# ---- fx graph -> networkx --------------------------------------------------------------
def node_module_path(node: fx.Node) -> str:
    """The module path a node belongs to: its layer, its module, or its innermost traced module."""
    if node.meta.get("qc_layer"):
        return node.meta["qc_layer"]
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(next(reversed(stack)))
    return ""


def _live_module(qm: nn.Module | None, target) -> nn.Module | None:
    if qm is None:
        return None
    try:
        return qm.get_submodule(str(target))
    except AttributeError:
        return None


def _shape_dtype(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape), str(tm.dtype).replace("torch.", "")
    return None, None


def _number(t: torch.Tensor):
    """A float for one-element tensors; (min, max, count) for per-channel ones."""
    t = t.detach().float()
    if t.numel() == 1:
        return float(t)
    return (float(t.min()), float(t.max()), int(t.numel()))


def _quantizer_attrs(mod: nn.Module) -> dict:
    est = mod.estimator
    attrs = {
        "role": mod.kind, "bits": int(mod.bits), "symmetric": bool(mod.symmetric),
        "granularity": "per_tensor" if mod.axis is None else f"per_channel(axis={mod.axis})",
        "estimator": est.name, "mode": "static" if est.static else "dynamic",
        "stochastic_rounding": bool(getattr(mod, "stochastic", False)),
        "enabled": bool(getattr(mod, "enabled", True)),
    }
    if bool(est.initialized):
        attrs["range"] = (float(est.lo.min()), float(est.hi.max()))
        scale, zero_point = mod.grid(est.lo, est.hi)  # the grid of the stored range
        attrs["scale"] = _number(scale)
        attrs["zero_point"] = _number(zero_point)
    else:
        attrs["range"] = None
    if int(getattr(est, "nonfinite", 0)):
        attrs["nonfinite"] = int(est.nonfinite)
    return attrs


def _accumulator_attrs(mod: nn.Module) -> dict:
    """Accumulator width, tile, overflow mode and scalar statistics buffers of any op module."""
    attrs = {}
    for name in ("acc_bits", "grad_acc_bits", "tile", "overflow"):
        if hasattr(mod, name) and not isinstance(getattr(mod, name), (nn.Module, torch.Tensor)):
            attrs[name] = getattr(mod, name)
    stats = {}
    for name, buf in mod.named_buffers(recurse=False):
        if buf.numel() == 1 and any(k in name for k in ("overflow", "saturat", "event", "count", "total")):
            stats[name] = buf.item()
    if stats:
        attrs["overflow_stats"] = stats
    return attrs


def _has_quantized_parts(mod: nn.Module) -> bool:
    return any(isinstance(m, Quantizer) for m in mod.modules()) or hasattr(mod, "acc_bits")


def node_attributes(node: fx.Node, qm: nn.Module | None = None, quantized_graph: bool = False) -> dict:
    """All attributes of one node: what it is, its tensor, and the live state of its module."""
    shape, dtype = _shape_dtype(node)
    attrs = {
        "name": node.name, "op": node.op, "target": _target_str(node), "kind": op_name(node),
        "module_path": node_module_path(node), "shape": shape, "dtype": dtype,
        "pass": node.meta.get("qc_pass"), "module_type": node.meta.get("qc_module_type"),
    }
    mod = _live_module(qm, node.target) if node.op == "call_module" else None
    recorded = node.meta.get("qc_module_type")
    if mod is not None and recorded and type(mod).__name__ != recorded:
        attrs["replaced_by"] = type(mod).__name__  # a later pass swapped the module at this path
        mod = None
    if node.op == "call_module":
        attrs["resolved"] = mod is not None
        attrs["kind"] = type(mod).__name__ if mod is not None else (recorded or str(node.target))
        attrs["module_type"] = attrs["kind"]
    role = node.meta.get("qc_quantizer")
    if isinstance(mod, Quantizer):
        attrs.update(_quantizer_attrs(mod))
        if node.kwargs.get("relu"):
            attrs["relu"] = node.kwargs["relu"]     # the call is Q(relu(x)) / relu(Q(x)) (pass fuse_relu)
    elif role:
        attrs["role"] = role
    if mod is not None and not isinstance(mod, Quantizer):
        attrs.update(_accumulator_attrs(mod))
        describe = getattr(mod, "describe", None)
        if callable(describe):
            attrs["describe"] = str(describe())
    attrs["category"] = _category(node, mod, attrs, quantized_graph)
    return attrs


def _category(node, mod, attrs, quantized_graph: bool) -> str:
    role = attrs.get("role")
    if role in ("weight", "activation", "gradient", "bias"):
        return f"{role}_quantizer"
    if "acc_bits" in attrs and attrs["acc_bits"] is not None:
        return "narrow_acc"
    if node.meta.get("qc_regularizer"):
        return "regularizer"
    if node.op in ("placeholder", "output"):
        return "io"
    if node.op == "get_attr":
        return "param"
    if is_matmul(node):
        return "matmul"
    if any(a.meta.get("qc_quantizer") == "weight" for a in node.all_input_nodes):
        return "matmul"
    if quantized_graph and (node.op != "call_module" or mod is not None):
        if not is_quantizable(node, _GraphModuleView(mod)) and not (mod is not None and _has_quantized_parts(mod)):
            return "float_fallback"
    return "op"


class _GraphModuleView:
    """The one `get_submodule` call ops.is_quantizable makes, answered with an already resolved module."""

    def __init__(self, mod):
        self.mod = mod

    def get_submodule(self, target):
        if self.mod is None:
            raise AttributeError(target)
        return self.mod


def _target_str(node: fx.Node) -> str:
    t = node.target
    if callable(t):
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__qualname__", None) or getattr(t, "__name__", str(t))
        return f"{mod}.{name}" if mod else name
    return str(t)


def _signature(node: fx.Node) -> tuple:
    """What a node does and what it reads: equal signatures under one name mean 'unchanged'."""
    def arg_repr(a):
        if isinstance(a, fx.Node):
            return f"%{a.name}"
        if isinstance(a, (list, tuple)):
            return [arg_repr(x) for x in a]
        if isinstance(a, dict):
            return {k: arg_repr(v) for k, v in a.items()}
        return repr(a)
    return (node.op, _target_str(node), repr(arg_repr(node.args)), repr(arg_repr(node.kwargs)),
            node.meta.get("qc_module_type"))


def graph_to_nx(graph: fx.Graph, qm: nn.Module | None = None) -> nx.DiGraph:
    """One networkx node per fx node (key: fx name) with `node_attributes`; edges = data flow."""
    quantized = any(n.meta.get("qc_quantizer") for n in graph.nodes)
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, **node_attributes(node, qm, quantized), signature=_signature(node))
    for node in graph.nodes:
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


# ---- diff ------------------------------------------------------------------------------
@dataclass
class GraphDiff:
    """Node names added, removed and changed between two snapshots (empty for the first pass)."""
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed_attrs: dict = field(default_factory=dict)
    changes: dict = field(default_factory=dict)

    def status(self, name: str) -> str | None:
        if name in self._added:
            return "added"
        if name in self._changed:
            return "changed"
        return None

    def __post_init__(self):
        self._added, self._changed = set(self.added), set(self.changed)


def diff_graphs(old: nx.DiGraph | None, new: nx.DiGraph) -> GraphDiff:
    if old is None:
        return GraphDiff()
    added = [n for n in new.nodes if n not in old]
    removed = [n for n in old.nodes if n not in new]
    changed, changes = [], {}
    for n in new.nodes:
        if n in old and old.nodes[n]["signature"] != new.nodes[n]["signature"]:
            changed.append(n)
            before, after = old.nodes[n]["signature"], new.nodes[n]["signature"]
            what = [label for label, a, b in zip(("op", "target", "inputs", "kwargs", "module type"), before, after)
                    if a != b]
            changes[n] = what
    return GraphDiff(added, removed, changed, {n: dict(old.nodes[n]) for n in removed}, changes)


# ---- readability: repeated blocks and prefixes ------------------------------------------
def _children_of(paths: list[str], parent: str) -> list[str]:
    """Direct child module paths under `parent`, in order of first appearance."""
    seen, out = set(), []
    plen = len(parent) + 1 if parent else 0
    for p in paths:
        if not p or (parent and not p.startswith(parent + ".")) or p == parent:
            continue
        child = p[:plen] + p[plen:].split(".")[0]
        if child not in seen:
            seen.add(child)
            out.append(child)
    return out


def _in_block(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def repeated_blocks(g: nx.DiGraph, min_nodes: int = 3) -> dict[str, str]:
    """Module subtrees that repeat an earlier sibling: {block: the block it repeats}.

    A block is a module containing at least two distinct module paths (a container, never a
    single layer with its quantizers) and `min_nodes` nodes. Its structure is the ordered
    list of (kind, role, module path relative to the block) of its nodes plus the shape of
    its last node; the first occurrence stays expanded, later equal siblings collapse.
    """
    order = list(nx.topological_sort(g)) if nx.is_directed_acyclic_graph(g) else list(g.nodes)
    paths = [g.nodes[n]["module_path"] for n in order]
    repeats: dict[str, str] = {}

    def structure(block):
        inside = [n for n in order if _in_block(g.nodes[n]["module_path"], block)]
        if len(inside) < min_nodes or len({g.nodes[n]["module_path"] for n in inside}) < 2:
            return None
        return (tuple((g.nodes[n]["kind"], g.nodes[n].get("role"), g.nodes[n]["module_path"][len(block):])
                      for n in inside), g.nodes[inside[-1]].get("shape"))

    def visit(parent):
        seen: dict[tuple, str] = {}
        for child in _children_of(paths, parent):
            sig = structure(child)
            if sig is not None and sig in seen:
                repeats[child] = seen[sig]
            else:
                if sig is not None:
                    seen[sig] = child
                visit(child)
    visit("")
    return repeats


def collapse_blocks(g: nx.DiGraph, blocks: dict[str, str]) -> nx.DiGraph:
    """Replace every node of each block by one 'collapsed' node; edges crossing the block are kept."""
    owner = {}
    for n, a in g.nodes(data=True):
        for block in blocks:
            if _in_block(a["module_path"], block):
                owner[n] = block
                break
    out = nx.DiGraph()
    members: dict[str, list[str]] = {}
    for n, a in g.nodes(data=True):
        if n in owner:
            members.setdefault(owner[n], []).append(n)
        else:
            out.add_node(n, **a)
    for block, names in members.items():
        out.add_node(f"[{block}]", name=f"[{block}]", op="collapsed", kind="collapsed block", target=block,
                     module_path=block, category="collapsed", shape=g.nodes[names[-1]].get("shape"), dtype=None, **{"pass": None},
                     same_as=blocks[block], members=names, signature=("collapsed", block))
    for u, v in g.edges:
        cu, cv = (f"[{owner[u]}]" if u in owner else u), (f"[{owner[v]}]" if v in owner else v)
        if cu != cv:
            out.add_edge(cu, cv)
    return out


def select_prefix(g: nx.DiGraph, prefix: str) -> nx.DiGraph:
    """The nodes whose module path is `prefix` or below it, plus their direct neighbours as boundary nodes."""
    inside = {n for n, a in g.nodes(data=True) if _in_block(a["module_path"], prefix)}
    if not inside:
        known = sorted({a["module_path"].split(".")[0] for _, a in g.nodes(data=True) if a["module_path"]})
        raise ValueError(f"draw: no node belongs to module prefix {prefix!r}; top-level modules are {known}")
    border = {m for n in inside for m in (*g.predecessors(n), *g.successors(n))} - inside
    sub = g.subgraph(inside | border).copy()
    for n in border:
        attrs = dict(sub.nodes[n])
        attrs.update(category="boundary")
        sub.nodes[n].update(attrs)
    return sub


# ---- labels ------------------------------------------------------------------------------
def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], int):
        return f"{x[0]:.3g}..{x[1]:.3g} ({x[2]} ch)"
    return str(x)


def _shape_str(shape) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]" if shape is not None else ""


def node_label(a: dict) -> list[str]:
    """The lines drawn in a node's box (details beyond these go to its tooltip)."""
    if a["category"] == "collapsed":
        return [a["name"], f"{len(a['members'])} nodes, same structure as {a['same_as']}",
                f"output {_shape_str(a.get('shape'))}"]
    lines = [a["name"]]
    role = a.get("role")
    if role and "bits" in a:
        grid = "sym" if a.get("symmetric") else "asym"
        gran = " per-ch" if str(a.get("granularity", "")).startswith("per_channel") else ""
        sr = " SR" if a.get("stochastic_rounding") else ""
        q = f"Q_{ {'weight': 'W', 'activation': 'Y', 'gradient': 'G'}[role] }"
        q = {"before": f"{q}∘relu", "after": f"relu∘{q}"}.get(a.get("relu"), q)
        lines.append(f"{q} {a['bits']}b {grid}{gran}{sr}")
        lines.append(f"{a['estimator']} ({a['mode']})")
        if a.get("range") is not None:
            lines.append(f"[{_fmt(a['range'][0])}, {_fmt(a['range'][1])}]")
            if not isinstance(a.get("scale"), tuple):
                lines.append(f"s={_fmt(a['scale'])} z={_fmt(a['zero_point'])}")
        else:
            lines.append("range: not yet seen")
    elif role:
        lines.append(f"{role} quantizer (module gone)")
    else:
        kind = a["kind"]
        lines.append(kind + (f" {_shape_str(a['shape'])}" if a.get("shape") else ""))
        if a.get("acc_bits") is not None:
            tile = a.get("tile")
            lines.append(f"acc {a['acc_bits']}b tile {tile if tile is not None else 'all'} {a.get('overflow', '')}".rstrip())
        stats = [f"{k}={_fmt(v)}" for k, v in (a.get("overflow_stats") or {}).items()]
        lines += [" ".join(stats[i:i + 2]) for i in range(0, len(stats), 2)]
    if a["category"] == "float_fallback":
        lines.append("FLOAT FALLBACK")
    return lines


def node_tooltip(a: dict) -> str:
    keys = ("op", "target", "kind", "module_path", "shape", "dtype", "pass", "role", "relu", "bits", "granularity",
            "estimator", "mode", "range", "scale", "zero_point", "acc_bits", "grad_acc_bits", "tile", "overflow",
            "overflow_stats", "describe", "nonfinite", "same_as", "replaced_by")
    return "\n".join(f"{k}: {_fmt(a[k])}" for k in keys if a.get(k) not in (None, "", {}))


# ---- DOT ---------------------------------------------------------------------------------
def _dot_quote(s) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


DATA_KEYS = ("op", "target", "kind", "module_path", "shape", "dtype", "pass", "role", "relu", "bits", "granularity",
             "estimator", "mode", "range", "scale", "zero_point", "acc_bits", "grad_acc_bits", "tile", "overflow",
             "overflow_stats", "describe", "nonfinite", "category")


def to_dot(g: nx.DiGraph, title: str = "", diff: GraphDiff | None = None) -> str:
    """Graphviz DOT text: display attributes plus every data attribute as `qc_<key>`."""
    lines = [f"digraph {_dot_quote(title or 'qcompile')} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];',
             '  edge [color="#6c757d", arrowsize=0.6];']
    if title:
        lines.append(f"  label={_dot_quote(title)}; labelloc=t; fontname=\"sans-serif\";")
    for n, a in g.nodes(data=True):
        fill, border, _ = CATEGORIES[a["category"]]
        status = diff.status(n) if diff else None
        attrs = {"label": "\n".join(node_label(a)), "fillcolor": fill, "color": DIFF_COLOURS.get(status, border),
                 "penwidth": 3.5 if status else 1.2, "tooltip": node_tooltip(a), "id": f"node-{n}"}
        if a["category"] == "float_fallback" or a["category"] == "boundary":
            attrs["style"] = "rounded,filled,dashed"
        if status:
            attrs["qc_diff"] = status
        for k in DATA_KEYS:
            if a.get(k) not in (None, "", {}):
                attrs[f"qc_{k}"] = a[k] if not isinstance(a[k], (dict, tuple, list)) else json.dumps(a[k])
        body = ", ".join(f"{k}={_dot_quote(v)}" for k, v in attrs.items())
        lines.append(f"  {_dot_quote(n)} [{body}];")
    for u, v in g.edges:
        lines.append(f"  {_dot_quote(u)} -> {_dot_quote(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_svg(dot_text: str, dot_binary: str | None = None) -> str:
    """SVG from Graphviz's `dot` (raises RuntimeError with its stderr when it fails)."""
    dot_binary = dot_binary or shutil.which("dot")
    if dot_binary is None:
        raise RuntimeError("Graphviz `dot` is not on PATH; install graphviz or use renderer='layered'")
    proc = subprocess.run([dot_binary, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"Graphviz dot failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:2000]}")
    return proc.stdout.decode()


# ---- qcompile's own layered layout and SVG ------------------------------------------------
CHAR_W, LINE_H, PAD, GAP_X, GAP_Y = 6.6, 13.0, 6.0, 18.0, 34.0


def _box_size(a: dict) -> tuple[float, float]:
    lines = node_label(a)
    return max(len(s) for s in lines) * CHAR_W + 2 * PAD, len(lines) * LINE_H + 2 * PAD


def layered_layout(g: nx.DiGraph) -> tuple[dict, dict, dict]:
    """Sugiyama-style layout: ranks from networkx topological generations (then every node but
    the inputs moved down to just above its first consumer), a dummy node per rank crossed by a long edge, barycentre
    ordering sweeps, then x placement by neighbour averages with no overlap.
    Returns (centre of each node, width/height of each node, the dummy chain of each long edge)."""
    rank = {}
    for i, gen in enumerate(nx.topological_generations(g)):
        for n in gen:
            rank[n] = i
    for n in reversed(list(nx.topological_sort(g))):
        if g.out_degree(n) > 0 and g.nodes[n]["op"] != "placeholder":
            rank[n] = max(rank[n], min(rank[s] for s in g.successors(n)) - 1)
    size = {n: _box_size(g.nodes[n]) for n in g.nodes}
    layers: dict[int, list] = {}
    chains: dict[tuple, list] = {}
    for n in sorted(g.nodes, key=lambda n: rank[n]):
        layers.setdefault(rank[n], []).append(n)
    adj_up: dict = {n: [] for n in g.nodes}
    for u, v in g.edges:
        prev = u
        chain = []
        for r in range(rank[u] + 1, rank[v]):
            d = ("dummy", u, v, r)
            chain.append(d)
            layers.setdefault(r, []).append(d)
            size[d] = (4.0, LINE_H)
            adj_up[d] = [prev]
            prev = d
        chains[(u, v)] = chain
        adj_up[v].append(prev)
    adj_down: dict = {n: [] for n in adj_up}
    for n, ups in adj_up.items():
        for u in ups:
            adj_down[u].append(n)
    ranks = sorted(layers)
    pos_index = {n: i for r in ranks for i, n in enumerate(layers[r])}
    for sweep in range(6):
        seq = ranks[1:] if sweep % 2 == 0 else ranks[-2::-1]
        nbrs = adj_up if sweep % 2 == 0 else adj_down
        for r in seq:
            def bary(n):
                ns = nbrs[n]
                return sum(pos_index[m] for m in ns) / len(ns) if ns else pos_index[n]
            layers[r].sort(key=bary)
            for i, n in enumerate(layers[r]):
                pos_index[n] = i
    x = {}
    for r in ranks:
        cur = 0.0
        for n in layers[r]:
            x[n] = cur + size[n][0] / 2
            cur += size[n][0] + GAP_X
    for sweep in range(8):
        seq = ranks[1:] if sweep % 2 == 0 else ranks[-2::-1]
        nbrs = adj_up if sweep % 2 == 0 else adj_down
        for r in seq:
            nodes = layers[r]
            want = [sum(x[m] for m in nbrs[n]) / len(nbrs[n]) if nbrs[n] else x[n] for n in nodes]
            placed = []
            for i, n in enumerate(nodes):
                lo = placed[-1] + (size[nodes[i - 1]][0] + size[n][0]) / 2 + GAP_X if placed else -math.inf
                placed.append(max(want[i], lo))
            shift = sum(w - p for w, p in zip(want, placed)) / len(nodes)
            for n, p in zip(nodes, placed):
                x[n] = p + shift
    xmin = min(x[n] - size[n][0] / 2 for n in x)
    y, top = {}, 0.0
    for r in ranks:
        h = max(size[n][1] for n in layers[r])
        for n in layers[r]:
            y[n] = top + h / 2
        top += h + GAP_Y
    centres = {n: (x[n] - xmin + 10, y[n] + 10) for n in x}
    return centres, size, chains


def layered_svg(g: nx.DiGraph, title: str = "", diff: GraphDiff | None = None) -> str:
    """SVG of `g` with `layered_layout`: boxes coloured by category, diff status as a thick border,
    each node a <g id="node-NAME" class="node CATEGORY"> with a <title> tooltip."""
    if g.number_of_nodes() == 0:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="40"><text x="10" y="25">(empty graph)</text></svg>'
    pos, size, chains = layered_layout(g)
    width = max(pos[n][0] + size[n][0] / 2 for n in pos) + 10
    height = max(pos[n][1] + size[n][1] / 2 for n in pos) + 10 + (20 if title else 0)
    dy = 20 if title else 0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#6c757d"/></marker></defs>']
    if title:
        out.append(f'<text x="10" y="15" font-family="sans-serif" font-size="14" font-weight="bold">{html.escape(title)}</text>')
    out.append(f'<g transform="translate(0,{dy})">')
    for (u, v), chain in chains.items():
        pts = [(pos[u][0], pos[u][1] + size[u][1] / 2)] + [pos[d] for d in chain] + [(pos[v][0], pos[v][1] - size[v][1] / 2)]
        d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            my = (y0 + y1) / 2
            d += f" C{x0:.1f},{my:.1f} {x1:.1f},{my:.1f} {x1:.1f},{y1:.1f}"
        out.append(f'<path class="edge" d="{d}" fill="none" stroke="#6c757d" stroke-width="1" marker-end="url(#arrow)"/>')
    for n, a in g.nodes(data=True):
        fill, border, _ = CATEGORIES[a["category"]]
        status = diff.status(n) if diff else None
        (cx, cy), (w, h) = pos[n], size[n]
        dash = ' stroke-dasharray="4,3"' if a["category"] in ("float_fallback", "boundary") else ""
        cls = f"node {a['category']}" + (f" {status}" if status else "")
        out.append(f'<g id="node-{html.escape(n)}" class="{cls}"><title>{html.escape(n + chr(10) + node_tooltip(a))}</title>')
        out.append(f'<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5" '
                   f'fill="{fill}" stroke="{DIFF_COLOURS.get(status, border)}" '
                   f'stroke-width="{3.5 if status else 1.2}"{dash}/>')
        for i, line in enumerate(node_label(a)):
            weight = ' font-weight="bold"' if i == 0 else ""
            out.append(f'<text x="{cx:.1f}" y="{cy - h / 2 + PAD + (i + 0.8) * LINE_H:.1f}" text-anchor="middle"{weight}>'
                       f'{html.escape(line)}</text>')
        out.append("</g>")
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


# ---- HTML --------------------------------------------------------------------------------
_CSS = """
body{font-family:sans-serif;margin:0;background:#f6f7f9;color:#212529}
header{padding:12px 20px;background:#fff;border-bottom:1px solid #dee2e6;position:sticky;top:0;z-index:2}
h1{font-size:20px;margin:0 0 6px} h2{font-size:17px;margin:0 0 8px}
.legend span{display:inline-block;margin:2px 10px 2px 0;font-size:12px}
.legend i{display:inline-block;width:14px;height:14px;vertical-align:middle;margin-right:4px;border-radius:3px;border:2px solid}
nav{padding:6px 20px;font-size:13px} nav a{margin-right:12px}
section.pass{margin:14px 20px;padding:12px;background:#fff;border:1px solid #dee2e6;border-radius:6px}
.row{display:flex;gap:14px;align-items:flex-start}
.diagram{flex:1 1 auto;overflow:auto;max-height:85vh;border:1px solid #e9ecef;background:#fff}
.diagram svg{display:block}
aside.diff{flex:0 0 330px;max-height:85vh;overflow:auto;font-size:12px}
aside.diff h3{font-size:13px;margin:8px 0 4px}
aside.diff li{font-family:monospace;margin:1px 0;word-break:break-all}
.added{color:#2b9348} .removed{color:#d00000} .changed{color:#b85c00} p.summary{font-weight:bold;margin:2px 0}
table{border-collapse:collapse;font-size:12px;font-family:monospace}
td,th{border:1px solid #dee2e6;padding:2px 6px;text-align:left}
.meta{font-size:12px;color:#495057}
"""


def _legend_html() -> str:
    items = [f'<span><i style="background:{fill};border-color:{border}"></i>{html.escape(text)}</span>'
             for cat, (fill, border, text) in CATEGORIES.items() if cat not in ("boundary",)]
    items += [f'<span><i style="background:#fff;border-color:{c}"></i>{k} in this pass</span>'
              for k, c in DIFF_COLOURS.items() if k != "removed"]
    items.append(f'<span><i style="background:#fff;border-color:{DIFF_COLOURS["removed"]}"></i>removed (listed in the diff)</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def _diff_html(diff: GraphDiff, g: nx.DiGraph, first: bool) -> str:
    if first:
        return "<h3>first snapshot</h3><p>Nothing to compare against.</p>"
    parts = [f'<p class="summary"><span class="added">{len(diff.added)} added</span> · '
             f'<span class="removed">{len(diff.removed)} removed</span> · '
             f'<span class="changed">{len(diff.changed)} changed</span></p>']
    for status, names in (("added", diff.added), ("removed", diff.removed), ("changed", diff.changed)):
        parts.append(f'<h3 class="{status}">{status} ({len(names)})</h3><ul>')
        for n in names:
            a = g.nodes[n] if n in g else diff.removed_attrs.get(n, {})
            what = a.get("kind", "")
            if status == "changed":
                what += " — " + ", ".join(diff.changes.get(n, []))
            parts.append(f'<li class="{status}">{html.escape(n)} <small>{html.escape(what)}</small></li>')
        parts.append("</ul>")
    return "".join(parts)


def _quantizer_table(g: nx.DiGraph) -> str:
    rows = [a for _, a in g.nodes(data=True) if a.get("role")]
    if not rows:
        return ""
    head = ("node", "layer", "role", "bits", "grid", "estimator", "mode", "range", "scale", "zero point", "inserted by")
    body = []
    for a in rows:
        grid = f"{'sym' if a.get('symmetric') else 'asym'} {a.get('granularity', '')}" if "bits" in a else ""
        rng = f"[{_fmt(a['range'][0])}, {_fmt(a['range'][1])}]" if a.get("range") else "not yet seen"
        cells = (a["name"], a["module_path"], a["role"], a.get("bits", ""), grid, a.get("estimator", ""),
                 a.get("mode", ""), rng, _fmt(a.get("scale", "")), _fmt(a.get("zero_point", "")), a.get("pass") or "")
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return (f"<details><summary>quantizers ({len(rows)})</summary><table><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table></details>")


# Wide diagrams open scrolled to their first input node instead of their left edge.
_SCROLL_TO_INPUT = """
document.querySelectorAll('section.pass').forEach(function (sec) {
  var box = sec.querySelector('.diagram'), node = document.getElementById('node-' + sec.dataset.first);
  if (!box || !node) return;
  var b = box.getBoundingClientRect(), n = node.getBoundingClientRect();
  box.scrollLeft += (n.left + n.width / 2) - (b.left + box.clientWidth / 2);
});
"""


def _first_node(g: nx.DiGraph) -> str:
    inputs = [n for n, a in g.nodes(data=True) if a.get("op") == "placeholder"]
    return inputs[0] if inputs else next(iter(g.nodes), "")


def _strip_xml_prolog(svg: str) -> str:
    i = svg.find("<svg")
    return svg[i:] if i >= 0 else svg


# ---- the one call ----------------------------------------------------------------------------
@dataclass
class Drawing:
    """What `draw` wrote: per pass, its graph, diff and files; `html` is the page (or None)."""
    passes: list[str]
    graphs: dict[str, nx.DiGraph]
    diffs: dict[str, GraphDiff]
    dot: dict[str, Path]
    svg: dict[str, Path]
    html: Path | None
    renderer: str


def _pick_passes(snapshots, passes) -> list:
    names = [s.name for s in snapshots]
    if passes == "all":
        return list(range(len(snapshots)))
    wanted = [passes] if isinstance(passes, str) else list(passes)
    unknown = [p for p in wanted if p not in names]
    if unknown:
        raise ValueError(f"draw: unknown pass(es) {unknown}; this module's snapshots are {names}")
    return [i for i, s in enumerate(snapshots) if s.name in wanted]


def _file_stem(i: int, name: str) -> str:
    return f"{i:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def draw(qm, out_dir, passes="all", format: str = "html", prefix: str | None = None,
         collapse: bool | str = "auto", renderer: str = "auto") -> Drawing:
    """Write the diagrams of `qm`'s pass snapshots to `out_dir` and return what was written.

    format: "dot" (DOT only), "svg" (DOT + SVG) or "html" (DOT + SVG + index.html).
    passes: "all", one pass name, or a list of names (each diffed against the snapshot
    just before it in the pipeline, drawn or not). prefix: draw only nodes under this module
    path (plus their neighbours). collapse: True, False, or "auto" (collapse repeated blocks
    in graphs of more than AUTO_COLLAPSE_NODES nodes). renderer: "graphviz" (needs `dot`),
    "layered" (qcompile's own) or "auto" (Graphviz when `dot` is on PATH).
    """
    if format not in FORMATS:
        raise ValueError(f"draw: format={format!r}; choose one of {FORMATS}")
    if renderer not in RENDERERS:
        raise ValueError(f"draw: renderer={renderer!r}; choose one of {RENDERERS}")
    if collapse not in (True, False, "auto"):
        raise ValueError(f"draw: collapse={collapse!r}; choose True, False or 'auto'")
    snapshots = getattr(qm, "pass_snapshots", None)
    if not snapshots:
        raise ValueError("draw: the module has no pass snapshots; draw the module qcompile.compile returned")
    dot_binary = shutil.which("dot")
    if renderer == "graphviz" and dot_binary is None:
        raise RuntimeError("draw: renderer='graphviz' but Graphviz `dot` is not on PATH; install graphviz "
                           "(apt-get install graphviz) or use renderer='layered'")
    used = "graphviz" if renderer == "graphviz" or (renderer == "auto" and dot_binary) else "layered"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    full = [graph_to_nx(s.graph, qm) for s in snapshots]
    chosen = _pick_passes(snapshots, passes)
    result = Drawing([], {}, {}, {}, {}, None, used)
    sections = []
    for i in chosen:
        name = snapshots[i].name
        diff = diff_graphs(full[i - 1] if i > 0 else None, full[i])
        g = full[i]
        if prefix:
            g = select_prefix(g, prefix)
        if collapse is True or (collapse == "auto" and g.number_of_nodes() > AUTO_COLLAPSE_NODES):
            g = collapse_blocks(g, repeated_blocks(g))
        title = f"{i}. {name}" + (f" — prefix {prefix}" if prefix else "")
        stem = _file_stem(i, name)
        dot_text = to_dot(g, title, diff)
        (out / f"{stem}.dot").write_text(dot_text)
        result.passes.append(name)
        result.graphs[name], result.diffs[name], result.dot[name] = g, diff, out / f"{stem}.dot"
        if format in ("svg", "html"):
            svg = graphviz_svg(dot_text, dot_binary) if used == "graphviz" else layered_svg(g, title, diff)
            (out / f"{stem}.svg").write_text(svg)
            result.svg[name] = out / f"{stem}.svg"
            collapsed = [a for _, a in g.nodes(data=True) if a["category"] == "collapsed"]
            note = (f"{g.number_of_nodes()} drawn nodes of {full[i].number_of_nodes()}"
                    + (f"; {len(collapsed)} repeated blocks collapsed" if collapsed else ""))
            sections.append(
                f'<section class="pass" id="pass-{html.escape(name)}" data-pass="{html.escape(name)}" '
                f'data-nodes="{full[i].number_of_nodes()}" data-added="{len(diff.added)}" '
                f'data-removed="{len(diff.removed)}" data-changed="{len(diff.changed)}" '
                f'data-first="{html.escape(_first_node(g))}">'
                f"<h2>{i}. {html.escape(name)}</h2><p class=\"meta\">{note}; files {stem}.dot, {stem}.svg</p>"
                f'<div class="row"><div class="diagram">{_strip_xml_prolog(svg)}</div>'
                f'<aside class="diff">{_diff_html(diff, full[i], i == 0)}</aside></div>'
                f"{_quantizer_table(full[i])}</section>")
    if format == "html":
        model = type(qm).__name__
        config = getattr(qm, "config", None)
        cfg = html.escape(", ".join(f"{k}={v}" for k, v in config.to_dict().items()
                                    if k not in ("overrides",))) if config is not None else ""
        nav = "".join(f'<a href="#pass-{html.escape(n)}">{i}. {html.escape(n)}</a>' for i, n in
                      zip(chosen, result.passes))
        page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(model)} — qcompile passes"
                f"</title><style>{_CSS}</style></head><body><header><h1>{html.escape(model)}: the graph after each "
                f"pass</h1>{_legend_html()}<div class=\"meta\">hover a node for its details; renderer: {used}</div>"
                f"</header><nav>{nav}</nav><p class=\"meta\" style=\"margin:0 20px\">config: {cfg}</p>"
                + "".join(sections) + f"<script>{_SCROLL_TO_INPUT}</script></body></html>\n")
        result.html = out / "index.html"
        result.html.write_text(page)
    return result
