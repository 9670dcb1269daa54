"""Every bit width gives the right numbers: the quantization-error table with its derived bounds,
and a W8A16 (16x8) LeNet-5 trained on MNIST-5k and deployed.

Table: the five-layer net Conv2d(3,8,3,padding=1) → ReLU → AdaptiveAvgPool2d(1) → Flatten →
Linear(8,4) (random init, seed 0), compiled per weight/activation width with gradients off, one
forward in train mode on a random batch (eval mode for W12A12), compared with the float model on
the same input: max |error| ÷ max |float output|, next to the same ratio of the derived bound.

The bound (`sequential_error_bound`), elementwise, for v the float model's value and E a bound on
|v̂ − v| of the quantized model's value (every grid covers its tensor: the first forward's ranges
are the tensor's own min-max, so nothing clips):
  - a quantizer with step S adds S/2 (round to nearest);
  - a conv / linear y = W·x + b with weight step S_w (per channel), input step S_x:
        E_y = |Ŵ| ⊛ E_x + (S_w/2) ⊛ |x| + S_x·S_w/2 (bias rounding) + γ_K·(|Ŵ| ⊛ |x̂| + |W| ⊛ |x|)
    where ⊛ is the layer's own conv/linear applied to absolute values, |x̂| <= |x| + E_x, and
    γ_K = (K+1)u/(1 − (K+1)u), u = 2^-24, bounds float32 summation of K products in either model;
  - ReLU is 1-Lipschitz (E unchanged); average pooling averages E; Flatten reshapes it.

    python -m qcompile.tools.experiments.bit_widths [--table] [--lenet] [--epochs 3]
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.backends import parity
from qcompile.errors import QCompileError
from qcompile.models import get
from qcompile.tools.data import mnist_5k
from qcompile.tools.training import train_classifier

UNIT_ROUNDOFF = 2.0 ** -24          # float32
ROWS = ((8, 8, "train"), (8, 12, "train"), (8, 14, "train"), (8, 16, "train"), (12, 12, "eval"),
        (16, 8, "train"), (16, 16, "train"))


def issue_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def half_step(q) -> torch.Tensor:
    """S/2 of a quantizer's current grid (per channel for a per-channel weight quantizer)."""
    return q.scale.double() / 2


def _gamma(k: int) -> float:
    return (k + 1) * UNIT_ROUNDOFF / (1 - (k + 1) * UNIT_ROUNDOFF)


def weighted_bound(layer: nn.Module, prefix: str, qm, v: torch.Tensor, err: torch.Tensor, x_step):
    """(float value, error bound) after conv/linear `layer` (its quantizers at `prefix`.*) for an input
    of float value v with error bound err on the grid of step x_step (None: off any grid; the layer's
    input quantizer then adds its half step), before the output quantizer (module docstring)."""
    wq = qm.get_submodule(f"{prefix}.weight_quant")
    if hasattr(qm.get_submodule(prefix), "input_quant"):
        xq = qm.get_submodule(f"{prefix}.input_quant")
        err, x_step = err + half_step(xq), xq.scale.double()
    w = layer.weight.detach().double()
    with torch.no_grad():
        w_hat = wq(layer.weight.detach()).double()
    w_half = half_step(wq).reshape(-1, *([1] * (w.dim() - 1))).expand_as(w)
    if isinstance(layer, nn.Conv2d):
        def op(x, weight):
            return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        channel = (1, -1, 1, 1)
    else:
        def op(x, weight):
            return F.linear(x, weight)
        channel = (1, -1)
    gamma = _gamma(w[0].numel())
    x_abs = v.abs()
    y = op(v, w) + (layer.bias.detach().double().reshape(channel) if layer.bias is not None else 0)
    e = op(err, w_hat.abs()) + op(x_abs, w_half) + gamma * (op(x_abs + err, w_hat.abs()) + op(x_abs, w.abs()))
    if layer.bias is not None:
        e = e + (x_step * half_step(wq)).reshape(channel)
    return y, e


def sequential_error_bound(net: nn.Sequential, qm, x: torch.Tensor) -> torch.Tensor:
    """The elementwise bound E on |qm(x) − net(x)| for a Sequential of Conv2d / Linear / ReLU /
    AdaptiveAvgPool2d(1) / Flatten compiled into `qm` (run on x first, so its grids are x's)."""
    v = x.double()
    err = torch.zeros_like(v)
    step = None                                   # the step of the grid the current value is on
    for name, layer in net.named_children():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            v, err = weighted_bound(layer, name, qm, v, err, step)
            out = qm.get_submodule(f"{name}.output_quant")
            err, step = err + half_step(out), out.scale.double()
        elif isinstance(layer, nn.ReLU):
            v = v.clamp_min(0)
        elif isinstance(layer, nn.AdaptiveAvgPool2d) and layer.output_size in (1, (1, 1)):
            v, err, step = v.mean((2, 3), keepdim=True), err.mean((2, 3), keepdim=True), None
        elif isinstance(layer, nn.Flatten):
            v, err = layer(v), layer(err)
        else:
            raise ValueError(f"sequential_error_bound: layer {name} ({type(layer).__name__}) has no bound here")
    return err


def table(seed: int = 0) -> list[dict]:
    """The rows of the module docstring's table: measured error and bound, relative to max |float|."""
    net = issue_net(seed)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref = net(x).double()
    rows = []
    for wb, ab, mode in ROWS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = qcompile.compile(net, x, qcompile.QConfig(weight_bits=wb, act_bits=ab, grad_bits=None))
        with torch.no_grad():
            qm.train()
            y = qm(x)
            if mode == "eval":
                qm.eval()
                y = qm(x)
        bound = sequential_error_bound(net, qm, x)
        err = (y.double() - ref).abs()
        scale = float(ref.abs().max())
        rows.append({"weight_bits": wb, "act_bits": ab, "mode": mode, "error": float(err.max()) / scale,
                     "bound": float(bound.max()) / scale, "within": bool((err <= bound).all())})
    return rows


def print_table(rows) -> None:
    print("| weight/act bits | mode | max |error| ÷ max |float| | derived bound ÷ max |float| | every output within its bound |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weight_bits']} / {r['act_bits']} | {r['mode']} | {100 * r['error']:.4f} % | "
              f"{100 * r['bound']:.4f} % | {'yes' if r['within'] else 'NO'} |")


def lenet_w8a16(epochs: int = 3, seed: int = 0, out_dir: str | None = None) -> dict:
    """LeNet-5 on MNIST-5k at W8A16G8 (int16 activations, int8 weights), trained, lowered and run on
    the held-out digits by PyTorch (eval), the integer reference, the generated C and onnxruntime
    (QDQ; QOperator has no 16-bit kernels: its error is reported)."""
    torch.manual_seed(seed)
    data = mnist_5k(seed)
    config = qcompile.QConfig(weight_bits=8, act_bits=16, grad_bits=8, act_range="hindsight",
                              grad_range="hindsight", seed=seed)
    qm = qcompile.compile(get("models:lenet5"), (data.x_train[:2],), config)
    qm.calibrate(data.x_train[i:i + 256] for i in range(0, 1024, 256))
    log = train_classifier(qm, data.x_train, data.y_train, epochs=epochs, batch_size=64, lr=0.05, seed=seed)
    qm.eval()
    graph = qcompile.lower(qm)
    x, y = data.x_test, data.y_test.numpy()
    with torch.no_grad():
        trained = torch.cat([qm(x[i:i + 500]) for i in range(0, len(x), 500)])
    bias_types = sorted({str(op.attrs.bias.dtype) for op in graph.ops if hasattr(op.attrs, "bias")})
    result = {"steps": log.steps, "errors": {},
              "bias_dtypes": bias_types, "tensor_bits": sorted({t.bits for t in graph.tensors.values()})}
    backends = ["reference", "c", "onnx:qdq", "onnx:qop"]
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"PyTorch": parity.float_to_codes(graph, trained)}
        for b in backends:
            try:
                codes[b] = parity.outputs(graph, x, b, workdir=(out_dir or tmp) if b == "c" else None)
            except QCompileError as e:
                result["errors"][b] = f"{type(e).__name__}: {e}"
    cmp = parity.Comparison(codes)
    result["accuracy"] = {name: cmp.accuracy(name, y) for name in codes}
    result["max_lsb_vs_reference"] = {name: cmp.max_lsb(name, "reference") for name in codes if name != "reference"}
    result["differ_vs_reference"] = {name: cmp.differ(name, "reference") for name in codes if name != "reference"}
    return result


def print_lenet(r: dict) -> None:
    print(f"LeNet-5 W8A16G8 on MNIST-5k, {r['steps']} steps; IR tensor widths {r['tensor_bits']}, "
          f"bias storage {r['bias_dtypes']}")
    print("held-out accuracy: " + " | ".join(f"{k} {v:.2f}%" for k, v in r["accuracy"].items()) + " (1000 digits)")
    print("max |code difference| vs the reference: " +
          ", ".join(f"{k} {v}" for k, v in r["max_lsb_vs_reference"].items()))
    print("predictions that differ from the reference: " +
          ", ".join(f"{k} {v}" for k, v in r["differ_vs_reference"].items()))
    for b, e in r["errors"].items():
        print(f"{b}: {e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="store_true", help="only the error table")
    p.add_argument("--lenet", action="store_true", help="only the W8A16 LeNet-5 run")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    both = not (a.table or a.lenet)
    if a.table or both:
        print_table(table(a.seed))
    if a.lenet or both:
        print_lenet(lenet_w8a16(a.epochs, a.seed))


if __name__ == "__main__":
    main()
