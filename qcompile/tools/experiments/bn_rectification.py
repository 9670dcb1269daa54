"""BN rectification under low-bit gradients: grad_bits ∈ {8, 4, 2} × rectification off/on.

A BatchNorm model (default LeNet-5 with BN after conv1, conv2, fc1) is compiled with BN
folded (W8A8, in-hindsight ranges for activations and gradients, stochastic gradient
rounding) and trained on MNIST-5k; an FP32 run from the same initialization is the
reference. Every `--probe-every` steps, on a fixed probe batch and without changing the
training state, the script measures the first layer's weight-gradient error (quantized
minus float gradients, same forward pass) and the noise gain of every fused block. It
writes the results table into docs/bn_rectification.md (between the markers of the model),
the curves to docs/bn_rectification_<model>.csv and the plot to docs/bn_rectification_<model>.png.

    python -m qcompile.tools.experiments.bn_rectification                 # LeNet-5-BN, 3 seeds
    python -m qcompile.tools.experiments.bn_rectification --model resnet20 --epochs 1 --seeds 0 --probe-every 20
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import re
import time
from pathlib import Path

import torch

import qcompile
from qcompile.models import get
from qcompile.tools.data import mnist_5k
from qcompile.tools.training import accuracy, train_classifier
from qcompile.train.bn_rectification import noise_amplification, weight_gradient_error

DOCS = Path(__file__).resolve().parents[2] / "docs"


def markers(model: str) -> tuple[str, str]:
    return f"<!-- results:{model}:begin -->", f"<!-- results:{model}:end -->"


def run_one(model, data, grad_bits, lam, args, probe, seed):
    """Train one arm from `model`'s weights; returns (held-out accuracy, curves, TrainLog)."""
    curves = {"step": [], "conv1_rel_err": [], "gain": [], "signal": []}
    if grad_bits is None:
        net = copy.deepcopy(model)
        log = train_classifier(net, data.x_train, data.y_train, epochs=args.epochs, batch_size=args.batch,
                               lr=args.lr, seed=seed)
        return accuracy(net, data.x_test, data.y_test), curves, log
    config = qcompile.QConfig(weight_bits=8, act_bits=8, grad_bits=grad_bits, act_range="hindsight",
                              grad_range="hindsight", seed=seed, bn_rectification=lam)
    qm = qcompile.compile(model, (data.x_train[:2],), config)
    qm.calibrate(data.x_train[i:i + 256] for i in range(0, 1024, 256))
    px, py = probe

    def on_step(m, log):
        if log.steps % args.probe_every == 1 or args.probe_every == 1:
            curves["step"].append(log.steps)
            curves["conv1_rel_err"].append(weight_gradient_error(m, px, py, args.first_layer)["rel"])
            gains = noise_amplification(m, px, py)
            curves["gain"].append({k: v["measured"] for k, v in gains.items()})
            curves["signal"].append({k: v["signal"] for k, v in gains.items()})

    log = train_classifier(qm, data.x_train, data.y_train, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                           seed=seed, on_step=on_step)
    return accuracy(qm, data.x_test, data.y_test), curves, log


def _finite_mean(xs):
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _arms(rows):
    """Rows grouped by (grad_bits, λ), in run order."""
    arms: dict = {}
    for r in rows:
        arms.setdefault((r["grad_bits"], r["lam"]), []).append(r)
    return arms


def write_table(rows, args) -> str:
    blocks = sorted({b for r in rows for g in r["curves"]["gain"] for b in g})
    shown = blocks if len(blocks) <= 4 else []
    head = (f"| grad bits | λ | held-out acc. % (mean; per seed) | final train loss | {args.first_layer} grad rel. error "
            "(first / mean / last probe) | noise gain ‖Jᵀe‖/‖e‖ | noise gain / float-gradient gain | "
            + "".join(f"noise gain {b} | " for b in shown))
    lines = [head.rstrip(), "|" + "---|" * (7 + len(shown))]
    for (bits, lam), rs in _arms(rows).items():
        accs = [r["acc"] for r in rs]
        errs = [r["curves"]["conv1_rel_err"] for r in rs if r["curves"]["conv1_rel_err"]]
        err_text = (f"{_finite_mean([e[0] for e in errs]):.3f} / {_finite_mean([x for e in errs for x in e]):.3f} / "
                    f"{_finite_mean([e[-1] for e in errs]):.3f}") if errs else "—"
        gains = [g for r in rs for g in r["curves"]["gain"]]
        all_gain = f"{_finite_mean([v for g in gains for v in g.values()]):.3f}" if gains else "—"
        ratios = [g[b] / sig[b] for r in rs for g, sig in zip(r["curves"]["gain"], r["curves"]["signal"]) for b in g]
        ratio = f"{_finite_mean(ratios):.3f}" if ratios else "—"
        per_block = [f"{_finite_mean([g[b] for g in gains if b in g]):.3f}" if gains else "—" for b in shown]
        lines.append(f"| {'FP32' if bits is None else bits} | {'—' if bits is None else f'{lam:g}'} | "
                     f"{sum(accs) / len(accs):.2f}; {', '.join(f'{a:.1f}' for a in accs)} | "
                     f"{_finite_mean([r['final_loss'] for r in rs]):.3f} | {err_text} | {all_gain} | {ratio} | "
                     + "".join(f"{g} | " for g in per_block))
        lines[-1] = lines[-1].rstrip()
    cmd = "python -m qcompile.tools.experiments.bn_rectification" + ("" if args.is_default else " " + " ".join(args.argv))
    meta = (f"Model `models:{args.model}`, MNIST-5k (4,000 train / 1,000 held-out), {args.epochs} epoch(s), batch "
            f"{args.batch}, SGD lr {args.lr} (momentum 0.9, cosine), seeds {', '.join(map(str, args.seeds))}; "
            f"W8A8, in-hindsight ranges, stochastic gradient rounding; probes every {args.probe_every} steps on a "
            f"fixed batch of {args.probe_size} training digits. {args.seconds / 60:.1f} min at "
            f"{torch.get_num_threads()} thread(s). Regenerate with `{cmd}`.")
    return meta + "\n\n" + "\n".join(lines)


def plot(rows, path: Path) -> None:
    """Curves of the first seed of every arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {8: "tab:blue", 4: "tab:orange", 2: "tab:red"}
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    first = [rs[0] for rs in _arms(rows).values()]
    for r in first:
        if r["grad_bits"] is None:
            continue
        c = r["curves"]
        style = "-" if r["lam"] == 0 else "--"
        label = f"G{r['grad_bits']} λ={r['lam']:g}"
        axes[0].plot(c["step"], c["conv1_rel_err"], style, color=colors[r["grad_bits"]], label=label)
        mean_gain = [_finite_mean(list(g.values())) for g in c["gain"]]
        axes[1].plot(c["step"], mean_gain, style, color=colors[r["grad_bits"]], label=label)
        ratio = [_finite_mean([g[b] / sig[b] for b in g]) for g, sig in zip(c["gain"], c["signal"])]
        axes[2].plot(c["step"], ratio, style, color=colors[r["grad_bits"]], label=label)
        axes[3].plot(range(1, len(r["losses"]) + 1), _smooth(r["losses"]), style, color=colors[r["grad_bits"]],
                     label=label)
    fp = next((r for r in first if r["grad_bits"] is None), None)
    if fp is not None:
        axes[3].plot(range(1, len(fp["losses"]) + 1), _smooth(fp["losses"]), color="black", label="FP32")
    axes[0].set(yscale="log", xlabel="step", ylabel="‖∇W₁(quant. grads) − ∇W₁(float)‖ / ‖∇W₁(float)‖",
                title="first-layer weight-gradient error")
    axes[1].set(xlabel="step", ylabel="measured noise gain ‖Jᵀe‖/‖e‖ (mean over blocks)",
                title="noise amplification of the folded BN blocks")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[2].set(xlabel="step", ylabel="‖Jᵀe‖/‖e‖ ÷ ‖Jᵀg‖/‖g‖ (mean over blocks)",
                title="noise gain relative to the float gradient's gain")
    axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[3].set(yscale="log", xlabel="step", ylabel="training loss (incl. regularizer), smoothed",
                title="training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(xs, k=20):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def write_curves(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["grad_bits", "lambda", "seed", "step", "conv1_rel_err", "block", "noise_gain", "signal_gain"])
        for r in rows:
            c = r["curves"]
            for step, err, gains, signal in zip(c["step"], c["conv1_rel_err"], c["gain"], c["signal"]):
                for block, gain in sorted(gains.items()):
                    w.writerow([r["grad_bits"], r["lam"], r["seed"], step, f"{err:.6g}", block, f"{gain:.6g}",
                                f"{signal[block]:.6g}"])


def update_doc(table: str, path: Path, model: str) -> None:
    BEGIN, END = markers(model)
    text = path.read_text() if path.exists() else "# BN rectification\n"
    if BEGIN not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    if END not in text:
        raise ValueError(f"{path}: missing the markers {BEGIN} / {END} the results table goes between")
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table}\n{END}", text, flags=re.S)
    path.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lenet5_bn", help="models:NAME (a BatchNorm model)")
    p.add_argument("--first-layer", default="conv1", help="module path of the first layer")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lam", type=float, default=0.1, help="rectification weight λ of the 'on' arms")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--probe-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=DOCS, help="directory of bn_rectification.md / .png / _curves.csv")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    args.is_default = not args.argv
    torch.set_num_threads(args.threads)
    data = mnist_5k(0)
    probe = (data.x_train[-args.probe_size:], data.y_train[-args.probe_size:])
    kwargs = {"in_channels": 1} if args.model.startswith("resnet") else {}
    t0 = time.perf_counter()
    rows = []
    arms = [(None, 0.0)] + [(b, lam) for b in args.bits for lam in (0.0, args.lam)]
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = get(f"models:{args.model}", **kwargs)
        for grad_bits, lam in arms:
            t = time.perf_counter()
            torch.manual_seed(seed)
            acc, curves, log = run_one(model, data, grad_bits, lam, args, probe, seed)
            final = _finite_mean(log.losses[-20:])
            rows.append({"grad_bits": grad_bits, "lam": lam, "seed": seed, "acc": acc, "curves": curves,
                         "losses": log.losses, "final_loss": final})
            err = curves["conv1_rel_err"]
            print(f"seed {seed} grad_bits={grad_bits} λ={lam:g}: held-out {acc:.2f}%, final loss {final:.3f}, "
                  f"conv1 grad rel. err mean {_finite_mean(err) if err else float('nan'):.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    args.seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    table = write_table(rows, args)
    print(table)
    update_doc(table, args.out / "bn_rectification.md", args.model)
    write_curves(rows, args.out / f"bn_rectification_{args.model}.csv")
    plot(rows, args.out / f"bn_rectification_{args.model}.png")


if __name__ == "__main__":
    main()
