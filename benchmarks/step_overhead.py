"""Train-step overhead of qcompile's fully quantized graph, measured side by side.

In one run, on the same inputs: train-step time of torchvision resnet18 (64×64, batch 32)
compiled W8A8G8 with in-hindsight ranges ÷ the FP32 step, and ÷ torch.ao's
`prepare_qat_fx` QAT step (which quantizes no gradients); compile time of resnet50 ÷
`prepare_qat_fx` time. With `--compile`, the FP32 model and qcompile's graph also run under
`torch.compile` (inductor): their step times, and the time their first two steps took (the
compilation). Steps are interleaved round by round so load changes hit every run alike; the
median is reported.

    python benchmarks/step_overhead.py [--rounds 7] [--threads 2] [--compile]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

import qcompile
from qcompile.tools.machine import cpu


def torch_ao_qat(model, example):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (example,))


def step_fn(model, x, y, optimizer=torch.optim.SGD, **hyper):
    """One training step of `model` on (x, y) as a closure: cross-entropy (plus the model's barrier term,
    if any), backward, `optimizer` step (SGD lr 0.01, momentum 0.9 unless `hyper` says otherwise)."""
    opt = optimizer(model.parameters(), **(hyper or {"lr": 0.01, "momentum": 0.9}))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if hasattr(model, "regularization"):
            loss = loss + model.regularization()
        loss.backward()
        opt.step()
    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd FP32 and qcompile steps")
    args = ap.parse_args(argv)
    print(f"CPU: {cpu()}", flush=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 200, (32,))

    model = torchvision.models.resnet18(num_classes=200)
    runs = {
        "fp32": copy.deepcopy(model).train(),
        "qcompile W8A8G8 hindsight": qcompile.compile(model, (x[:2],), qcompile.QConfig(grad_bits=8, seed=0)).train(),
        "torch.ao QAT (prepare_qat_fx)": torch_ao_qat(model, x[:2]),
    }
    if args.compile:
        runs["fp32 torch.compile"] = torch.compile(copy.deepcopy(model).train())
        runs["qcompile torch.compile"] = torch.compile(
            qcompile.compile(model, (x[:2],), qcompile.QConfig(grad_bits=8, seed=0)).train())
    steps = {name: step_fn(m, x, y) for name, m in runs.items()}
    warmup = {name: timed(lambda: (step(), step())) for name, step in steps.items()}   # first step initializes the estimators
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    med = {name: statistics.median(t) for name, t in times.items()}

    big = torchvision.models.resnet50()
    ex = torch.randn(1, 3, 64, 64)
    compile_q = min(timed(lambda: qcompile.compile(big, (ex,), qcompile.QConfig(grad_bits=8))) for _ in range(3))
    compile_ao = min(timed(lambda: torch_ao_qat(big, ex)) for _ in range(3))

    print(f"resnet18 64x64 batch 32, {args.threads} threads, median of {args.rounds} interleaved rounds")
    for name, t in med.items():
        print(f"  {name:<32} {1e3 * t:8.1f} ms/step")
    q = med["qcompile W8A8G8 hindsight"]
    print(f"  qcompile / FP32                  {q / med['fp32']:.2f}x   (goal <= 1.15x)")
    print(f"  qcompile / torch.ao QAT          {q / med['torch.ao QAT (prepare_qat_fx)']:.2f}x")
    if args.compile:
        qc, fc = med["qcompile torch.compile"], med["fp32 torch.compile"]
        print(f"  qcompile compiled / eager        {qc / q:.2f}x")
        print(f"  qcompile compiled / FP32 compiled {qc / fc:.2f}x;  compiled / FP32 eager {qc / med['fp32']:.2f}x")
        print(f"  first two steps (compilation): FP32 {warmup['fp32 torch.compile']:.0f} s, "
              f"qcompile {warmup['qcompile torch.compile']:.0f} s")
    print(f"resnet50 compile: qcompile {compile_q:.2f} s, prepare_qat_fx {compile_ao:.2f} s, "
          f"ratio {compile_q / compile_ao:.2f}x (goal <= 1x)")


if __name__ == "__main__":
    main()
