"""The typed integer IR: what lowering produces and every backend consumes (`graph`), its
specification and checker (`verify`), and the lowering from a trained graph (`lower`, imported
when first used: it reads the training modules)."""
from qcompile.ir.graph import Graph, Op, Tensor, code_range
from qcompile.ir.verify import SPEC, IRError, verify

__all__ = ["Graph", "Op", "Tensor", "code_range", "verify", "IRError", "SPEC"]
