"""qcompile: a torch.fx compiler for fully quantized training and integer deployment.

The façade. `import qcompile` loads the training side only (config, passes, training ops);
lowering, the backends (onnx, jinja2) and the tools (networkx) are imported when first used.
"""
from __future__ import annotations

import importlib
import importlib.metadata

from qcompile.config import QConfig
from qcompile.errors import (
    CalibrationError,
    CheckpointError,
    NonFiniteError,
    QCompileError,
    TraceError,
    UnsupportedOpError,
)
from qcompile.passes.pipeline import compile
from qcompile.train.graph_module import QuantizedGraphModule

__version__ = importlib.metadata.version("qcompile")

# name → (module, attribute or None for the module itself), loaded on first access
_LAZY = {
    "lower": ("qcompile.ir.lower", "lower"),
    "export_onnx": ("qcompile.tools.deploy", "export_onnx"),
    "emit_c": ("qcompile.tools.deploy", "emit_c"),
    "parity": ("qcompile.backends.parity", None),
    "draw": ("qcompile.tools.draw", "draw"),
    "analysis": ("qcompile.tools.analysis", None),
    "experiments": ("qcompile.tools.experiments", None),
    "bn_rectification": ("qcompile.train.bn_rectification", None),
    "data": ("qcompile.tools.data", None),
    "trainer": ("qcompile.tools.trainer", None),
    "models": ("qcompile.models", None),
    "ir": ("qcompile.ir", None),
}

__all__ = ["compile", "QConfig", "QuantizedGraphModule", "QCompileError", "TraceError", "UnsupportedOpError",
           "CalibrationError", "CheckpointError", "NonFiniteError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
