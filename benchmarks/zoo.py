"""The torchvision classification zoo, end to end, compiled the way the README compiles it.

Every classifier in `torchvision.models.list_models(module=torchvision.models)` (num_classes=10,
random init, fresh from its constructor: train mode) runs in its own subprocess with a time limit:
  1. the smallest input among 32/64/96/224/299 the float model accepts in train and eval mode;
  2. `qcompile.compile` in train mode, W8A8G8 (ops left in float are counted);
  3. calibration and 3 SGD steps (a finite loss; auxiliary outputs each get a cross-entropy);
  4. `qm.eval()`, lowering, ONNX QDQ export run in onnxruntime: its outputs against qm.eval()'s and
     the integer reference's, in output steps;
  5. for models under --c-limit parameters, the generated C built with gcc: against the reference.
One JSON line per model, then a markdown table and a summary line.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo.py [--models GLOB] [--timeout 900] [--c-limit 30e6]
        [--size N] [--out build/zoo.jsonl] [--markdown docs/zoo.md]
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

SIZES = (32, 64, 96, 224, 299)
STAGES = ("input", "compile", "train", "lower", "onnx", "c")


def smallest_input(model, sizes=SIZES) -> int:
    """The smallest square RGB input the float model runs on in train mode (batch 2) and in eval."""
    import torch
    for size in sizes:
        x = torch.randn(2, 3, size, size)
        try:
            with torch.no_grad():
                model.train()
                model(x)
                model.eval()
                model(x)
            model.train()
            return size
        except Exception:
            continue
    model.train()
    raise ValueError(f"runs on none of the input sizes {sizes}")


def _loss(out, y):
    import torch.nn.functional as F
    outs = list(out) if isinstance(out, tuple) else [out]
    return sum(F.cross_entropy(o, y) for o in outs if o is not None)


def check_model(name: str, c_limit: float = 30e6, workdir: Path | None = None, per_op: bool = False,
                size: int | None = None) -> dict:
    """Run one zoo model through every stage; the row records how far it got, its figures, and the
    first line of the error that stopped it. `per_op`: also each op exported alone and fed the
    reference's input codes (`parity.onnx_per_op`: where a difference starts, not where it ends).
    `size`: this input size instead of the smallest one."""
    import torch
    import torchvision
    import qcompile
    from qcompile.backends import parity
    from qcompile.passes.quantize import FloatFallbackWarning

    row = {"model": name, "stage": "input"}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, num_classes=10)
        row["params"] = sum(p.numel() for p in model.parameters())
        size = size or smallest_input(model)
        row["input"] = size
        x = torch.randn(4, 3, size, size)
        row["stage"] = "compile"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FloatFallbackWarning)
            qm = qcompile.compile(model, x[:2], grad_bits=8, seed=0)
        del model                                   # compile traced a copy: the float model is not needed
        fallbacks = [str(w.message) for w in caught if issubclass(w.category, FloatFallbackWarning)]
        row["float_ops"] = int(fallbacks[0].split()[0]) if fallbacks else 0
        row["stage"] = "train"
        qm.calibrate([x])
        opt = torch.optim.SGD(qm.parameters(), lr=0.01)
        y = torch.arange(4) % 10
        for _ in range(3):
            loss = _loss(qm(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss {float(loss)}")
            opt.zero_grad()
            loss.backward()
            opt.step()
        row["loss"] = float(loss.detach())
        opt.zero_grad(set_to_none=True)             # the gradients and the optimizer are not needed to export
        del opt, loss
        row["stage"] = "lower"
        qm.eval()
        with torch.no_grad():
            out = qm(x)
        graph = qcompile.lower(qm)
        row["stage"] = "onnx"
        cmp = parity.compare(graph, x, backends=("reference", "onnx:qdq"), given={"torch": out})
        row["ort_vs_torch"] = cmp.max_lsb("torch", "onnx:qdq")
        row["ort_vs_ref"] = cmp.max_lsb("reference", "onnx:qdq")
        row["ref_vs_torch"] = cmp.max_lsb("torch", "reference")
        if per_op:
            row["ort_per_op"] = parity.onnx_per_op(graph, x[:2], "qdq")["local_max_lsb"]
        row["stage"] = "c"
        if row["params"] < c_limit:
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                c = parity.compare(graph, x[:2], backends=("reference", "c"), workdir=tmp)
            row["c_vs_ref"] = c.max_lsb("reference", "c")
        row["stage"] = "done"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        row["where"] = traceback.extract_tb(exc.__traceback__)[-1].name
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_all(names: list[str], timeout: float, c_limit: float, out: Path, size: int | None = None) -> list[dict]:
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--c-limit", str(c_limit)] + \
                (["--size", str(size)] if size else [])
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
                row = json.loads(line) if line.startswith("{") else \
                    {"model": name, "stage": "crash", "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
            except subprocess.TimeoutExpired:
                row = {"model": name, "stage": "timeout", "error": f"over {timeout:.0f} s",
                       "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(format_row(row), flush=True)
    return rows


def format_header() -> str:
    return ("| model | params (M) | input | float ops | train loss | ONNX vs qm.eval() | ONNX vs reference | "
            "C vs reference | s | stopped at |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def format_row(r: dict) -> str:
    def v(key, fmt="{}"):
        return fmt.format(r[key]) if key in r else "—"
    stop = "" if r.get("stage") == "done" else f"{r.get('stage')}: {r.get('error', '')}".replace("|", "/")
    params = f"{r['params'] / 1e6:.1f}" if "params" in r else "—"
    return (f"| {r['model']} | {params} | "
            f"{v('input')} | {v('float_ops')} | {v('loss', '{:.3f}')} | {v('ort_vs_torch')} | {v('ort_vs_ref')} | "
            f"{v('c_vs_ref')} | {v('seconds')} | {stop} |")


def summary(rows: list[dict], c_limit: float) -> str:
    done = [r for r in rows if r.get("stage") in ("c", "done") and "ort_vs_ref" in r]
    small = [r for r in rows if r.get("params", float("inf")) < c_limit]
    exact_c = [r for r in small if r.get("c_vs_ref") == 0]
    no_float = [r for r in rows if r.get("float_ops") == 0]
    return (f"{len(done)}/{len(rows)} through ONNX and onnxruntime (compiled in train mode); "
            f"{len(exact_c)}/{len(small)} under {c_limit / 1e6:.0f} M parameters bit-exact in C; "
            f"{len(no_float)}/{len(rows)} with no op left in float")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="*", help="glob over torchvision's classifier names")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    ap.add_argument("--c-limit", type=float, default=30e6, help="build C for models under this many parameters")
    ap.add_argument("--out", type=Path, default=Path("build/zoo.jsonl"))
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--size", type=int, default=None, help="this input size for every model, not the smallest")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # the worker: one model, one JSON line
    args = ap.parse_args(argv)
    if args.one:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(check_model(args.one, args.c_limit, size=args.size)))
        return
    import torchvision
    names = [n for n in torchvision.models.list_models(module=torchvision.models) if fnmatch.fnmatch(n, args.models)]
    from qcompile.tools.machine import cpu
    print(f"{len(names)} torchvision classifiers; CPU: {cpu()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(format_header())
    rows = run_all(names, args.timeout, args.c_limit, args.out, args.size)
    line = summary(rows, args.c_limit)
    print(line)
    if args.markdown:
        args.markdown.write_text(format_header() + "\n" + "\n".join(format_row(r) for r in rows) + f"\n\n{line}\n")


if __name__ == "__main__":
    main()
