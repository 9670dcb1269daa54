"""models:vit_tiny (28×28 digits) measured side by side in one run: the W8A8G8 in-hindsight train step ÷
the FP32 step (batch 64, steps interleaved round by round, median), and the generated C runtime's
single-sample latency ÷ onnxruntime's on qcompile's QOperator export (1 thread, best of interleaved
rounds of medians; the C output checked byte for byte against the integer reference first).

    .venv/bin/python benchmarks/vit_tiny.py [--rounds 5] [--repeats 50] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import qcompile
from qcompile.backends import reference
from qcompile.backends.c.build import bench, build, run
from qcompile.backends.c.codegen import emit
from qcompile.backends.onnx import onnxruntime_session
from qcompile.models import get
from qcompile.tools.machine import cpu
from step_overhead import step_fn, timed     # the same step and timer as the CNN step benchmark

W8A8G8 = dict(weight_bits=8, act_bits=8, grad_bits=8, act_range="hindsight", grad_range="hindsight", seed=0)


def ort_latency(path, x: np.ndarray, repeats: int) -> float:
    sess = onnxruntime_session(path, threads=1)
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)
    return statistics.median(timed(lambda: sess.run(None, feed)) for _ in range(repeats))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the train steps")
    args = ap.parse_args(argv)
    print(f"CPU: {cpu()}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    fp32 = get("models:vit_tiny")
    qm = qcompile.compile(fp32, (x[:2],), qcompile.QConfig(**W8A8G8))
    qm.calibrate([x])
    adamw = dict(optimizer=torch.optim.AdamW, lr=1e-3)
    steps = {"FP32": step_fn(fp32.train(), x, y, **adamw), "W8A8G8 in-hindsight": step_fn(qm.train(), x, y, **adamw)}
    for step in steps.values():
        step(), step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds * 2):
        for name, step in steps.items():
            times[name].append(timed(step))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"train step, batch 64, {args.threads} threads: FP32 {1e3 * med['FP32']:.1f} ms, W8A8G8 "
          f"{1e3 * med['W8A8G8 in-hindsight']:.1f} ms: {med['W8A8G8 in-hindsight'] / med['FP32']:.2f}× FP32")

    torch.set_num_threads(1)
    graph = qcompile.lower(qm.eval())
    with tempfile.TemporaryDirectory() as tmp:
        module = emit(graph, Path(tmp) / "c", name="vit_tiny")
        exe = build(Path(tmp) / "c", opt="-O3 -march=native")
        codes = reference.quantize_input(graph, x[:4])
        (got,) = run(Path(tmp) / "c", codes, exe=exe)
        exact = bool(np.array_equal(got, reference.run_codes(graph, codes)))
        onnx_path = Path(tmp) / "vit_tiny.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qcompile.export_onnx(graph, onnx_path, "qop")
        c_s = ort_s = float("inf")
        for _ in range(args.rounds):
            c_s = min(c_s, bench(Path(tmp) / "c", codes, repeats=args.repeats, exe=exe))
            ort_s = min(ort_s, ort_latency(onnx_path, x[:1].numpy(), args.repeats))
    print(f"inference, 1 sample, 1 thread: C (gcc -O3 -march=native) {1e3 * c_s:.3f} ms (bit-exact with the "
          f"reference: {exact}; {module.macs / 1e6:.1f} M MACs, arena {module.arena_bytes / 1024:.0f} KiB), "
          f"onnxruntime (QOperator export) {1e3 * ort_s:.3f} ms: C ÷ onnxruntime {c_s / ort_s:.2f}×")


if __name__ == "__main__":
    main()
