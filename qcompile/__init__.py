"""qcompile: a torch.fx compiler for fully quantized training and integer deployment."""
from .compiler import compile
from .config import QConfig
from .errors import CalibrationError, CheckpointError, NonFiniteError, QCompileError, TraceError, UnsupportedOpError
from .graph_module import QuantizedGraphModule
from .draw import draw
from .onnx_export import export_onnx
from .passes.lower import lower
from .runtime.codegen import emit_c
from . import models

__version__ = "0.1.0"
__all__ = ["compile", "draw", "export_onnx", "emit_c", "lower", "QConfig", "QuantizedGraphModule", "QCompileError", "TraceError",
           "UnsupportedOpError", "CalibrationError", "CheckpointError", "NonFiniteError", "__version__"]
