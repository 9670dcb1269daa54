"""csrc/fake_quant.c, the one-pass CPU kernels of the quantizers' and estimators' float32 arithmetic:
each gives the torch expression it replaces bit for bit, in one pass over the tensor instead of one
per operation (the file's header lists them)."""
from __future__ import annotations

import ctypes
import functools

import torch

from qcompile.core.grids import SCALE_EPS
from qcompile.train import native

QC_FINITE, QC_CLIPPED, QC_UNSET = 1, 2, 4   # the one-call steps' status bits
RELU_BEFORE, RELU_AFTER = 1, 2              # where a hindsight step's relu is (qc_fake_quant_hindsight)
MASK_INSIDE, MASK_POSITIVE = 1, 2           # the bits of its mask then (qc_masked_rectified)


class QuantizerState(ctypes.Structure):
    """csrc/fake_quant.c's qc_state: the buffers a quantizer's one-call step reads and writes in place (its
    estimator's lo, hi, initialized (bool) and nonfinite (int64), the Quantizer's scale and zero_point;
    float32, 0-d or one per row), with the estimator's momentum (hindsight) and the grid's parameters
    (pow2 off). `tensors` keeps the buffers."""

    _fields_ = [("lo", ctypes.c_void_p), ("hi", ctypes.c_void_p), ("initialized", ctypes.c_void_p),
                ("nonfinite", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero_point", ctypes.c_void_p),
                ("momentum", ctypes.c_double), ("scale_eps", ctypes.c_float), ("qmin", ctypes.c_float),
                ("qmax", ctypes.c_float), ("symmetric", ctypes.c_int)]

    @classmethod
    def of(cls, buffers, momentum: float, qrange: tuple[int, int], symmetric: bool) -> QuantizerState:
        """`buffers` = (lo, hi, initialized, nonfinite, scale, zero_point), in the struct's order."""
        state = cls(*(b.data_ptr() for b in buffers), momentum, SCALE_EPS, *qrange, int(symmetric))
        state.tensors = buffers
        return state


def one_pass(x: torch.Tensor) -> ctypes.CDLL | None:
    """The library where x is a contiguous float32 CPU tensor in eager mode; else None (and None where
    it cannot be built: callers use their torch expressions)."""
    if not x.is_cpu or x.dtype is not torch.float32 or not x.is_contiguous() or torch.compiler.is_compiling():
        return None
    lib = native.library("fake_quant")
    return None if lib is None else _with_signatures(lib)


@functools.cache
def _with_signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with its functions' ctypes signatures set."""
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.qc_fake_quant_rows.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, f32, f32]
    lib.qc_fake_quant_rows.restype = None
    lib.qc_stochastic_codes.argtypes = [ptr, ptr, i64, i64, f32, f32, f32, ctypes.c_int, ptr, i64, i64, ptr]
    lib.qc_stochastic_codes.restype = None
    state = ctypes.POINTER(QuantizerState)
    lib.qc_stochastic_codes_hindsight.argtypes = [state, ptr, ptr, i64, i64, ctypes.c_int, ptr, i64, i64]
    lib.qc_stochastic_codes_hindsight.restype = ctypes.c_int
    lib.qc_fake_quant_hindsight.argtypes = [state, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.qc_fake_quant_hindsight.restype = ctypes.c_int
    lib.qc_fake_quant_rows_current.argtypes = [state, ptr, ptr, i64, i64, ptr]
    lib.qc_fake_quant_rows_current.restype = ctypes.c_int
    lib.qc_minmax_rows.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.qc_minmax_rows.restype = None
    lib.qc_masked.argtypes = [ptr, ptr, ptr, i64]
    lib.qc_masked.restype = None
    lib.qc_masked_rectified.argtypes = [ptr, ptr, ptr, i64]
    lib.qc_masked_rectified.restype = None
    lib.qc_padded.argtypes = [ptr, ptr] + [i64] * 7 + [ptr]
    lib.qc_padded.restype = None
    return lib
