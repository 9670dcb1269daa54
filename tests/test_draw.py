"""Pass diagrams: each diagram shows what its pass did; DOT, SVG (with and without Graphviz) and
the HTML page (rendered in headless Chromium); readability of large graphs; the CLI."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest
import torch
from torch import fx, nn

import qcompile
from qcompile.tools import cli
from qcompile.passes.pipeline import PIPELINE
from qcompile.tools.draw import CATEGORIES, diff_graphs, graph_to_nx, layered_layout, repeated_blocks
from qcompile.tools.model_spec import load_model, parse_shape
from qcompile.models import get

CHROMIUM = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium") or None
SVG_NS = "{http://www.w3.org/2000/svg}"


def _compile(model, shape, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcompile.compile(model, torch.randn(shape), **config)


@pytest.fixture(scope="module")
def resnet18_qm():
    torch.manual_seed(0)
    qm = _compile(get("torchvision:resnet18"), (1, 3, 64, 64), grad_bits=8)
    qm.calibrate([torch.randn(2, 3, 64, 64)])
    return qm


def _weight_source(g: nx.DiGraph, node: str) -> str | None:
    """The weight quantizer feeding `node` (directly or through gradient quantizers)."""
    for p in g.predecessors(node):
        a = g.nodes[p]
        if a.get("role") == "weight":
            return p
        if a.get("role") == "gradient":
            found = _weight_source(g, p)
            if found:
                return found
    return None


# ---- what each pass did ------------------------------------------------------------------
def test_after_quantize_every_conv_has_its_weight_quantizer(resnet18_qm, tmp_path):
    drawing = qcompile.draw(resnet18_qm, tmp_path, format="dot", collapse=False)
    assert drawing.passes == [s.name for s in resnet18_qm.pass_snapshots]
    g = drawing.graphs["quantize"]
    convs = [n for n, a in g.nodes(data=True) if a["kind"] == "conv2d"]
    assert len(convs) == 20  # resnet18: 17 3×3/7×7 convs + 3 downsample 1×1
    for conv in convs:
        wq = _weight_source(g, conv)
        assert wq is not None, f"{conv} has no weight quantizer in the quantize diagram"
        a = g.nodes[wq]
        assert (a["bits"], a["symmetric"], a["pass"]) == (8, True, "quantize")
        assert a["module_path"] == g.nodes[conv]["module_path"]
        assert wq in drawing.diffs["quantize"].added
    before = drawing.graphs[drawing.passes[drawing.passes.index("quantize") - 1]]
    assert not any(a.get("role") for _, a in before.nodes(data=True))
    dot = drawing.dot["quantize"].read_text()
    linears = [n for n, a in g.nodes(data=True) if a["kind"] == "linear"]
    assert len(linears) == 1 and _weight_source(g, linears[0]) is not None
    assert dot.count('qc_role="weight"') == 21
    assert dot.count('qc_role="activation"') == sum(a.get("role") == "activation" for _, a in g.nodes(data=True))


def test_quantizer_attributes_come_from_the_live_module(resnet18_qm):
    g = graph_to_nx(resnet18_qm.pass_snapshots[-1].graph, resnet18_qm)
    for name, q in resnet18_qm.quantizers():
        node = name.replace(".", "_")
        a = g.nodes[node]
        assert (a["role"], a["bits"], a["estimator"]) == (q.kind, q.bits, q.estimator.name)
        assert a["mode"] == ("static" if q.estimator.static else "dynamic")
        if bool(q.estimator.initialized):
            assert a["range"] == (float(q.estimator.lo.min()), float(q.estimator.hi.max()))
            scale, _ = q.grid(q.estimator.lo, q.estimator.hi)
            expect = float(scale) if scale.numel() == 1 else (float(scale.min()), float(scale.max()), scale.numel())
            assert a["scale"] == expect
        else:
            assert a["range"] is None


def test_fold_bn_diff_lists_the_batchnorms_as_removed(resnet18_qm, tmp_path):
    names = [name for name, _ in PIPELINE]
    assert "fold_bn" in names
    drawing = qcompile.draw(resnet18_qm, tmp_path, format="html", collapse=False)
    i = drawing.passes.index("fold_bn")
    before, after = drawing.graphs[drawing.passes[i - 1]], drawing.graphs["fold_bn"]
    batchnorms = {n for n, a in before.nodes(data=True) if a["kind"] == "BatchNorm2d"}
    assert len(batchnorms) == 20
    diff = drawing.diffs["fold_bn"]
    assert batchnorms <= set(diff.removed)
    assert not any(a["kind"] == "BatchNorm2d" for _, a in after.nodes(data=True))
    page = drawing.html.read_text()
    section = page[page.index('data-pass="fold_bn"'):page.index('data-pass="quantize"')]
    for bn in batchnorms:
        assert f'<li class="removed">{bn} ' in section


def test_diff_of_hand_made_graphs():
    def graph(extra_relu: bool, scale_by: float):
        g = fx.Graph()
        x = g.placeholder("x")
        y = g.call_function(torch.mul, (x, scale_by))
        if extra_relu:
            y = g.call_function(torch.relu, (y,))
        g.output(y)
        return g
    old, new = graph_to_nx(graph(False, 2.0)), graph_to_nx(graph(True, 3.0))
    d = diff_graphs(old, new)
    assert d.added == ["relu"] and d.removed == [] and set(d.changed) == {"mul", "output"}
    assert d.changes["mul"] == ["inputs"]
    back = diff_graphs(new, old)
    assert back.removed == ["relu"] and back.added == []
    assert diff_graphs(None, new).added == []


def test_accumulator_op_attributes_shown_generically():
    class TiledOp(nn.Module):
        def __init__(self):
            super().__init__()
            self.acc_bits, self.tile, self.overflow = 16, 64, "saturate"
            self.register_buffer("overflow_events", torch.tensor(7))
            self.register_buffer("saturated_fraction", torch.tensor(0.25))

        def describe(self):
            return "acc 16 bits, tile 64"

        def forward(self, x):
            return x

    root = nn.Module()
    root.op = TiledOp()
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_module("op", (x,)))
    gm = fx.GraphModule(root, g)
    a = graph_to_nx(gm.graph, gm).nodes["op"]
    assert (a["category"], a["acc_bits"], a["tile"], a["overflow"]) == ("narrow_acc", 16, 64, "saturate")
    assert a["overflow_stats"] == {"overflow_events": 7, "saturated_fraction": 0.25}
    assert a["describe"] == "acc 16 bits, tile 64"


def test_float_fallbacks_are_marked(tmp_path):
    class WithFallback(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.erf(self.conv(x))

    qm = _compile(WithFallback(), (1, 3, 8, 8))
    drawing = qcompile.draw(qm, tmp_path, format="svg", renderer="layered")
    cats = {n: a["category"] for n, a in drawing.graphs["quantize"].nodes(data=True)}
    assert cats["erf"] == "float_fallback"
    assert [n for n, c in cats.items() if c == "float_fallback"] == ["erf"]
    assert re.search(r'class="node float_fallback[ "]', drawing.svg["quantize"].read_text())
    # before quantization nothing is a fallback yet
    assert all(a["category"] != "float_fallback" for _, a in drawing.graphs["trace"].nodes(data=True))


# ---- SVG with and without Graphviz ------------------------------------------------------------
def _boxes(svg_path: Path) -> dict[str, tuple[float, float, float, float]]:
    root = ET.parse(svg_path).getroot()
    out = {}
    for grp in root.iter(f"{SVG_NS}g"):
        if grp.get("id", "").startswith("node-"):
            r = grp.find(f"{SVG_NS}rect")
            out[grp.get("id")[5:]] = tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))
    return out


def test_svg_without_graphviz_on_path(resnet18_qm, tmp_path, monkeypatch):
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("dot") is None
    drawing = qcompile.draw(resnet18_qm, tmp_path / "out", format="svg", collapse=False)
    assert drawing.renderer == "layered"
    for name in drawing.passes:
        boxes = _boxes(drawing.svg[name])
        assert set(boxes) == set(drawing.graphs[name].nodes)
        items = sorted(boxes.values(), key=lambda b: b[1])
        for i, (x, y, w, h) in enumerate(items):  # no two boxes overlap
            for x2, y2, w2, h2 in items[i + 1:]:
                if y2 >= y + h:
                    break
                assert x + w <= x2 or x2 + w2 <= x, f"overlapping boxes in {name}"
    # every edge points downwards: the layout is layered along the data flow
    g = drawing.graphs["quantize"]
    boxes = _boxes(drawing.svg["quantize"])
    assert all(boxes[u][1] < boxes[v][1] for u, v in g.edges)
    with pytest.raises(RuntimeError, match="not on PATH"):
        qcompile.draw(resnet18_qm, tmp_path / "gv", format="svg", renderer="graphviz")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed (apt-get install graphviz)")
def test_svg_with_graphviz(resnet18_qm, tmp_path):
    drawing = qcompile.draw(resnet18_qm, tmp_path, format="svg", collapse=False)
    assert drawing.renderer == "graphviz"
    for name in drawing.passes:
        text = drawing.svg[name].read_text()
        assert "Generated by graphviz" in text
        root = ET.fromstring(text[text.index("<svg"):])
        ids = {g.get("id")[5:] for g in root.iter(f"{SVG_NS}g") if g.get("id", "").startswith("node-")}
        assert ids == set(drawing.graphs[name].nodes)


def test_layout_ranks_follow_topological_generations():
    g = nx.DiGraph()
    for n in "abcde":
        g.add_node(n, name=n, op="placeholder" if n == "a" else "call_function", kind="op", category="op", shape=None)
    g.add_edges_from([("a", "b"), ("b", "c"), ("c", "d"), ("a", "d"), ("e", "d")])
    pos, size, chains = layered_layout(g)
    assert pos["a"][1] < pos["b"][1] < pos["c"][1] < pos["d"][1]
    assert pos["e"][1] == pos["c"][1]  # a source sits just above its consumer
    assert len(chains[("a", "d")]) == 2 and chains[("a", "b")] == []


# ---- large graphs -------------------------------------------------------------------------------
def test_densenet121_collapses_repeated_blocks_and_draws_by_prefix(tmp_path):
    qm = _compile(get("torchvision:densenet121"), (1, 3, 32, 32))
    full = graph_to_nx(next(s for s in qm.pass_snapshots if s.name == "quantize").graph, qm)
    assert full.number_of_nodes() > 430
    drawing = qcompile.draw(qm, tmp_path / "all", passes="quantize", format="svg", renderer="layered")
    g = drawing.graphs["quantize"]
    collapsed = {n: a for n, a in g.nodes(data=True) if a["category"] == "collapsed"}
    assert g.number_of_nodes() < full.number_of_nodes() / 3
    blocks = repeated_blocks(full)
    assert "features.denseblock1.denselayer2" in blocks and "features.denseblock1.denselayer1" not in blocks
    members = [m for a in collapsed.values() for m in a["members"]]
    assert len(members) == len(set(members)) == full.number_of_nodes() - (g.number_of_nodes() - len(collapsed))
    for a in collapsed.values():  # the block it repeats is drawn expanded
        assert any(b["module_path"].startswith(a["same_as"] + ".") for _, b in g.nodes(data=True)
                   if b["category"] != "collapsed")
    assert nx.is_directed_acyclic_graph(g) and nx.is_weakly_connected(g)

    sub = qcompile.draw(qm, tmp_path / "sub", passes="quantize", format="svg",
                        prefix="features.denseblock2.denselayer3").graphs["quantize"]
    inside = [a for _, a in sub.nodes(data=True) if a["category"] != "boundary"]
    assert inside and all(a["module_path"].startswith("features.denseblock2.denselayer3") for a in inside)
    assert sum(a["kind"] == "conv2d" for a in inside) == 2
    with pytest.raises(ValueError, match="no node belongs to module prefix 'nope'"):
        qcompile.draw(qm, tmp_path / "x", prefix="nope")


def test_bad_arguments_are_named(resnet18_qm, tmp_path):
    with pytest.raises(ValueError, match="format='png'"):
        qcompile.draw(resnet18_qm, tmp_path, format="png")
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['lower'\]"):
        qcompile.draw(resnet18_qm, tmp_path, passes=["lower"])
    with pytest.raises(ValueError, match="no pass snapshots"):
        qcompile.draw(nn.Linear(2, 2), tmp_path)


# ---- the HTML page in headless Chromium -------------------------------------------------------------
def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=120, check=True)


class _PageStructure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.legend, self.removed, self.external = [], 0, {}, []
        self._section = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "pass" in a.get("class", ""):
            self._section = {"name": a["data-pass"], "svg": 0, "nodes": 0, "removed": []}
            self.sections.append(self._section)
        elif tag == "svg" and self._section is not None:
            self._section["svg"] += 1
        elif tag == "g" and a.get("id", "").startswith("node-") and self._section is not None:
            self._section["nodes"] += 1
        elif tag == "li" and a.get("class") == "removed" and self._section is not None:
            self._section["removed"].append(True)
        elif tag == "i" and "background" in a.get("style", ""):
            self.legend += 1
        for k in ("src", "href"):
            if a.get(k) and not a[k].startswith("#"):
                self.external.append(a[k])


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's `chromium` is not installed (apt-get install chromium)")
def test_resnet18_page_in_headless_chromium(resnet18_qm, tmp_path):
    from PIL import Image
    drawing = qcompile.draw(resnet18_qm, tmp_path / "page")
    page = drawing.html.read_text()
    assert not re.search(r"(src|href)=\"https?:", page) and "<script src" not in page  # nothing to fetch

    dom = _chromium(["--dump-dom", drawing.html.as_uri()], tmp_path).stdout.decode()
    parsed = _PageStructure()
    parsed.feed(dom)
    assert [s["name"] for s in parsed.sections] == [s.name for s in resnet18_qm.pass_snapshots]
    for s in parsed.sections:
        assert s["svg"] >= 1 and s["nodes"] == drawing.graphs[s["name"]].number_of_nodes()
    assert len(next(s for s in parsed.sections if s["name"] == "fold_bn")["removed"]) == len(drawing.diffs["fold_bn"].removed)
    assert parsed.legend == len(CATEGORIES) - 1 + 3  # categories (boundary only shows with a prefix) + diff colours
    assert parsed.external == []

    # a screenshot of the quantize pass alone: the diagram is painted with the quantizer colours
    one = qcompile.draw(resnet18_qm, tmp_path / "quantize", passes="quantize")
    shot = tmp_path / "quantize.png"
    _chromium(["--window-size=1400,1600", f"--screenshot={shot}", one.html.as_uri()], tmp_path)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 1600)
    diagram = img.crop((0, 400, 1000, 1600))  # below the header, left of the diff panel
    colours = {c for _, c in diagram.getcolors(maxcolors=1 << 20)}

    def present(hex_colour):
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        return rgb in colours
    for cat in ("weight_quantizer", "activation_quantizer", "gradient_quantizer", "matmul"):
        assert present(CATEGORIES[cat][0]), f"no {cat} box painted in the screenshot"
    dark = sum(n for n, c in diagram.getcolors(maxcolors=1 << 20) if sum(c) < 150)
    assert dark > 2000  # text was drawn


# ---- CLI and model specs -------------------------------------------------------------------
def test_cli_draw(tmp_path, capsys):
    assert cli.main(["draw", "models:lenet5", "--input-shape", "1,1,28,28", "--out", str(tmp_path),
                     "--grad-bits", "8", "--act-range", "running", "--renderer", "layered"]) == 0
    out = capsys.readouterr().out
    html_path = Path(re.search(r"HTML: (\S+)", out).group(1))
    assert html_path == (tmp_path / "index.html").resolve() and html_path.exists()
    page = html_path.read_text()
    assert "running (dynamic)" in page and "Q_G 8b" in page
    for s in ("trace", "normalize", "quantize"):
        assert f'data-pass="{s}"' in page


def test_model_specs(tmp_path):
    f = tmp_path / "my_net.py"
    f.write_text("import torch.nn as nn\n\ndef build(width=4):\n    return nn.Sequential(nn.Linear(3, width))\n"
                 "\ndef not_a_model():\n    return 3\n")
    model = load_model(f"{f}:build")
    assert isinstance(model, nn.Sequential) and model[0].out_features == 4
    assert load_model(f"{f}:build", if_accepted={"width": 6, "num_classes": 3})[0].out_features == 6  # only what it takes
    assert load_model("models:lenet5", if_accepted={"num_classes": 3}).fc3.out_features == 3
    assert type(load_model("models:lenet5")).__name__ == "LeNet5"
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        load_model(f"{f}:missing")
    with pytest.raises(ValueError, match="returned int, not a torch.nn.Module"):
        load_model(f"{f}:not_a_model")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope.py") + ":build")
    with pytest.raises(ValueError, match="use 'torchvision:NAME'"):
        load_model("resnet18")
    assert parse_shape("1,3,64,64") == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_shape("1,3,a")


def test_narrow_acc_diagram_shows_accumulator_width_tile_and_overflow_counts(tmp_path):
    from qcompile.tools.analysis import memory_traffic
    assert "narrow_acc" in [name for name, _ in PIPELINE]
    torch.manual_seed(0)
    qm = _compile(get("models:lenet5"), (2, 1, 28, 28), grad_bits=8, acc_bits=12, tile=16)
    qm.calibrate([torch.randn(4, 1, 28, 28)])
    qm(torch.randn(4, 1, 28, 28) * 4)
    drawing = qcompile.draw(qm, tmp_path, passes=["quantize", "narrow_acc"], format="svg", renderer="layered")
    g, diff = drawing.graphs["narrow_acc"], drawing.diffs["narrow_acc"]
    accs = {n: a for n, a in g.nodes(data=True) if a["category"] == "narrow_acc"}
    before = drawing.graphs["quantize"]
    matmuls = {n for n, a in before.nodes(data=True) if a["category"] == "matmul"}
    added_params = {n for n in diff.added if g.nodes[n]["category"] == "param"}
    assert len(accs) == len(matmuls) == 5 and set(diff.added) - added_params == set(accs)
    assert set(diff.removed) == matmuls
    # each op reads its operands' scales and zero points as graph inputs: 4 get_attr reads per op
    assert len(added_params) == 4 * len(accs) and all(g.nodes[n]["target"].endswith(("scale", "zero_point"))
                                                      for n in added_params)
    for name, a in accs.items():
        mod = qm.get_submodule(name.replace("_accumulator", ".accumulator"))
        assert (a["acc_bits"], a["tile"], a["overflow"]) == (12, 16, "saturate")
        stats = {k: v.item() for k, v in mod.named_buffers(recurse=False) if k in a["overflow_stats"]}
        assert stats and a["overflow_stats"] == stats
        assert a["describe"] == mod.describe()
    assert sum(a["overflow_stats"].get("events_train", 0) for a in accs.values()) > 0
    assert 'class="node narrow_acc' in drawing.svg["narrow_acc"].read_text()
    assert {r.b_acc for r in memory_traffic(qm, (2, 1, 28, 28)).layers} == {12}
