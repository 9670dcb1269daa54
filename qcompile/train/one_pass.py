"""csrc/fake_quant.c, the one-pass CPU kernels of the quantizers' and estimators' float32 arithmetic:
each gives the torch expression it replaces bit for bit, in one pass over the tensor instead of one
per operation (the file's header lists them)."""
from __future__ import annotations

import ctypes

import torch

from qcompile.train import native


def one_pass(x: torch.Tensor) -> ctypes.CDLL | None:
    """The library where x is a contiguous float32 CPU tensor in eager mode; else None (and None where
    it cannot be built: callers use their torch expressions)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or torch.compiler.is_compiling():
        return None
    lib = native.library("fake_quant")
    if lib is not None and lib.qc_stochastic_codes.argtypes is None:
        ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.qc_fake_quant_rows.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, f32, f32]
        lib.qc_fake_quant_rows.restype = None
        lib.qc_stochastic_codes.argtypes = [ptr, ptr, i64, i64, f32, f32, f32, ctypes.c_int, ptr, i64, i64, ptr]
        lib.qc_stochastic_codes.restype = None
        lib.qc_fake_quant_tensor.argtypes = [ptr, ptr, ptr, i64, f32, f32, f32, f32, ptr]
        lib.qc_fake_quant_tensor.restype = ctypes.c_int
        lib.qc_minmax_rows.argtypes = [ptr, i64, i64, ptr, ptr]
        lib.qc_minmax_rows.restype = None
    return lib
