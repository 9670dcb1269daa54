"""Backends: each takes an `ir.Graph` and nothing else (reference, onnx, c, parity)."""
