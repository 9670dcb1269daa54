"""onnxruntime latency (1 thread, batch 1) of qcompile's QDQ export of resnet18 ÷ that of
onnxruntime's own `quantize_static` QDQ model of the same float network. Goal: ≤ 1.05×.

Both models come from one randomly initialised torchvision resnet18 (eval mode) and are
calibrated on the same random batches: qcompile via `qm.calibrate`, onnxruntime via a
CalibrationDataReader (per-channel int8 weights, uint8 activations, QDQ, MinMax).

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_latency.py [--size 224] [--runs 30]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import qcompile
from qcompile.models import get
from qcompile.backends.onnx import onnxruntime_session
from qcompile.tools.machine import cpu


def latencies_ms(paths: list, x: np.ndarray, runs: int) -> list[float]:
    """Median wall time of one batch-1 run per model, 1 intra-op thread, after warm-up; the models
    run interleaved (A, B, C, A, B, C...) so background load affects them alike."""
    sessions = [onnxruntime_session(p, threads=1) for p in paths]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(5):
            s.run(None, f)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[k].append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def ort_quantize_static(model: torch.nn.Module, batches: list, size: int, out: Path) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, pre_path = out / "fp32.onnx", out / "fp32_pre.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(float_path), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False)
    quant_pre_process(str(float_path), str(pre_path))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b[i:i + 1].numpy()} for b in batches for i in range(len(b))])

        def get_next(self):
            return next(self.it, None)

    path = out / "ort_qdq.onnx"
    quantize_static(str(pre_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    print(f"CPU: {cpu()}", flush=True)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = get("torchvision:resnet18").eval()
    batches = [torch.randn(2, 3, args.size, args.size) for _ in range(4)]
    out = Path(tempfile.mkdtemp(prefix="qcompile-latency-"))

    qm = qcompile.compile(model, (batches[0][:1],))
    qm.calibrate(batches)
    qm.eval()
    ours = {wd: out / f"resnet18_qcompile_qdq_{wd}.onnx" for wd in ("int8", "uint8")}
    for wd, path in ours.items():
        qcompile.export_onnx(qm, path, "qdq", weight_dtype=wd)
    theirs = ort_quantize_static(model, batches, args.size, out)

    x = torch.randn(1, 3, args.size, args.size).numpy()
    t_theirs, t_int8 = latencies_ms([theirs, ours["int8"]], x, args.runs)
    t_uint8, = latencies_ms([ours["uint8"]], x, args.runs)
    print(f"resnet18 {args.size}x{args.size}, batch 1, onnxruntime 1 thread, median of {args.runs} runs")
    print(f"  onnxruntime quantize_static (QDQ, U8S8)     {t_theirs:8.2f} ms")
    for wd, t in (("int8", t_int8), ("uint8", t_uint8)):
        kernel = "U8S8" if wd == "int8" else "U8U8"
        print(f"  qcompile export_onnx QDQ ({kernel} weights)   {t:8.2f} ms   ratio {t / t_theirs:.3f}x")


if __name__ == "__main__":
    main()
