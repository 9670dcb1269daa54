"""The in-hindsight paper's range-estimator comparison (its Tables 1–3), rerun with `qcompile train`.

Every run is one `qcompile.trainer.run` (the same code as `qcompile train`): MNIST-5k, SGD with
momentum 0.9 and a cosine schedule, calibration on 4 training batches, 5 seeds per row. Tables:

- "1": forward in float, only activation gradients quantized (`quantize_weights=false`,
  `quantize_activations=false`, asymmetric, stochastic rounding); the gradient estimator varies;
- "2": only activations quantized (weights and backward float); the activation estimator varies;
- "3": W8A8G8, weights current min-max; the paper's (gradient, activation) pairs;
- "1-g4", "3-g4" (any "-gN"): the same at N-bit gradients, where estimators should separate.

Besides held-out accuracy, each run is probed after training on 4 training batches (train mode,
no update): the fraction of values each enabled quantizer clips (|x − Q(x)| beyond rounding) and
its SQNR 10·log10(Σx² / Σ(x − Q(x))²), pooled over the quantizers of the kind the table varies.
`--timing` measures each configuration's training step alone (DSGC's searches included), beside
FP32's: the runs themselves share the machine with whatever else runs, so their own ms/step
(kept in results.json) is not what the tables report.

`python -m qcompile.tools.experiments.range_estimators [--timing]` runs everything and writes
docs/range_estimators_tables.md and docs/range_estimators.png; `--report` rewrites them from the saved
results (build/range_estimators/results.json).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import qcompile
from qcompile.tools import trainer
from qcompile.tools.run_config import TrainConfig
from qcompile.train.quantizers import Quantizer

ESTIMATORS = ("current", "running", "dsgc", "hindsight")
LABELS = {"current": "Current min-max", "running": "Running min-max", "dsgc": "DSGC", "hindsight": "In-hindsight min-max"}
# The paper's ResNet-18 on Tiny ImageNet, 5 seeds (in-hindsight-range-estimation.txt, Tables 1–3).
PAPER = {
    "1": {"fp32": "58.97 ± 0.13", "current": "59.14 ± 0.23", "running": "59.25 ± 0.55", "dsgc": "59.35 ± 0.95",
          "hindsight": "59.46 ± 0.71"},
    "2": {"fp32": "58.97 ± 0.13", "current": "59.00 ± 0.31", "running": "59.28 ± 0.25", "dsgc": "59.09 ± 0.01",
          "hindsight": "59.30 ± 0.19"},
    "3": {"fp32": "58.97 ± 0.13", "current": "58.77 ± 0.73", "running": "59.20 ± 0.25", "dsgc": "59.07 ± 0.33",
          "hindsight": "58.99 ± 0.44"},
}
TITLES = {"1": "gradients only", "2": "activations only", "3": "W8A8G8 (fully quantized)"}


@dataclass(frozen=True)
class Row:
    table: str           # "1", "2", "3", "1-g4", ...
    estimator: str       # the varied estimator (table 3: the gradient's; activations as the paper pairs them)

    @property
    def base(self) -> str:
        return self.table.split("-")[0]

    @property
    def grad_bits(self) -> int:
        return int(self.table.split("-g")[1]) if "-g" in self.table else 8

    @property
    def probed_kind(self) -> str:
        return "activation" if self.base == "2" else "gradient"

    def qconfig(self) -> qcompile.QConfig:
        if self.base == "1":
            return qcompile.QConfig(quantize_weights=False, quantize_activations=False, grad_bits=self.grad_bits,
                                    grad_range=self.estimator)
        if self.base == "2":
            return qcompile.QConfig(quantize_weights=False, act_range=self.estimator)
        acts = "current" if self.estimator == "dsgc" else self.estimator   # DSGC's authors: activations current
        return qcompile.QConfig(grad_bits=self.grad_bits, grad_range=self.estimator, act_range=acts,
                                weight_range="current")


def _model_spec(model: str) -> str:
    return {"lenet5": "models:lenet5", "resnet20": "models:resnet20_mnist"}.get(model, model)


# ---- probes -----------------------------------------------------------------------------------------------
class Probe:
    """Clipped fraction and SQNR of every enabled quantizer of one kind, pooled, while attached. A quantizer
    call with a relu (pass fuse_relu) is measured against relu(x): the tensor the graph's relu and
    quantizer stand for (with the relu after, values the relu zeroes count neither as clipped nor as noise)."""

    def __init__(self, qm, kind: str):
        self.clipped = self.count = 0
        self.signal = self.noise = 0.0
        self.handles = []
        for _, q in qm.quantizers():
            if q.kind != kind or not q.enabled:
                continue
            if kind == "gradient":
                self.handles.append(q.register_full_backward_hook(
                    lambda m, grad_in, grad_out: self.add(m, grad_out[0], grad_in[0])))
            else:
                self.handles.append(q.register_forward_hook(
                    lambda m, inp, kw, out: self.add(m, torch.relu(inp[0]) if kw.get("relu") else inp[0], out),
                    with_kwargs=True))

    @torch.no_grad()
    def add(self, q: Quantizer, x: torch.Tensor, xq: torch.Tensor) -> None:
        if x is None or xq is None:
            return
        err = (x - xq).abs()
        step = q.scale.reshape(-1, *([1] * (x.dim() - 1))) if q.axis is not None else q.scale
        # inside the grid the error is below half a step (nearest) or one step (stochastic rounding); 2 % slack
        # for float32 rounding of large codes (a value clipped by less than that counts as inside)
        bound = step * (1.0 if q.stochastic else 0.5) * 1.02 + 1e-12
        self.clipped += int((err > bound).sum())
        self.count += err.numel()
        self.signal += float(x.double().square().sum())
        self.noise += float(err.double().square().sum())

    def close(self) -> dict:
        for h in self.handles:
            h.remove()
        return {"clipped": self.clipped / max(self.count, 1),
                "sqnr_db": 10 * math.log10(self.signal / self.noise) if self.noise > 0 else math.inf}


def probe(qm, data, kind: str, batches: int = 4, batch_size: int = 64) -> dict:
    """Train-mode forward + backward on the first `batches` training batches, no optimizer step."""
    p = Probe(qm, kind)
    qm.train()
    try:
        for i in range(batches):
            x, y = zip(*[data.train[j] for j in range(i * batch_size, (i + 1) * batch_size)])
            x, y = torch.stack(x), torch.tensor([int(v) for v in y])
            loss = F.cross_entropy(qm(x), y) + qm.regularization()
            loss.backward()
        qm.zero_grad(set_to_none=True)
    finally:
        stats = p.close()
    return stats


# ---- runs ---------------------------------------------------------------------------------------------------
def run_one(row: Row | None, model: str, seed: int, epochs: int, out: Path) -> dict:
    """One training run (row None: FP32), its accuracy, ms/step and probe."""
    cfg = TrainConfig(model=_model_spec(model), data="mnist5k", epochs=epochs, batch_size=64, lr=0.05, seed=seed,
                      calibration_batches=4)
    t0 = time.perf_counter()
    result = trainer.run(cfg, None if row is None else row.qconfig(), out, log=lambda s: None, progress_bar=False)
    entry = {"table": None if row is None else row.table, "estimator": "fp32" if row is None else row.estimator,
             "model": model, "seed": seed, "epochs": epochs, "acc": result.final_acc, "ms_per_step": result.ms_per_step,
             "seconds": time.perf_counter() - t0}
    if row is not None:
        entry.update(probe(result.model, _mnist(), row.probed_kind))
    return entry


_DATA = {}


def _mnist():
    if "mnist" not in _DATA:
        from qcompile.tools.data import load_datasets
        _DATA["mnist"] = load_datasets("mnist5k")
    return _DATA["mnist"]


def rows_of(tables: list[str]) -> list[Row]:
    return [Row(t, e) for t in tables for e in ESTIMATORS]


def run_all(tables: list[str], models: list[str], seeds: int, epochs: dict, out: Path, results_path: Path) -> list:
    """Every (row or FP32, model, seed) not in `results_path` yet; results saved after each run."""
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["table"], r["estimator"], r["model"], r["seed"]) for r in results}
    jobs = [(None, m, s) for m in models for s in range(seeds)] + \
           [(row, m, s) for row in rows_of(tables) for m in models for s in range(seeds)]
    for row, model, seed in jobs:
        key = (None if row is None else row.table, "fp32" if row is None else row.estimator, model, seed)
        if key in done:
            continue
        name = f"{model}/{'fp32' if row is None else row.table + '-' + row.estimator}/seed{seed}"
        torch.manual_seed(seed)
        entry = run_one(row, model, seed, epochs[model], out / name)
        results.append(entry)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name}: {entry['acc']:.2f}%  {entry['ms_per_step']:.1f} ms/step"
              + (f"  clipped {100 * entry['clipped']:.3f}%  SQNR {entry['sqnr_db']:.1f} dB" if row else ""), flush=True)
    return results


def step_times(tables: list[str], model: str = "lenet5", steps: int = 200, rounds: int = 3) -> dict:
    """Median over `rounds` of the mean ms per training step over `steps` steps (after 10 warm-up steps;
    DSGC's every-100-step search included), per (table, estimator) and for FP32, the configurations
    interleaved round by round so that load drifts hit all alike. Batch 64, one process."""
    from qcompile.tools.trainer import Processes, Trainer, prepare
    jobs = [("fp32", None)] + [(f"{r.table}-{r.estimator}", r) for r in rows_of(tables)]
    times = {name: [] for name, _ in jobs}
    for _ in range(rounds):
        for name, row in jobs:
            cfg = TrainConfig(model=_model_spec(model), data="mnist5k", batch_size=64, epochs=1)
            loop = Trainer(prepare(cfg, None if row is None else row.qconfig(), Processes()), Path("step-timing"),
                           progress_bar=False)
            loop.sampler.start(0)
            batches = itertools.cycle(list(itertools.islice(loop.loader, 20)))
            for _ in range(10):
                loop._step(*next(batches))
            t0 = time.perf_counter()
            for _ in range(steps):
                loop._step(*next(batches))
            times[name].append(1e3 * (time.perf_counter() - t0) / steps)
    return {name: statistics.median(v) for name, v in times.items()}


# ---- report -------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(results, **match) -> list[dict]:
    return [r for r in results if all(r[k] == v for k, v in match.items())]


def report(results: list, tables: list[str], models: list[str]) -> str:
    lines = []
    for table in tables:
        base = table.split("-")[0]
        bits = table.split("-g")[1] if "-g" in table else "8"
        what = TITLES[base] + ("" if base == "2" else f", {bits}-bit gradients")
        lines += [f"### Table {table}: {what}", ""]
        head = ["estimator", "static", "paper (ResNet-18, Tiny ImageNet)"]
        for m in models:
            head += [f"{m} acc (%)", f"{m} clipped (%)", f"{m} SQNR (dB)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for est in ("fp32",) + ESTIMATORS:
            cells = [LABELS.get(est, "FP32") + ("" if base != "3" or est in ("fp32",) else
                                                 f" / {'current' if est == 'dsgc' else est}"),
                     "n.a." if est == "fp32" else {"dsgc": "hybrid", "hindsight": "yes"}.get(est, "no"),
                     PAPER[base][est] if "-g" not in table else "—"]
            for m in models:
                rs = _cell(results, model=m, estimator=est, **({"table": table} if est != "fp32" else {"table": None}))
                if not rs:
                    cells += ["—"] * 3
                    continue
                acc = _mean_std([r["acc"] for r in rs])
                cells.append(f"{acc[0]:.2f} ± {acc[1]:.2f} (n={len(rs)})")
                if est == "fp32":
                    cells += ["", ""]
                    continue
                cells.append(f"{100 * statistics.fmean(r['clipped'] for r in rs):.3f}")
                cells.append(f"{statistics.fmean(r['sqnr_db'] for r in rs):.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def timing_table(timing: dict, tables: list[str]) -> str:
    """ms per step per estimator (rows) and table (columns), and the ratio to FP32."""
    fp32 = timing["fp32"]
    lines = ["| estimator | " + " | ".join(f"table {t}" for t in tables) + " |", "|---" * (len(tables) + 1) + "|",
             "| FP32 | " + " | ".join(f"{fp32:.1f}" for _ in tables) + " |"]
    for est in ESTIMATORS:
        cells = [f"{timing[f'{t}-{est}']:.1f} ({timing[f'{t}-{est}'] / fp32:.2f}×)" for t in tables]
        lines.append(f"| {LABELS[est]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list, tables: list[str], models: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(models), len(tables), figsize=(3.2 * len(tables), 2.8 * len(models)), squeeze=False)
    for (i, m), (j, table) in itertools.product(enumerate(models), enumerate(tables)):
        ax = axes[i][j]
        names = ("fp32",) + ESTIMATORS
        stats = []
        for est in names:
            rs = _cell(results, model=m, estimator=est, table=None if est == "fp32" else table)
            stats.append(_mean_std([r["acc"] for r in rs]) if rs else (math.nan, 0.0))
        ax.errorbar(range(len(names)), [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o", capsize=4)
        ax.set_xticks(range(len(names)), ["FP32", "current", "running", "DSGC", "hindsight"], rotation=30, fontsize=7)
        ax.set_title(f"{m}: table {table}", fontsize=8)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_ylabel("held-out acc (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="1,2,3,1-g4,3-g4")
    parser.add_argument("--models", default="lenet5,resnet20")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", default="lenet5=4,resnet20=1", help="MODEL=EPOCHS,...")
    parser.add_argument("--out", default="build/range_estimators", help="run directories and results.json")
    parser.add_argument("--doc", default="docs/range_estimators", help="writes DOC_tables.md and DOC.png")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and figure from results.json")
    parser.add_argument("--timing", action="store_true",
                        help="also time each configuration's training step alone (lenet5; run it on a quiet machine)")
    args = parser.parse_args(argv)
    tables, models = args.tables.split(","), args.models.split(",")
    epochs = {k: int(v) for k, v in (p.split("=") for p in args.epochs.split(","))}
    out = Path(args.out)
    results_path = out / "results.json"
    if args.report:
        results = json.loads(results_path.read_text())
    else:
        results = run_all(tables, models, args.seeds, epochs, out, results_path)
    timing_path = out / "step_times.json"
    if args.timing:
        timing_path.write_text(json.dumps(step_times(tables), indent=1))
    text = report(results, tables, models)
    if timing_path.exists():
        text += ("\n### Step time, each configuration alone (lenet5, batch 64, ms per step, median of 3 interleaved "
                 "rounds of 200 steps)\n\n" + timing_table(json.loads(timing_path.read_text()), tables) + "\n")
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc + "_tables.md").write_text(text + "\n")
    plot(results, tables, models, Path(args.doc + ".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
