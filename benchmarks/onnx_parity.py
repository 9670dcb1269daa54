"""onnxruntime vs the integer reference vs qm.eval(), per model, scale mode and ONNX format.

Each model is compiled, trained a few SGD steps on random data, put in eval mode, lowered and
exported. Reported per (model, pow2_scales, format):
  e2e      share of final output codes where onnxruntime differs from the reference, and the max |Δ|
  local    the same per arithmetic op, each op exported alone and fed the reference's own inputs
  eval     share of reference outputs within one output step of qm.eval(), and the max steps

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_parity.py [--models a,b] [--batch 8]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lowering_models import trained  # noqa: E402

from qcompile.models import get  # noqa: E402
from qcompile.backends.parity import onnx_per_op as parity  # noqa: E402
from qcompile.ir.lower import lower  # noqa: E402
from qcompile.backends import reference as ref  # noqa: E402
from qcompile.tools.machine import cpu

MODELS = {
    "models:lenet5": (1, 28), "models:lenet5_bn": (1, 28), "models:resnet20": (3, 32),
    "models:resnet18_tiny": (3, 32), "torchvision:resnet18": (3, 32), "torchvision:mobilenet_v2": (3, 32),
    "torchvision:shufflenet_v2_x0_5": (3, 32), "torchvision:efficientnet_b0": (3, 32),
}


def build(name: str):
    kw = {} if name.startswith("models:lenet") else {"num_classes": 10}
    return get(name, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    print(f"CPU: {cpu()}", flush=True)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"{'model':<32} {'pow2':<5} {'fmt':<4} {'e2e mismatch':>12} {'max':>4} {'local (rate)':>15} "
          f"{'max':>4} {'ref≤1 step of eval':>18} {'max':>4}")
    for name in args.models.split(","):
        c, px = MODELS[name]
        for pow2 in (True, False):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            qm = trained(build(name), torch.randn(8, c, px, px), steps=3, pow2_scales=pow2)
            g = lower(qm)
            x = torch.randn(args.batch, c, px, px)
            d = np.rint(np.abs(ref.dequantize(g, ref.run(g, x)) - qm(x).detach().double().numpy())
                        / g.tensor(g.outputs[0]).scale)
            for fmt in ("qdq", "qop"):
                r = parity(g, x, fmt)
                print(f"{name:<32} {str(pow2):<5} {fmt:<4} {100 * r['mismatch']:>11.3f}% {r['max_lsb']:>4} "
                      f"{r['local_mismatch']:>15.1e} {r['local_max_lsb']:>4} {100 * (d <= 1).mean():>17.1f}% "
                      f"{int(d.max()):>4}   ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
