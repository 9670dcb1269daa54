"""`qcompile.compile`: the one call that runs the pass pipeline on a float model.

The pipeline (docs/architecture.md) runs in a fixed order; each pass is a function
(GraphModule, QConfig) -> GraphModule that edits the module in place. After every pass
the graph is snapshotted into `qm.pass_snapshots`, and nodes the pass created are tagged
`meta["qc_pass"]` with its name.

Verification: each pass module (trace included) has a `verify(gm, config)` that checks the
invariant its docstring states and raises `VerificationError` naming the pass, the node and
what was expected. With `QConfig.verify=True` or the environment variable QCOMPILE_VERIFY=1,
`compile` runs the pass's verify (looked up in `VERIFIERS`) right after the pass, before it
is tagged and snapshotted, so a broken invariant is reported by the pass that broke it.
The test suite runs with QCOMPILE_VERIFY=1 (tests/conftest.py).
"""
from __future__ import annotations

import fnmatch

import os

import torch
from torch import fx, nn

from qcompile.config import QConfig
from qcompile.passes import fold_bn as _fold_bn
from qcompile.passes import fuse_relu as _fuse_relu
from qcompile.passes import narrow_acc as _narrow_acc
from qcompile.passes import normalize as _normalize
from qcompile.passes import quantize as _quantize
from qcompile.passes import regularize as _regularize
from qcompile.passes import trace as _trace
from qcompile.passes.fold_bn import fold_bn
from qcompile.passes.fuse_relu import fuse_relu
from qcompile.passes.narrow_acc import narrow_acc
from qcompile.passes.normalize import normalize
from qcompile.passes.quantize import quantize
from qcompile.passes.regularize import regularize
from qcompile.passes.trace import trace
from qcompile.train.graph_module import QuantizedGraphModule

PIPELINE = (
    ("normalize", normalize),
    ("fold_bn", fold_bn),
    ("quantize", quantize),
    ("narrow_acc", narrow_acc),
    ("regularize", regularize),
    ("fuse_relu", fuse_relu),
)

# each pass's invariant check, run after it when verification is on
VERIFIERS = {
    "trace": _trace.verify,
    "normalize": _normalize.verify,
    "fold_bn": _fold_bn.verify,
    "quantize": _quantize.verify,
    "narrow_acc": _narrow_acc.verify,
    "regularize": _regularize.verify,
    "fuse_relu": _fuse_relu.verify,
}


def verification_on(config: QConfig) -> bool:
    """True when `config.verify` is set or the environment variable QCOMPILE_VERIFY is 1."""
    return config.verify or os.environ.get("QCOMPILE_VERIFY", "") == "1"


def _tag(qm: QuantizedGraphModule, pass_name: str, existing: set) -> None:
    """Tag the nodes `pass_name` created (those not in `existing`) and record module types."""
    for node in qm.graph.nodes:
        if node not in existing:
            node.meta["qc_pass"] = pass_name
        if node.op == "call_module" and "qc_module_type" not in node.meta:
            node.meta["qc_module_type"] = type(qm.get_submodule(node.target)).__name__


def check_overrides(config: QConfig, model: nn.Module, gm: fx.GraphModule) -> None:
    """ValueError naming every QConfig.overrides key that selects nothing: a glob matching no module
    path of `model` and no layer name of the traced graph, or a module type with no instance."""
    names = {n for n, _ in model.named_modules() if n} | \
        {n.meta.get("qc_layer", n.name) for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    types = {type(m) for m in model.modules()}
    for key in config.overrides:
        if isinstance(key, str) and not any(fnmatch.fnmatchcase(n, key) for n in names):
            raise ValueError(f"QConfig.overrides[{key!r}] matches no layer of {type(model).__name__}; layer names "
                             f"look like {sorted(names)[:8]}")
        if isinstance(key, type) and not any(issubclass(t, key) for t in types):
            raise ValueError(f"QConfig.overrides[{key.__name__}] matches no module of {type(model).__name__} "
                             f"(module types: {sorted(t.__name__ for t in types)[:8]})")


def compile(model: nn.Module, example_inputs, config: QConfig | dict | None = None, *,
            leaf_modules=None, concrete_args: dict | None = None, **overrides) -> QuantizedGraphModule:
    """Trace `model` (not mutated) and return its trainable fully quantized graph.

    `config` is a QConfig, a dict of its fields, or None (defaults); keyword `overrides`
    replace single fields (e.g. `grad_bits=4`). `leaf_modules` (module paths or class names)
    are kept as opaque calls; `concrete_args` are passed to torch.fx's tracer.
    """
    if config is None:
        config = QConfig()
    elif isinstance(config, dict):
        config = QConfig.from_dict(config)
    elif not isinstance(config, QConfig):
        raise TypeError(f"config must be a QConfig, a dict or None, not {type(config).__name__}")
    if leaf_modules is not None:
        overrides["leaf_modules"] = tuple(leaf_modules)
    if overrides:
        config = config.replace(**overrides)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model, tuple(example_inputs), config.leaf_modules, concrete_args)
    check_overrides(config, model, gm)
    qm = QuantizedGraphModule(gm, gm.graph, class_name=f"Quantized{type(model).__name__}")
    qm.config = config
    qm.train(model.training)
    check = verification_on(config)
    if check:
        VERIFIERS["trace"](qm, config)
    _tag(qm, "trace", set())
    qm.snapshot("trace")
    for name, run in PIPELINE:
        existing = set(qm.graph.nodes)
        run(qm, config)
        if check:
            VERIFIERS[name](qm, config)
        _tag(qm, name, existing)
        qm.snapshot(name)
    return qm
