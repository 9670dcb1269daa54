"""Parity: the output codes of one `ir.Graph` run by any backends, compared pairwise.

Backends by name: "reference" (the numpy oracle), "onnx:qdq" / "onnx:qop" (onnxruntime on the
export), "c" (the generated C, built with gcc). Outputs that come from elsewhere — the trained
graph in eval mode — join as float values on the graph output's grid (`float_to_codes`).
Invariant: every entry of a `Comparison` holds integer codes of `graph.outputs[0]`, shape
(N, *shape), so any two are compared code for code and by argmax prediction.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompile import ir
from qcompile.backends import reference

BACKENDS = ("reference", "onnx:qdq", "onnx:qop", "c")
ARITHMETIC_KINDS = ("conv2d", "linear", "matmul", "add", "mul", "concat", "requantize", "avg_pool2d", "max_pool2d",
                    "adaptive_avg_pool2d", "lut", "softmax", "layer_norm")


def float_to_codes(graph: ir.Graph, y, name: str | None = None) -> np.ndarray:
    """Codes of a float tensor that holds dequantized values of `name`'s grid (default: the output):
    exact, since scale·(q − z) in float32 rounds back to q."""
    t = graph.tensor(name or graph.outputs[0])
    y = np.asarray(y.detach().numpy() if hasattr(y, "detach") else y, dtype=np.float64)
    return np.rint(y / np.float64(np.float32(t.scale))).astype(np.int64) + t.zero_point


def _onnx_codes(graph: ir.Graph, model, feeds: list) -> np.ndarray:
    from qcompile.backends.onnx import onnxruntime_session
    sess = onnxruntime_session(model.SerializeToString())
    names = [i.name for i in model.graph.input]
    return float_to_codes(graph, sess.run(None, dict(zip(names, feeds)))[0])


def _float_input(x) -> np.ndarray:
    return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, dtype=np.float32)


def outputs(graph: ir.Graph, x, backend: str, workdir=None, batch: int = 500) -> np.ndarray:
    """Output codes of `graph` on the float input batch `x`, computed by `backend` (one of BACKENDS).
    "c" writes and builds the runtime in `workdir` (a temporary directory when None)."""
    if backend == "reference":
        return np.concatenate([reference.run(graph, x[i:i + batch]) for i in range(0, len(x), batch)])
    if backend.startswith("onnx:"):
        from qcompile.backends.onnx import to_onnx
        model = to_onnx(graph, backend.split(":", 1)[1])
        xf = _float_input(x)
        return np.concatenate([_onnx_codes(graph, model, [xf[i:i + batch]]) for i in range(0, len(xf), batch)])
    if backend == "c":
        from qcompile.backends.c import codegen
        if workdir is None:
            with tempfile.TemporaryDirectory() as tmp:
                return outputs(graph, x, "c", tmp)
        module = codegen.emit(graph, workdir, name="model")
        (codes,) = module.run(reference.quantize_input(graph, x), exe=module.build(opt="-O2"))
        return codes.astype(np.int64)
    raise ValueError(f"backend {backend!r}: choose one of {BACKENDS}")


@dataclass
class Comparison:
    """Output codes per source on one input batch, and how any two differ."""
    codes: dict[str, np.ndarray]

    def predictions(self, name: str) -> np.ndarray:
        c = self.codes[name]
        return c.reshape(len(c), -1).argmax(1)

    def accuracy(self, name: str, labels) -> float:
        return 100.0 * float((self.predictions(name) == np.asarray(labels)).mean())

    def differ(self, a: str, b: str) -> int:
        """Samples whose argmax prediction differs between sources a and b."""
        return int((self.predictions(a) != self.predictions(b)).sum())

    def max_lsb(self, a: str, b: str) -> int:
        return int(np.abs(self.codes[a] - self.codes[b]).max())

    def mismatch(self, a: str, b: str) -> float:
        """Fraction of output codes that differ between a and b."""
        return float((self.codes[a] != self.codes[b]).mean())

    def pairs(self) -> list[tuple[str, str]]:
        names = list(self.codes)
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def compare(graph: ir.Graph, x, backends=BACKENDS, given: dict | None = None, workdir=None) -> Comparison:
    """Run `graph` on `x` with each of `backends` (the C runtime in `workdir`/c when given); `given`
    adds outputs from elsewhere: name → float values on the output grid (the trained graph's eval output)."""
    codes = {name: float_to_codes(graph, y) for name, y in (given or {}).items()}
    for b in backends:
        codes[b] = outputs(graph, x, b, None if workdir is None or b != "c" else Path(workdir) / "c")
    return Comparison(codes)


def onnx_per_op(graph: ir.Graph, x, format: str = "qdq", weight_dtype: str = "auto", local: bool = True) -> dict:
    """onnxruntime vs the integer reference on input batch `x`.

    end to end: output codes of the whole exported graph ("mismatch" rate, "max_lsb");
    local (per op): each arithmetic op exported alone and fed the reference's own input codes, so a
    difference is that op's arithmetic, not one inherited from upstream ("local_mismatch" rate over
    all elements of all ops, "local_max_lsb", and "worst_op")."""
    from qcompile.backends.onnx import to_onnx
    env = reference.run(graph, x, keep=True)
    model = to_onnx(graph, format, weight_dtype=weight_dtype)
    out = _onnx_codes(graph, model, [_float_input(x)])
    diff = np.abs(out - env[graph.outputs[0]])
    res = {"format": format, "mismatch": float((diff > 0).mean()), "max_lsb": int(diff.max()), "outputs": diff.size}
    if not local:
        return res
    bad = total = worst = 0
    worst_op = None
    for op in graph.ops:
        if op.kind not in ARITHMETIC_KINDS:
            continue
        inputs = list(dict.fromkeys(op.inputs))
        sub = ir.Graph(inputs, [op.output], graph.tensors, [op], graph.meta)
        feeds = [reference.dequantize(graph, env[n], n).astype(np.float32) for n in inputs]
        d = np.abs(_onnx_codes(sub, to_onnx(sub, format, weight_dtype=weight_dtype), feeds) - env[op.output])
        bad += int((d > 0).sum())
        total += d.size
        if d.max() > worst:
            worst, worst_op = int(d.max()), op.name
    res.update(local_mismatch=bad / max(total, 1), local_max_lsb=worst, worst_op=worst_op, local_elements=total)
    return res
