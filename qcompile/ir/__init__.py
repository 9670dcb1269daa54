"""The typed integer IR: what lowering produces and every backend consumes (`graph`), its checker
(`verify`) and the lowering from a trained graph (`lower`, imported when first used)."""
from qcompile.ir.graph import Graph, Op, Tensor, code_range

__all__ = ["Graph", "Op", "Tensor", "code_range"]
