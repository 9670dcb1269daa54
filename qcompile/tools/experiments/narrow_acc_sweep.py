"""Narrow-accumulator sweep on MNIST-5k (LeNet-5, or ResNet-20): acc_bits × tile × log barrier on/off.

Every run starts from the same float initialization, calibrates on 1,024 training digits and
trains with the same batches; overflow is measured on the 1,000 held-out digits after
training (eval mode, statistics reset first). The reference row is the same integer op with
an exact accumulator (acc_bits=None). The backward matmuls accumulate in 32 bits
(grad_acc_bits=32) in every run, so the table isolates the forward accumulator, the one the
barrier acts on.

    OMP_NUM_THREADS=1 python -m qcompile.tools.experiments.narrow_acc_sweep [--epochs 5] [--bits 8] [--seed 0]
        [--model lenet5|resnet20] [--barrier-weight λa] [--bound-weight λb] [--t0 t0]
        [--acc-grad ste|zero_saturated]

With --overflow-free: the overflow-free table instead (tile 64, seeds 0..--seeds−1, 16/14/12 bits):
the barrier alone, conv1's weights overflow-free (`overflow_free_weights`) + the barrier, every
layer's + the barrier, each against the same seed's exact-accumulator run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

import qcompile
from qcompile.config import ACC_GRAD_MODES
from qcompile.models import get
from qcompile.tools.data import mnist_5k
from qcompile.tools.training import accuracy, train_classifier
from qcompile.train.tiled import NarrowAccOp

BATCH, LR = 64, 0.05
MODELS = {"lenet5": {}, "resnet20": {"in_channels": 1}}     # models: name → arguments for 1×28×28 digits
ACC_BITS, TILES = (12, 14, 16), (16, 64)
# with 8-bit operands one product already reaches 2^15: a gentle barrier (large t0: weak inside, steep past it;
# the bound term in a narrow window, see docs/narrow_accumulators.md),
# and no task-loss gradient through saturated outputs, so only the barrier acts on them
W8A8_BARRIER = {"barrier_weight": 0.005, "barrier_bound_weight": 3e-4, "barrier_t0": 50.0,
                "acc_grad": "zero_saturated"}
BARRIERS = {8: W8A8_BARRIER, 6: {}}     # the barrier of each width's sweep (W6A6: the QConfig defaults)
OVERFLOW_FREE = {"barrier only": None, "conv1 overflow-free": "conv1", "all overflow-free": "*"}
GOAL_RATE, GOAL_GAP = 0.001, 1.0        # at most 0.1 % of outputs overflowed, within 1 point of exact


def overflow_on(qm, x) -> dict:
    """Eval-mode overflow over `x`: events, overflowed outputs and their fraction, all layers."""
    ops = [m for m in qm.modules() if isinstance(m, NarrowAccOp)]
    for op in ops:
        op.reset_overflow_stats()
    was_training = qm.training
    qm.eval()
    with torch.no_grad():
        for i in range(0, len(x), 500):
            qm(x[i:i + 500])
    qm.train(was_training)
    stats = [op.overflow_stats()["eval"] for op in ops]
    events = sum(s["events"] for s in stats)
    overflowed, outputs = sum(s["overflowed"] for s in stats), sum(s["outputs"] for s in stats)
    return {"events": events, "overflowed": overflowed, "rate": overflowed / outputs if outputs else 0.0}


def run_config(bits: int, seed: int, barrier: dict | None = None, **extra) -> qcompile.QConfig:
    """A sweep run's configuration: W{bits}A{bits}, 8-bit gradients, 32-bit backward accumulators."""
    return qcompile.QConfig(weight_bits=bits, act_bits=bits, grad_bits=8, grad_acc_bits=32, seed=seed,
                            **(barrier or {}), **extra)


def initial_state(model: str, seed: int) -> dict:
    """The float initialization every run of a sweep starts from (drawn after seeding with `seed`)."""
    torch.manual_seed(seed)
    return copy.deepcopy(get(f"models:{model}", **MODELS[model]).state_dict())


def train_run(data, init_state, config: qcompile.QConfig, epochs: int, seed: int = 0, desc: str = "",
              model: str = "lenet5"):
    """Compile `model` from `init_state` with `config`, calibrate, train; (qm, accuracy %, overflow dict, s)."""
    net = get(f"models:{model}", **MODELS[model])
    net.load_state_dict(init_state)
    torch.manual_seed(seed)
    qm = qcompile.compile(net, (data.x_train[:2],), config)
    qm.calibrate(data.x_train[i:i + 256] for i in range(0, 1024, 256))
    t0 = time.perf_counter()
    train_classifier(qm, data.x_train, data.y_train, epochs=epochs, batch_size=BATCH, lr=LR, seed=seed, desc=desc)
    seconds = time.perf_counter() - t0
    return qm, accuracy(qm, data.x_test, data.y_test), overflow_on(qm, data.x_test), seconds


def sweep(epochs: int = 5, bits: int = 8, seed: int = 0, barrier: dict | None = None,
          model: str = "lenet5") -> list[dict]:
    data = mnist_5k(seed)
    init = initial_state(model, seed)
    rows = []
    runs = [(None, None, False)] + [(a, t, b) for a in ACC_BITS for t in TILES for b in (False, True)]
    for acc_bits, tile, on in runs:
        cfg = run_config(bits, seed, barrier, acc_bits=acc_bits, tile=tile, log_barrier=on)
        _, acc, ovf, seconds = train_run(data, init, cfg, epochs, seed, model=model)
        row = {"acc_bits": acc_bits, "tile": tile, "barrier": on, "accuracy": acc, **ovf, "seconds": seconds}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def overflow_free_table(bits: int = 8, seeds: int = 5, epochs: int = 5, acc_bits=ACC_BITS[::-1]) -> list[dict]:
    """One row per (acc_bits, variant of OVERFLOW_FREE) at tile 64, over `seeds` seeds: each run's accuracy,
    its gap to the same seed's exact-accumulator run and its overflowed-output rate; printed as it goes."""
    barrier = BARRIERS[bits]
    exact = {}
    for seed in range(seeds):
        exact[seed] = train_run(mnist_5k(seed), initial_state("lenet5", seed), run_config(bits, seed, barrier),
                                epochs, seed)[1]
    print(f"exact accumulator: {', '.join(f'{a:.2f}' for a in exact.values())}", flush=True)
    print(format_overflow_free_header())
    rows = []
    for acc in acc_bits:
        for variant, layers in OVERFLOW_FREE.items():
            runs = []
            for seed in range(seeds):
                cfg = run_config(bits, seed, barrier, acc_bits=acc, tile=64, log_barrier=True,
                                 overrides={layers: {"overflow_free_weights": True}} if layers else {})
                _, a, ovf, _ = train_run(mnist_5k(seed), initial_state("lenet5", seed), cfg, epochs, seed)
                runs.append({"seed": seed, "accuracy": a, "gap": a - exact[seed], "rate": ovf["rate"]})
            rows.append({"bits": bits, "acc_bits": acc, "variant": variant, "runs": runs})
            print(format_overflow_free_row(rows[-1]), flush=True)
    return rows


def format_overflow_free_header() -> str:
    return ("| W/A | acc_bits | weights | held-out acc (%), mean ± std | gap to exact, worst seed | "
            "overflowed outputs (%), worst seed | every seed ≤ 0.1 % and within 1 point |\n"
            "|---|---:|---|---:|---:|---:|:---:|")


def format_overflow_free_row(r: dict) -> str:
    acc = torch.tensor([run["accuracy"] for run in r["runs"]])
    gap = min(run["gap"] for run in r["runs"])
    rate = max(run["rate"] for run in r["runs"])
    ok = all(run["rate"] <= GOAL_RATE and run["gap"] >= -GOAL_GAP for run in r["runs"])
    spread = float(acc.std()) if len(acc) > 1 else 0.0
    return (f"| W{r['bits']}A{r['bits']} | {r['acc_bits']} | {r['variant']} | {float(acc.mean()):.2f} ± {spread:.2f} | "
            f"{gap:+.2f} | {100 * rate:.3f} | {'yes' if ok else 'no'} |")


def format_header() -> str:
    return ("| acc_bits | tile | barrier | held-out acc (%) | overflow events | overflowed outputs (%) | "
            "train s |\n|---:|---:|:---:|---:|---:|---:|---:|")


def format_row(r: dict) -> str:
    acc_bits = "exact" if r["acc_bits"] is None else r["acc_bits"]
    tile = "—" if r["tile"] is None else r["tile"]
    return (f"| {acc_bits} | {tile} | {'on' if r['barrier'] else 'off'} | {r['accuracy']:.2f} | {r['events']} | "
            f"{100 * r['rate']:.3f} | {r['seconds']:.0f} |")


def demo_run(data, epochs: int = 5, seed: int = 0) -> dict:
    """The `make demo` run: LeNet-5 W8A8G8 with a 16-bit accumulator (tile 64, saturating; 32-bit
    backward) and the log barrier (W8A8_BARRIER), then the same with every layer's weights
    overflow-free, next to the same run with an exact accumulator (the sweep's and the overflow-free
    table's seed-`seed` rows); prints the overflow rates and the accuracies."""
    init = initial_state("lenet5", seed)
    _, exact_acc, _, _ = train_run(data, init, run_config(8, seed, W8A8_BARRIER), epochs, seed)
    cfg = run_config(8, seed, W8A8_BARRIER, acc_bits=16, tile=64, log_barrier=True)
    qm, acc, ovf, seconds = train_run(data, init, cfg, epochs, seed)
    print(f"16-bit accumulator (tile 64, saturate, zero_saturated gradient) + log barrier, {epochs} epochs: "
          f"held-out accuracy {acc:.2f}% (exact accumulator, same run: {exact_acc:.2f}%), overflowed outputs "
          f"{100 * ovf['rate']:.3f}% ({ovf['events']} events on 1,000 digits), {seconds:.0f} s")
    free_cfg = dataclasses.replace(cfg, overflow_free_weights=True)
    _, free_acc, free, seconds = train_run(data, init, free_cfg, epochs, seed)
    print(f"  + overflow-free weights (every layer): held-out accuracy {free_acc:.2f}%, overflowed outputs "
          f"{100 * free['rate']:.3f}% ({free['events']} events), {seconds:.0f} s")
    return {"accuracy": acc, "exact_accuracy": exact_acc, **ovf, "qm": qm,
            "overflow_free": {"accuracy": free_acc, **free}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--bits", type=int, default=8, help="weight and activation bits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="lenet5", choices=sorted(MODELS))
    ap.add_argument("--barrier-weight", type=float, default=None, help="QConfig.barrier_weight")
    ap.add_argument("--bound-weight", type=float, default=None, help="QConfig.barrier_bound_weight")
    ap.add_argument("--t0", type=float, default=None, help="QConfig.barrier_t0")
    ap.add_argument("--acc-grad", default=None, choices=ACC_GRAD_MODES, help="QConfig.acc_grad (every run)")
    ap.add_argument("--overflow-free", action="store_true", help="the overflow-free table (LeNet-5, tile 64)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the overflow-free table")
    args = ap.parse_args(argv)
    if args.overflow_free:
        torch.set_num_threads(1)
        print(f"lenet5 on MNIST-5k, W{args.bits}A{args.bits}G8, {args.epochs} epochs, tile 64, seeds 0..{args.seeds - 1}, "
              f"barrier {BARRIERS[args.bits] or 'QConfig defaults'}; overflow on the 1,000 held-out digits")
        overflow_free_table(args.bits, args.seeds, args.epochs)
        return
    barrier = {k: v for k, v in (("barrier_weight", args.barrier_weight), ("barrier_bound_weight", args.bound_weight),
                                 ("barrier_t0", args.t0), ("acc_grad", args.acc_grad)) if v is not None}
    torch.set_num_threads(1)
    print(f"{args.model} on MNIST-5k, seed {args.seed}, W{args.bits}A{args.bits}G8, {args.epochs} epochs, batch {BATCH}, "
          f"lr {LR}, "
          f"barrier {barrier or 'defaults'}; overflow measured on the 1,000 held-out digits")
    print(format_header())
    sweep(args.epochs, args.bits, args.seed, barrier, args.model)


if __name__ == "__main__":
    main()
