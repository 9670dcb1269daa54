"""Errors qcompile raises. Each names what failed and where, and says what to do."""


class QCompileError(Exception):
    """Base class of every qcompile error."""


class TraceError(QCompileError):
    """torch.fx could not trace the model (data-dependent control flow, untraceable call)."""


class UnsupportedOpError(QCompileError):
    """An op has no quantized form and `strict=True` forbids leaving it in float."""


class CalibrationError(QCompileError):
    """A static quantizer was asked for a range it has not estimated yet."""


class NonFiniteError(QCompileError, FloatingPointError):
    """A quantizer met NaN or Inf; its range state was left untouched."""


class CheckpointError(QCompileError):
    """A checkpoint could not be read or does not match the graph; nothing was loaded."""


class VerificationError(QCompileError):
    """A pass's output graph breaks the invariant its docstring states (a bug in that pass, or a
    graph edited by hand between passes); the message names the pass, the node and what was expected."""
