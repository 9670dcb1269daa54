"""`models:gpt_tiny` on the standard library's source bytes: FP32 vs fully quantized training (W8A8G8
in hindsight), and the same with a 16-bit tile-64 accumulator + log barrier; held-out bits per byte.

    python -m qcompile.tools.experiments.gpt_tiny [--steps N] [--seed S]

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

import qcompile
from qcompile.models import get
from qcompile.tools.data import python_source_bytes
from qcompile.tools.experiments.narrow_acc_sweep import W8A8_BARRIER
from qcompile.train.tiled import NarrowAccOp

CONTEXT, BATCH, LR, STEPS = 64, 32, 3e-3, 600
W8A8G8 = {"weight_bits": 8, "act_bits": 8, "grad_bits": 8, "act_range": "hindsight", "grad_range": "hindsight"}
NARROW = {**W8A8G8, "acc_bits": 16, "tile": 64, "grad_acc_bits": 32, "log_barrier": True, **W8A8_BARRIER}
RUNS = {"FP32": None, "W8A8G8 in-hindsight": W8A8G8, "W8A8G8 + acc16/tile 64 + barrier": NARROW}


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
        print(f"{name:<34} held-out {row['bits_per_byte']:.3f} bits/byte  {1e3 * step:.0f} ms/step"
              + (f"  overflowed {100 * row['overflow_rate']:.3f} %" if row["overflow_rate"] is not None else ""),
              flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    text = python_source_bytes()
    print(f"corpus: {text.files} standard-library modules, {len(text.train)} training / {len(text.held_out)} "
          f"held-out bytes; gpt_tiny context {CONTEXT}, batch {BATCH}, AdamW lr {LR} cosine, {args.steps} steps")
    rows = run(args.steps, args.seed)
    fp32 = rows[0]["bits_per_byte"]
    for row in rows[1:]:
        print(f"{row['run']}: {100 * (row['bits_per_byte'] / fp32 - 1):+.1f} % vs FP32")


if __name__ == "__main__":
    main()
