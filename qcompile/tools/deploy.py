"""Deploying a trained graph: lower it to the integer IR, then hand the IR to a backend.

The only place where a trained `QuantizedGraphModule` meets a backend: backends take an
`ir.Graph` and nothing else. Each function also takes an already lowered `ir.Graph`.
"""
from __future__ import annotations

from qcompile import ir
from qcompile.ir.lower import lower


def integer_graph(model) -> ir.Graph:
    """`model` lowered to the integer IR (a trained graph in eval mode), or `model` if it is an ir.Graph."""
    return model if isinstance(model, ir.Graph) else lower(model)


def export_onnx(model, path, format: str = "qdq", opset: int | None = None, *, weight_dtype: str = "auto") -> ir.Graph:
    """Write `model` (trained graph or ir.Graph) to `path` as ONNX; returns the integer graph exported."""
    from qcompile.backends import onnx
    graph = integer_graph(model)
    onnx.write(graph, path, format, opset, weight_dtype=weight_dtype)
    return graph


def emit_c(model, out_dir, name: str = "model"):
    """Write the C runtime of `model` (trained graph or ir.Graph) into `out_dir`; returns the CModule."""
    from qcompile.backends.c import codegen
    return codegen.emit(integer_graph(model), out_dir, name)
