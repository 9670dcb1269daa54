"""The typed integer IR: what lowering produces and every backend consumes (`graph`), the attrs
dataclass of each op kind (`ops`, mapped by `SPEC`), the checker (`verify`), and the lowering from a
trained graph (`lower`, imported when first used: it reads the training modules)."""
from qcompile.ir.graph import Graph, Op, Tensor, code_range
from qcompile.ir.ops import (
    SPEC,
    Accumulator,
    AdaptiveAvgPool2d,
    Add,
    AvgPool2d,
    Clamp,
    Concat,
    Conv2d,
    Linear,
    Lut,
    Matmul,
    MaxPool2d,
    Mul,
    PerChannel,
    Requant,
    Requantize,
    Reshape,
    Slice,
    Transpose,
)
from qcompile.ir.verify import IRError, verify

__all__ = [
    "SPEC",
    "Accumulator",
    "AdaptiveAvgPool2d",
    "Add",
    "AvgPool2d",
    "Clamp",
    "Concat",
    "Conv2d",
    "Graph",
    "IRError",
    "Linear",
    "Lut",
    "Matmul",
    "MaxPool2d",
    "Mul",
    "Op",
    "PerChannel",
    "Requant",
    "Requantize",
    "Reshape",
    "Slice",
    "Tensor",
    "Transpose",
    "code_range",
    "verify",
]
