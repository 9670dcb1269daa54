"""A torchvision transformer compiled with one call, trained 3 steps, deployed: the float-fallback
list, the losses, the quantized gradient entering every attention matmul, and the agreement of
`qm.eval()`, the integer reference and onnxruntime.

    python -m qcompile.tools.experiments.attention_gradients swin_t --size 224

W8A8G8 in-hindsight, random init (seed 0), 4 random inputs, 3 SGD steps at lr 0.01. "distinct
gradient values" is the number of distinct values of the gradient of each attention matmul's
output (q·kᵀ and p·v, the activation × activation matmuls) on the last step: at most 2^grad_bits on
one grid. Then `qm.eval()`, lowering, the ONNX QDQ export (checked with `full_check`) in
onnxruntime; differences are the largest, in output steps, over the 4 × classes logits.
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import fx

import qcompile
from qcompile.backends import parity
from qcompile.passes.ops import family_of
from qcompile.passes.quantize import FloatFallbackWarning


def attention_matmuls(qm) -> list:
    """The activation × activation matmul nodes of a compiled graph (q·kᵀ and p·v)."""
    return [n for n in qm.graph.nodes if family_of(n, qm) is not None and family_of(n, qm).name == "matmul"]


def gradient_recorder(qm, grads: dict) -> fx.Interpreter:
    """An interpreter of `qm` that stores, per attention matmul, the gradient entering it (the gradient of
    its output) into `grads` on each backward pass."""
    matmuls = {n.name for n in attention_matmuls(qm)}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in matmuls:
                out.register_hook(lambda g, name=n.name: grads.__setitem__(name, g.detach().clone()))
            return out

    return Recorder(qm)


def run(name: str, size: int, steps: int = 3) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    x = torch.randn(4, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FloatFallbackWarning)
        qm = qcompile.compile(model, (x,), qcompile.QConfig(weight_bits=8, act_bits=8, grad_bits=8, seed=0))
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, FloatFallbackWarning)]
    qm.calibrate([x])
    grads = {}
    recorder = gradient_recorder(qm, grads)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(recorder.run(x), torch.arange(len(x)) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(float(loss.detach()), 3))
    qm.eval()
    graph = qcompile.lower(qm)
    with torch.no_grad():
        out = qm(x)
    cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq"), given={"qm.eval()": out})
    return {"model": name, "input": size, "float_fallback": fallbacks or "none", "losses": losses,
            "attention_matmuls": len(attention_matmuls(qm)),
            "distinct_gradient_values": (min(g.unique().numel() for g in grads.values()),
                                         max(g.unique().numel() for g in grads.values())) if grads else None,
            "ir_ops": len(graph.ops), "qm.eval() vs reference": cmp.max_lsb("qm.eval()", "reference"),
            "reference vs onnxruntime": cmp.max_lsb("reference", "onnx:qdq")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a torchvision classifier: vit_b_16, maxvit_t, swin_t, swin_v2_t, ...")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    for key, value in run(args.model, args.size).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
