"""Single-thread latency and GMAC/s of the generated C runtime vs onnxruntime, resnet18 and mobilenet_v2.

Each torchvision model (1000 classes, random weights; mobilenet_v2's depthwise and 1×1 convs beside
resnet18's 3×3 ones) is compiled with qcompile (W8A8),
calibrated on random inputs, put in eval mode and lowered once per accumulator setting:
  exact           acc_bits=None (the static bound fits int32: 32-bit lanes, VNNI dot products)
  acc16 wrap      acc_bits=16, tile=64, wrap      (modular: 16-bit lanes)
  acc16 saturate  acc_bits=16, tile=64, saturate  (exact partial per tile, clamp after each)
  acc16 pairwise  acc_bits=16, pairwise           (AVX2's vpmaddubsw + vpaddsw: pairs saturated, then added
                                                   with saturation; the blocked-GEMM kernel where the input's
                                                   zero point is its lowest code, tile_loop elsewhere)
  acc32 saturate  acc_bits=32, tile=64, saturate  (provably never overflows: compiled as exact)
Each is emitted as C, built with gcc -O3 -march=native and timed by its own harness
(`--bench`: one sample, one thread, median of REPEATS runs after one warm-up run). onnxruntime
runs qcompile's own QOperator export of the exact model, and its own `quantize_static` QDQ
U8S8 model of the float network (onnx_latency.ort_quantize_static: its fastest int8 path),
1 intra-op thread, same input, median of REPEATS runs. C variants and onnxruntime are timed in interleaved rounds (the
machine is shared: each contender meets the same load) and the best round counts.
GMAC/s = the graph's multiply-accumulates / latency. Before timing, each C output is checked
byte for byte against the integer reference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/c_runtime.py [--models resnet18,mobilenet_v2] [--sizes 64,224]
        [--repeats 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import qcompile
from qcompile.models import get
from qcompile.backends.onnx import onnxruntime_session
from qcompile.backends import reference
from qcompile.backends.c.build import bench, build, run
from qcompile.backends.c.codegen import emit
from qcompile.tools.machine import cpu
from onnx_latency import ort_quantize_static

VARIANTS = {
    "exact": {},
    "acc16 wrap": dict(acc_bits=16, tile=64, overflow="wrap"),
    "acc16 saturate": dict(acc_bits=16, tile=64, overflow="saturate"),
    "acc16 pairwise": dict(acc_bits=16, overflow="pairwise"),
    "acc32 saturate": dict(acc_bits=32, tile=64, overflow="saturate"),
}


def lowered(model: str, size: int, **acc):
    torch.manual_seed(0)
    x = torch.randn(4, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qcompile.compile(get(f"torchvision:{model}").eval(), (x[:1],), act_range="running", **acc)
    qm.calibrate([x[:2], x[2:]])
    return qm.eval(), x


def ort_latency(path, x: np.ndarray, repeats: int) -> float:
    sess = onnxruntime_session(path, threads=1)
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round's median counts")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--opt", default="-O3 -march=native")
    args = ap.parse_args()
    print(f"CPU: {cpu()}", flush=True)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, size in ((m, int(s)) for m in args.models.split(",") for s in args.sizes.split(",")):
            prepared = []
            for label in args.variants.split(","):
                qm, x = lowered(model, size, **VARIANTS[label])
                graph = qcompile.lower(qm)
                out = Path(tmp) / f"{model}_{size}_{label.replace(' ', '_')}"
                module = emit(graph, out, name=model)
                t0 = time.perf_counter()
                exe = build(out, opt=args.opt)
                build_s = time.perf_counter() - t0
                codes = reference.quantize_input(graph, x[:1])
                (got,) = run(out, codes, exe=exe)
                exact = bool(np.array_equal(got, reference.run_codes(graph, codes)))
                prepared.append((label, module, out, exe, codes))
                rows.append(dict(model=model, size=size, variant=label, bit_exact=exact, arena=module.arena_bytes,
                                 naive=module.naive_bytes, weights=module.weight_bytes, build_s=build_s,
                                 macs=module.macs, c_s=float("inf")))
                if label == "exact":
                    onnx_path = Path(tmp) / f"{model}_{size}.onnx"
                    static_dir = Path(tmp) / f"{model}_{size}_static"
                    static_dir.mkdir()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        qcompile.export_onnx(graph, onnx_path, "qop")
                        static_path = ort_quantize_static(get(f"torchvision:{model}").eval(), [x[:2], x[2:]], size,
                                                          static_dir)
                    ort_x = x[:1].numpy()
            size_rows = rows[-len(prepared):]
            ort_s = static_s = float("inf")
            for _ in range(args.rounds):       # interleaved, so every contender meets the same machine load
                for (label, module, out, exe, codes), row in zip(prepared, size_rows):
                    row["c_s"] = min(row["c_s"], bench(out, codes, repeats=args.repeats, exe=exe))
                ort_s = min(ort_s, ort_latency(onnx_path, ort_x, args.repeats))
                static_s = min(static_s, ort_latency(static_path, ort_x, args.repeats))
            for row in size_rows:
                row.update(c_ms=1e3 * row["c_s"], c_gmacs=row["macs"] / row["c_s"] / 1e9, ort_ms=1e3 * ort_s,
                           ort_gmacs=row["macs"] / ort_s / 1e9, static_ms=1e3 * static_s)
                print(f"  {model} {size}x{size} {row['variant']:<15} C {row['c_ms']:8.2f} ms {row['c_gmacs']:6.1f} GMAC/s "
                      f"(bit-exact {row['bit_exact']}, gcc {row['build_s']:.0f} s); onnxruntime {row['ort_ms']:.2f} ms "
                      f"{row['ort_gmacs']:.1f} GMAC/s, quantize_static {row['static_ms']:.2f} ms", file=sys.stderr, flush=True)
    print(f"\n1 thread, gcc {args.opt}; onnxruntime on qcompile's QOperator export (ORT) and on its own quantize_static "
          f"QDQ U8S8 model of the float network (static); best of {args.rounds} interleaved rounds of {args.repeats}-run "
          "medians\n")
    print("| model | input | accumulator | C ms | C GMAC/s | ORT ms | ORT GMAC/s | C ÷ ORT time | static ms | C ÷ static "
          "| bit-exact | arena KiB (naive) | weights MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']}×{r['size']} | {r['variant']} | {r['c_ms']:.2f} | {r['c_gmacs']:.1f} | {r['ort_ms']:.2f} | "
              f"{r['ort_gmacs']:.1f} | {r['c_ms'] / r['ort_ms']:.2f}× | {r['static_ms']:.2f} | {r['c_ms'] / r['static_ms']:.2f}× | "
              f"{r['bit_exact']} | {r['arena'] / 1024:.0f} ({r['naive'] / 1024:.0f}) | {r['weights'] / 2 ** 20:.1f} |")


if __name__ == "__main__":
    main()
