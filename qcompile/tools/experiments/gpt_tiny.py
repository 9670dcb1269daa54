"""`models:gpt_tiny` on the standard library's source bytes: FP32 vs fully quantized training (W8A8G8
in hindsight), and the same with a 16-bit tile-64 accumulator + log barrier, alone and with the linear
layers' weights overflow-free; held-out bits per byte.

    python -m qcompile.tools.experiments.gpt_tiny [--steps N] [--seed S] [--runs NAME,...] [--deploy N]

Every run starts from the same float initialization and sees the same batches (AdamW, cosine
schedule). The held-out loss is the mean next-byte cross-entropy over every position of the held-out
windows, in bits (log2). The overflow rate is the share of held-out outputs of the narrow-accumulator
layers that overflowed, in eval.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.models import get
from qcompile.tools.data import python_source_bytes
from qcompile.tools.experiments.narrow_acc_sweep import W8A8_BARRIER
from qcompile.train.tiled import NarrowAccOp

CONTEXT, BATCH, LR, STEPS = 64, 32, 3e-3, 600
W8A8G8 = {"weight_bits": 8, "act_bits": 8, "grad_bits": 8, "act_range": "hindsight", "grad_range": "hindsight"}
NARROW = {**W8A8G8, "acc_bits": 16, "tile": 64, "grad_acc_bits": 32, "log_barrier": True, **W8A8_BARRIER}
# the linear layers' weights overflow-free (A2Q's bound, `overflow_free_weights`); the activation×activation
# matmuls (q·kᵀ, p·v) have no weights to bound: the barrier alone acts on them
NARROW_OF = {**NARROW, "overrides": {nn.Linear: {"overflow_free_weights": True}}}
RUNS = {"FP32": None, "W8A8G8 in-hindsight": W8A8G8, "W8A8G8 + acc16/tile 64 + barrier": NARROW,
        "W8A8G8 + acc16/tile 64, linears overflow-free + barrier": NARROW_OF}


def next_byte_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting bytes 1..T of each window from bytes 0..T−1."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def bits_per_byte(model, windows: torch.Tensor, batch: int = 64) -> float:
    was_training = model.training
    model.eval()
    total = sum(float(next_byte_loss(model, windows[i:i + batch])) * len(windows[i:i + batch])
                for i in range(0, len(windows), batch))
    model.train(was_training)
    return total / len(windows) / math.log(2)


def overflow_rate(qm, windows: torch.Tensor) -> float:
    ops = [m for m in qm.modules() if isinstance(m, NarrowAccOp)]
    for op in ops:
        op.reset_overflow_stats()
    bits_per_byte(qm, windows)
    stats = [op.overflow_stats()["eval"] for op in ops]
    outputs = sum(s["outputs"] for s in stats)
    return sum(s["overflowed"] for s in stats) / outputs if outputs else 0.0


def train(model, text, steps: int, seed: int) -> float:
    """AdamW + cosine over `steps` batches drawn by `seed`; returns seconds per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = next_byte_loss(model, text.batch(BATCH, CONTEXT, gen))
        if hasattr(model, "regularization"):
            loss = loss + model.regularization()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return (time.perf_counter() - start) / steps


def run(steps: int = STEPS, seed: int = 0, runs=tuple(RUNS)) -> list[dict]:
    text = python_source_bytes()
    held_out = text.held_out_windows(CONTEXT)
    torch.manual_seed(seed)
    init = copy.deepcopy(get("models:gpt_tiny", context=CONTEXT).state_dict())
    rows = []
    for name in runs:
        model = get("models:gpt_tiny", context=CONTEXT)
        model.load_state_dict(init)
        if RUNS[name] is not None:
            model = qcompile.compile(model, (text.train[:CONTEXT][None],), qcompile.QConfig(seed=seed, **RUNS[name]))
            model.calibrate(text.batch(BATCH, CONTEXT, torch.Generator().manual_seed(seed + 1))[:, :-1]
                            for _ in range(4))
        step = train(model, text, steps, seed)
        row = {"run": name, "bits_per_byte": bits_per_byte(model, held_out), "seconds_per_step": step,
               "overflow_rate": overflow_rate(model, held_out) if RUNS[name] and RUNS[name].get("acc_bits") else None,
               "model": model}
        rows.append(row)
        print(f"{name:<56} held-out {row['bits_per_byte']:.3f} bits/byte  {1e3 * step:.0f} ms/step"
              + (f"  overflowed {100 * row['overflow_rate']:.3f} %" if row["overflow_rate"] is not None else ""),
              flush=True)
    return rows


def deployment(qm, windows: torch.Tensor) -> dict:
    """Lower the trained `qm` and run `windows` (ids, T + 1 bytes each) through the integer reference,
    onnxruntime (QOperator and QDQ exports) and the generated C: each against the reference, and the
    reference against qm.eval(), as the share of logit codes that differ and of next-byte predictions
    (argmax per position) that differ."""
    from qcompile.backends import parity
    qm.eval()
    graph = qcompile.lower(qm)
    ids = windows[:, :-1]
    with torch.no_grad():
        trained = qm(ids)
    cmp = parity.compare(graph, ids.double(), given={"PyTorch": trained})
    argmax = {name: codes.argmax(-1) for name, codes in cmp.codes.items()}
    return {b: {"codes": cmp.mismatch("reference", b), "max_steps": cmp.max_lsb("reference", b),
                "predictions": float((argmax["reference"] != argmax[b]).mean())}
            for b in cmp.codes if b != "reference"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated names of RUNS")
    ap.add_argument("--deploy", type=int, default=0, metavar="N",
                    help="lower the W8A8G8 run and compare every backend on N held-out windows")
    args = ap.parse_args(argv)
    text = python_source_bytes()
    print(f"corpus: {text.files} standard-library modules, {len(text.train)} training / {len(text.held_out)} "
          f"held-out bytes; gpt_tiny context {CONTEXT}, batch {BATCH}, AdamW lr {LR} cosine, {args.steps} steps")
    rows = run(args.steps, args.seed, tuple(args.runs.split(",")))
    fp32 = next((r["bits_per_byte"] for r in rows if r["run"] == "FP32"), None)
    for row in rows:
        if fp32 is not None and row["run"] != "FP32":
            print(f"{row['run']}: {100 * (row['bits_per_byte'] / fp32 - 1):+.1f} % vs FP32")
    quantized = next((r["model"] for r in rows if r["run"] == "W8A8G8 in-hindsight"), None)
    if args.deploy and quantized is not None:
        for backend, d in deployment(quantized, text.held_out_windows(CONTEXT)[:args.deploy]).items():
            print(f"reference vs {backend}: {100 * d['codes']:.3f} % of logit codes differ (max {d['max_steps']} "
                  f"steps), {100 * d['predictions']:.3f} % of next-byte predictions")


if __name__ == "__main__":
    main()
