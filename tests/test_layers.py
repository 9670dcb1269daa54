"""The import contract of qcompile's layers (docs/architecture.md): which package may import which,
no import cycles, and a façade that loads no backend until one is used."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "qcompile"

BASE = {"qcompile.errors", "qcompile.config"}
# layer → the layers its modules may import (besides itself); the first matching prefix wins
ALLOWED = [
    ("qcompile.errors", set()),
    ("qcompile.config", set()),
    ("qcompile.core", set()),
    ("qcompile.models", set()),
    ("qcompile.train", {"qcompile.core"} | BASE),
    ("qcompile.passes", {"qcompile.train", "qcompile.core"} | BASE),
    ("qcompile.ir.lower", {"qcompile.ir", "qcompile.train", "qcompile.passes.ops", "qcompile.core"} | BASE),
    ("qcompile.ir", {"qcompile.core", "qcompile.errors"}),
    ("qcompile.backends", {"qcompile.ir", "qcompile.core", "qcompile.errors"}),
    ("qcompile.tools", {"qcompile"}),
    ("qcompile", {"qcompile"}),                     # the façade (__init__)
]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(imported qcompile module, line) for every import statement in a file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute qcompile path")
            base = node.module or ""
            for a in node.names:   # `from qcompile.x import y` may name a submodule y
                sub = f"{base}.{a.name}"
                found.append((sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists()
                              or (ROOT.parent / sub.replace(".", "/")).is_dir() else base, node.lineno))
    return sorted({(m, line) for m, line in found if m == "qcompile" or m.startswith("qcompile.")})


def layer_of(module: str) -> tuple[str, set]:
    for prefix, allowed in ALLOWED:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, allowed
    raise AssertionError(f"{module}: in no layer of the contract")


def violations(root: pathlib.Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path)
        layer, allowed = layer_of(mod)
        for target, line in imports(path):
            ok = target.startswith(layer) or any(target == a or target.startswith(a + ".") for a in allowed)
            if not ok:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {mod} ({layer}) imports {target}")
    return bad


def cycles(root: pathlib.Path = ROOT) -> list[list[str]]:
    """Import cycles between qcompile modules (every import statement counts, function-local too)."""
    import networkx as nx
    g = nx.DiGraph()
    for path in root.rglob("*.py"):
        mod = module_name(path)
        if mod == "qcompile":
            continue                   # the façade imports lazily by name; packages import their own children
        for target, _ in imports(path):
            if target != mod and not target.startswith(mod + ".") and target != "qcompile":
                g.add_edge(mod, target)
    return [c for c in nx.simple_cycles(g)]


def test_every_import_follows_the_layer_contract():
    assert violations() == []


def test_no_import_cycles():
    assert cycles() == []


def test_a_forbidden_edge_is_caught(tmp_path, monkeypatch):
    """The checker itself: a backend that imports the training code is reported with file and line."""
    fake = tmp_path / "qcompile"
    (fake / "backends").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "backends" / "bad.py").write_text("import numpy\n\nfrom qcompile.train.tiled import tiled_conv2d\n")
    (fake / "train" / "ok.py").write_text("from qcompile.core.grids import qrange\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert violations(fake) == ["qcompile/backends/bad.py:3: qcompile.backends.bad (qcompile.backends) imports "
                                "qcompile.train.tiled"]
    (fake / "train" / "loop.py").write_text("from qcompile.backends.bad import x\n")
    (fake / "backends" / "bad.py").write_text("from qcompile.train.loop import y\n")
    assert cycles(fake), "a two-module cycle is found"


def test_import_qcompile_loads_no_backend_and_readme_names_resolve():
    code = (
        "import sys, qcompile\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'jinja2', 'networkx')"
        " or m.startswith('qcompile.backends') or m.startswith('qcompile.tools'))\n"
        "print(heavy)\n"
        "assert callable(qcompile.analysis.accumulator_bounds) and callable(qcompile.analysis.memory_traffic)\n"
        "for name in ('compile', 'QConfig', 'lower', 'export_onnx', 'emit_c', 'draw'):\n"
        "    assert callable(getattr(qcompile, name)), name\n"
        "assert callable(qcompile.bn_rectification.noise_amplification)\n"
        "assert callable(qcompile.data.mnist_5k) and callable(qcompile.models.get)\n"
        "assert callable(qcompile.data.write_mnist_5k_folder) and callable(qcompile.data.load_datasets)\n"
        "assert callable(qcompile.trainer.run) and callable(qcompile.trainer.resume)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_unknown_attribute_is_an_attribute_error():
    import qcompile
    with pytest.raises(AttributeError, match="no attribute 'runtime'"):
        qcompile.runtime  # noqa: B018
