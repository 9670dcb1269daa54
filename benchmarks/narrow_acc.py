"""Time of the tiled narrow-accumulator op ÷ the same quantized op with exact accumulation.

Each ResNet-18 (224×224 ImageNet) conv shape and its fc is compiled alone twice with qcompile
(W8A8, 8-bit gradients): with exact accumulation (acc_bits=None, the plain quantized op) and
with acc_bits=16, tile=64, overflow="saturate" (grad_acc_bits defaults to 16 as well;
`--overflow pairwise`: the pairwise mode, tiles of 2). One
timed step is forward + backward of the compiled layer (G_X and G_W; conv1, whose input is the
image, only G_W), quantizers included in both. Inputs and weights are random, so most tiled
outputs saturate (the slow case: the clamp runs tile by tile). The two take turns step by step;
ratio of medians, one thread.
Goal: <= 1.3×. The tiled op quantizes its gradient operand (u = G_Y·s_w, stochastic rounding) itself;
the exact layer, whose input is the graph input, has no gradient quantizer here (in a network both
also quantize the gradient leaving the layer).

    OMP_NUM_THREADS=1 python benchmarks/narrow_acc.py [--batch 2] [--repeats 11] [--overflow saturate|wrap|pairwise]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import qcompile
from qcompile.tools.machine import cpu

# (name, in_channels, out_channels, kernel, stride, input spatial size)
RESNET18_CONVS = [
    ("conv1", 3, 64, 7, 2, 224),
    ("layer1.conv", 64, 64, 3, 1, 56),
    ("layer2.conv1", 64, 128, 3, 2, 56),
    ("layer2.conv2", 128, 128, 3, 1, 28),
    ("layer2.downsample", 64, 128, 1, 2, 56),
    ("layer3.conv1", 128, 256, 3, 2, 28),
    ("layer3.conv2", 256, 256, 3, 1, 14),
    ("layer4.conv1", 256, 512, 3, 2, 14),
    ("layer4.conv2", 512, 512, 3, 1, 7),
]


class Layer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _compiled(module: nn.Module, x: torch.Tensor, **cfg) -> nn.Module:
    torch.manual_seed(0)
    qm = qcompile.compile(Layer(module), (x,), qcompile.QConfig(grad_bits=8, seed=0, **cfg))
    qm.train()
    return qm


def _step_seconds(models: list[nn.Module], x: torch.Tensor, repeats: int, input_grad: bool) -> list[float]:
    """Median step time of each model; the models take turns step by step, so a change of load on
    the machine hits them alike."""
    times = [[] for _ in models]
    for i in range(repeats + 1):
        for qm, ts in zip(models, times):
            xi = x.clone().requires_grad_(input_grad)
            t0 = time.perf_counter()
            qm(xi).square().mean().backward()
            if i:                           # the first step initializes the estimators
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11,
                    help="timed steps per model and layer (the ratio is of their medians)")
    ap.add_argument("--overflow", default="saturate", choices=["saturate", "wrap", "pairwise"],
                    help="the tiled op's mode (pairwise: tiles of 2, not 64)")
    args = ap.parse_args(argv)
    tile = None if args.overflow == "pairwise" else 64
    print(f"CPU: {cpu()}", flush=True)
    torch.set_num_threads(1)
    shapes = [(n, nn.Conv2d(ci, co, k, s, k // 2, bias=False), (args.batch, ci, hw, hw))
              for n, ci, co, k, s, hw in RESNET18_CONVS]
    shapes.append(("fc", nn.Linear(512, 1000), (args.batch, 512)))
    print(f"{'layer':<20} {'exact ms':>9} {'tiled ms':>9} {'ratio':>6}")
    total_exact = total_tiled = 0.0
    for name, module, shape in shapes:
        x = torch.randn(shape)
        input_grad = name != "conv1"                # the image needs no gradient
        models = [_compiled(module, x), _compiled(module, x, acc_bits=16, tile=tile, overflow=args.overflow)]
        exact, tiled = _step_seconds(models, x, args.repeats, input_grad)
        total_exact += exact
        total_tiled += tiled
        print(f"{name:<20} {1e3 * exact:>9.2f} {1e3 * tiled:>9.2f} {tiled / exact:>6.2f}", flush=True)
    print(f"{'all layers':<20} {1e3 * total_exact:>9.2f} {1e3 * total_tiled:>9.2f} {total_tiled / total_exact:>6.2f}"
          "  (goal <= 1.30)")


if __name__ == "__main__":
    main()
