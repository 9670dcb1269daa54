"""`qcompile train`: a whole training run of a compiled model on a real dataset, checkpointed
and resumable, in one process or many (`torchrun`).

`run(TrainConfig, QConfig, out)` validates everything (data, model, configs, compile) first and
creates `out` with its first checkpoint, then writes there: `run.json` (both configs), `last.pt` (every epoch and every
`checkpoint_every` steps) and `best.pt` (best held-out accuracy), `metrics.csv`, `curves.png`,
`summary.txt` (every quantizer's range); with `baseline` the float model trains with the same
protocol in `out/fp32`. `resume(out)` continues from `last.pt`.

Invariants:
- Everything random is a function of the seed and where the run is: the data order and
  augmentation of (seed, epoch) (`qcompile.tools.data`), the stochastic-rounding dither of
  (seed, rank, step), torch's own generator restored from the checkpoint. A run killed at any
  point and resumed ends with the same bits as one that was not (same world size, same machine).
- Under `torchrun`, batch size is the global batch; range statistics and folded BatchNorm
  statistics are all-reduced inside the model, so every rank holds the same ranges (checked
  after every epoch, `ranks_agree` in metrics.csv); only rank 0 writes files or prints.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import fnmatch
import gc
import io
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import qcompile
from qcompile.config import QConfig
from qcompile.errors import CheckpointError, NonFiniteError
from qcompile.tools import checkpoint
from qcompile.tools.data import Datasets, EpochSampler, SeededItems, derived_seed, load_datasets
from qcompile.tools.model_spec import load_model
from qcompile.tools.run_config import TrainConfig
from qcompile.train.graph_module import check_state_dict
from qcompile.train.modes import EvalOutput

AUX_WEIGHT = 0.3     # auxiliary heads' share of the training loss (GoogLeNet's paper)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "steps_per_s",
                  "ranks_agree")


# ---- processes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Processes:
    """Where this process is: rank of world (1 without torchrun) and its device."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def processes(device: str):
    """This process's place in the run: joins the process group torchrun describes (WORLD_SIZE > 1: gloo
    on CPU, NCCL on CUDA) and leaves it on exit when it joined it here, so that no communication thread
    outlives the run (one left running aborts the interpreter at exit)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': torch sees no CUDA GPU on this machine (use --device cpu)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Processes(0, 1, "cuda" if device == "cuda" else "cpu")
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        yield Processes(dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if device == "cuda" else "cpu")
    except BaseException:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if joined and dist.is_initialized():
        gc.collect()          # a finished run's DistributedDataParallel (in reference cycles) lets go of the group
        dist.barrier()        # no collective is in flight on any rank when the group goes
        dist.destroy_process_group()
        gc.collect()


def main_and_aux(out, model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, auxiliary logits) of a training forward: a model with auxiliary heads (GoogLeNet,
    Inception) returns a namedtuple in training; its eval output field (the compiled graph's
    EvalOutput, else the first, as torchvision orders them) is the logits, the other fields the
    auxiliary outputs."""
    if not isinstance(out, tuple):
        return out, []
    index = model.eval_output.index if isinstance(getattr(model, "eval_output", None), EvalOutput) else 0
    return out[index], [o for i, o in enumerate(out) if i != index and o is not None]


def _sum_over_ranks(values: list[float], procs: Processes) -> list[float]:
    if procs.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=procs.device)
    dist.all_reduce(t)
    return t.tolist()


def ranks_agree(model: nn.Module, procs: Processes) -> str | None:
    """None when every rank holds the same parameters and buffers (ranges, scales, BatchNorm
    statistics) as rank 0, else the name of the first that differs on some rank. Collective."""
    if procs.world == 1:
        return None
    tensors = list(model.state_dict().items())
    mine = torch.cat([t.detach().double().reshape(-1) for _, t in tensors]).to(procs.device)
    first = mine.clone()
    dist.broadcast(first, 0)
    differ = (first != mine).nonzero()
    index = torch.tensor([float(differ[0, 0]) if len(differ) else math.inf], device=procs.device, dtype=torch.float64)
    dist.all_reduce(index, op=dist.ReduceOp.MIN)
    if math.isinf(index.item()):
        return None
    ends = itertools.accumulate(t.numel() for _, t in tensors)
    return next(name for (name, _), end in zip(tensors, ends) if index.item() < end)


# ---- what a run is made of ----------------------------------------------------------------------
@dataclass
class Setup:
    """A run's model (compiled, or the float model for the baseline), data and configs, built and
    validated before any file is written."""
    train: TrainConfig
    qconfig: QConfig | None           # None: the float baseline
    model: nn.Module
    data: Datasets
    input_shape: tuple[int, ...]
    procs: Processes
    no_decay: set = field(default_factory=set)      # parameter names without weight decay
    depthwise: set = field(default_factory=set)     # weights of depthwise convolutions

    @property
    def quantized(self) -> bool:
        return self.qconfig is not None

    def run_json(self) -> str:
        return json.dumps({"train": self.train.to_dict(), "qcompile": None if self.qconfig is None
                           else self.qconfig.to_dict(), "world": self.procs.world, "threads": torch.get_num_threads(),
                           "input_shape": list(self.input_shape),
                           "classes": self.data.classes}, indent=2)


def _first_conv_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return conv.in_channels if conv is not None else 3


def _model(spec: str, classes) -> nn.Module:
    """The model of `spec`, with num_classes set to the data's class count where its factory takes it."""
    return load_model(spec, if_accepted=None if classes is None else {"num_classes": len(classes)})


def norm_and_depthwise(model: nn.Module) -> tuple[set, set]:
    """(names of norm-layer parameters, names of depthwise conv weights) of a float model; compilation
    keeps parameter names, so they name the compiled model's parameters too."""
    norm = {f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, NORM_TYPES)
            for p, _ in mod.named_parameters(recurse=False)}
    depthwise = {f"{m}.weight" for m, mod in model.named_modules()
                 if isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels}
    return norm, depthwise


def prepare(train: TrainConfig, qconfig: QConfig | None, procs: Processes, float_model: nn.Module | None = None) -> Setup:
    """Data, model (seeded with `train.seed`, or a copy of `float_model`), compiled when `qconfig` is
    given, on the device; ValueError / QCompileError naming what is wrong."""
    data = load_datasets(train.data, image_size=train.image_size, augment=train.augment)
    if float_model is None:
        torch.manual_seed(train.seed)
        float_model = _model(train.model, data.classes)
    float_model = copy.deepcopy(float_model)
    channels = _first_conv_channels(float_model)
    if channels != 3 and train.data != "mnist5k" and Path(train.data).is_dir():
        data = load_datasets(train.data, channels=channels, image_size=train.image_size, augment=train.augment)
    x = torch.stack([data.train[i][0] for i in range(min(2, len(data.train)))])
    no_decay, depthwise = norm_and_depthwise(float_model)
    model = float_model if qconfig is None else qcompile.compile(float_model, (x,), qconfig)
    return Setup(train, qconfig, model.to(procs.device), data, tuple(x.shape[1:]), procs, no_decay, depthwise)


def parameter_groups(setup: Setup) -> list[dict]:
    """The optimizer's groups: each parameter's learning rate from the first `lr_groups` entry that
    selects it (a parameter-name glob, or "depthwise"), weight decay off for norm parameters when
    `no_decay_norm`; ValueError for an entry that selects nothing."""
    train = setup.train
    names = dict(setup.model.named_parameters())

    def selects(key: str, name: str) -> bool:
        return name in setup.depthwise if key == "depthwise" else fnmatch.fnmatchcase(name, key)

    for key in train.lr_groups:
        if not any(selects(key, n) for n in names):
            raise ValueError(f"lr_groups {key!r} selects no parameter of {train.model} (names look like "
                             f"{list(names)[:3]}; 'depthwise' selects depthwise conv weights)")
    groups: dict[tuple, list] = {}
    for name, p in names.items():
        lr = next((v for k, v in train.lr_groups.items() if selects(k, name)), train.lr)
        decay = 0.0 if train.no_decay_norm and name in setup.no_decay else train.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def make_optimizer(setup: Setup) -> torch.optim.Optimizer:
    groups, t = parameter_groups(setup), setup.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.opt_momentum, 0.999), weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.opt_momentum, weight_decay=t.weight_decay)


def lr_factor(train: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The schedule's multiplier of every group's initial learning rate for 0-based `step`."""
    if train.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / (train.epochs * steps_per_epoch)))
    if train.schedule == "step":
        return train.gamma ** sum(step >= m * steps_per_epoch for m in train.milestones)
    return 1.0


# ---- progress and files ---------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a run is: epochs completed, steps into the current epoch, steps in total, the current
    epoch's training statistics so far (summed over ranks) and the best held-out accuracy."""
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0
    best_acc: float = -1.0
    best_epoch: int = 0


@dataclass
class RunResult:
    out: Path
    metrics: list[dict]
    best_acc: float
    best_epoch: int
    model: nn.Module
    baseline: "RunResult | None" = None

    @property
    def final_acc(self) -> float:
        return self.metrics[-1]["val_acc"]

    @property
    def ms_per_step(self) -> float:
        steps = sum(r["steps_per_s"] * r["seconds"] for r in self.metrics)
        return 1e3 * sum(r["seconds"] for r in self.metrics) / max(steps, 1)


def _write_metrics(out: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.write_atomic(out / "metrics.csv", lambda f: f.write(text.getvalue().encode()))


def _write_curves(out: Path, rows: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "acc", "top-1 accuracy (%)")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label="training batches (train mode)")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "s-", label="held-out (eval mode)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    checkpoint.write_atomic(out / "curves.png", lambda f: f.write(buf.getvalue()))


def describe(setup: Setup) -> str:
    q = setup.qconfig
    if q is None:
        return "FP32"
    grad = f"G{q.grad_bits}" if q.grad_bits else ""
    acc = f", acc{q.acc_bits}" if q.acc_bits else ""
    return f"W{q.weight_bits}A{q.act_bits}{grad} {q.act_range}{acc}"


# ---- the loop -------------------------------------------------------------------------------------
class Trainer:
    """One run of `setup` in `out`: the loop, evaluation, checkpoints. Collective under torchrun."""

    def __init__(self, setup: Setup, out: Path, progress_bar: bool = True):
        self.setup, self.out, self.progress_bar = setup, out, progress_bar
        self.procs = setup.procs
        self.model = setup.model
        self.net = self.model
        if self.procs.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # buffers stay per rank: the model all-reduces its statistics itself, and ranks_agree checks
            # (torch >= 2.10 deprecates broadcast_buffers, but says to keep it for rank-local buffers)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.net = DistributedDataParallel(self.model, broadcast_buffers=False,
                                                   device_ids=[torch.device(self.procs.device).index]
                                                   if self.procs.device.startswith("cuda") else None)
        self.optimizer = make_optimizer(setup)
        t = setup.train
        self.sampler = EpochSampler(len(setup.data.train), t.batch_size, t.seed, self.procs.rank, self.procs.world)
        self.loader = DataLoader(SeededItems(setup.data.train, t.seed, setup.data.random_transforms), t.batch_size // self.procs.world,
                                 sampler=self.sampler, num_workers=t.workers, persistent_workers=t.workers > 0,
                                 pin_memory=self.procs.device.startswith("cuda"))
        self.progress = Progress()
        self.metrics: list[dict] = []

    # -- state ---------------------------------------------------------------------------------------
    def _gathered(self, state: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `state` (a byte tensor of one size on every rank), on the CPU. Collective."""
        if self.procs.world == 1:
            return [state]
        gathered = [torch.empty_like(state, device=self.procs.device) for _ in range(self.procs.world)]
        dist.all_gather(gathered, state.to(self.procs.device))
        return [g.cpu() for g in gathered]

    def _rng_states(self) -> dict:
        """torch's CPU generator of every rank, and its CUDA generator (dropout on the GPU) with --device cuda."""
        cuda = self.procs.device.startswith("cuda")
        return {"torch": self._gathered(torch.get_rng_state()),
                "cuda": self._gathered(torch.cuda.get_rng_state(self.procs.device)) if cuda else []}

    def state(self) -> dict:
        """This run as a checkpoint (collective: gathers every rank's RNG state)."""
        return {"format": checkpoint.FORMAT, "run": self.setup.run_json(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "progress": vars(self.progress).copy(),
                "rng": self._rng_states(), "metrics": [dict(r) for r in self.metrics]}

    def save(self, best: bool = False) -> None:
        """Write last.pt (and best.pt); the first save creates the run directory and its run.json, so a
        run that fails before its first checkpoint leaves no directory behind."""
        state = self.state()
        if self.procs.main:
            if not (self.out / "run.json").is_file():
                self.out.mkdir(parents=True, exist_ok=True)
                checkpoint.write_atomic(self.out / "run.json", lambda f: f.write(self.setup.run_json().encode()))
            checkpoint.save(state, self.out / "last.pt")
            if best:
                checkpoint.save(state, self.out / "best.pt")

    def load(self, ckpt: dict, where: str) -> None:
        """Restore a checkpoint `checkpoint.read` returned; everything is checked before anything changes."""
        run = ckpt["run"]
        if run.get("world") != self.procs.world:
            raise CheckpointError(f"{where} was written by {run.get('world')} process(es); resume it with the same "
                                  f"number (this is {self.procs.world})")
        check_state_dict(self.model.state_dict(), ckpt["model"], where)
        progress = ckpt["progress"]
        if set(progress) != set(vars(Progress())):
            raise CheckpointError(f"{where}: progress fields {sorted(progress)} are not {sorted(vars(Progress()))}")
        rngs, cuda = ckpt["rng"].get("torch"), ckpt["rng"].get("cuda")
        expect_cuda = self.procs.world if self.procs.device.startswith("cuda") else 0
        if not isinstance(rngs, list) or len(rngs) != self.procs.world or not isinstance(cuda, list) \
                or len(cuda) != expect_cuda:
            raise CheckpointError(f"{where}: expected {self.procs.world} torch RNG state(s) and {expect_cuda} CUDA "
                                  "one(s) (resume on the device the run used)")
        trial = copy.deepcopy(self.optimizer)
        try:
            trial.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: the optimizer state does not fit this run ({exc})") from None
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.progress = Progress(**progress)
        self.metrics = [dict(r) for r in ckpt["metrics"]]
        torch.set_rng_state(rngs[self.procs.rank])
        if cuda:
            torch.cuda.set_rng_state(cuda[self.procs.rank], self.procs.device)

    # -- steps ---------------------------------------------------------------------------------------
    def calibrate(self) -> int:
        """Estimate the ranges on `calibration_batches` training batches (their own order) before step 1."""
        t = self.setup.train
        if not self.setup.quantized or t.calibration_batches == 0:
            return 0
        sampler = EpochSampler(len(self.setup.data.train), t.batch_size, t.seed, self.procs.rank, self.procs.world)
        sampler.start(-1)
        loader = DataLoader(SeededItems(self.setup.data.train, t.seed, self.setup.data.random_transforms), t.batch_size // self.procs.world,
                            sampler=sampler, num_workers=t.workers)
        self.model.train()
        return self.model.calibrate(x.to(self.procs.device) for x, _ in itertools.islice(loader, t.calibration_batches))

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t, p = self.setup.train, self.progress
        if self.setup.quantized:
            self.model.seed_rounding(derived_seed(t.seed, self.procs.rank, p.step), self.procs.device)
        factor = lr_factor(t, p.step, self.sampler.steps_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        logits, aux = main_and_aux(self.net(x), self.model)
        loss = F.cross_entropy(logits, y)
        if aux:
            loss = loss + AUX_WEIGHT * sum(F.cross_entropy(a, y) for a in aux)
        total = loss + self.model.regularization() if self.setup.quantized else loss
        correct = float((logits.argmax(1) == y).sum())
        loss_sum, correct, seen, bad = _sum_over_ranks(
            [float(loss.detach()) * len(y), correct, float(len(y)), float(not torch.isfinite(total.detach()))], self.procs)
        if bad:
            raise NonFiniteError(f"the training loss is not finite (lr {t.lr * factor:g})")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if t.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
            if not torch.isfinite(norm):
                bad_name = next(n for n, q in self.model.named_parameters()
                                if q.grad is not None and not torch.isfinite(q.grad).all())
                raise NonFiniteError(f"the gradient of {bad_name!r} is not finite")
        self.optimizer.step()
        p.loss_sum, p.correct, p.seen = p.loss_sum + loss_sum, p.correct + correct, p.seen + seen
        p.step += 1
        p.step_in_epoch += 1

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(loss, top-1 %) on the held-out set in eval mode, each rank a share, summed over ranks."""
        t, val = self.setup.train, self.setup.data.val
        was = self.model.training
        self.model.eval()
        loader = DataLoader(torch.utils.data.Subset(val, range(self.procs.rank, len(val), self.procs.world)),
                            t.eval_batch_size, num_workers=t.workers)
        loss = correct = 0.0
        for x, y in loader:
            x, y = x.to(self.procs.device), y.to(self.procs.device)
            logits = self.model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
        self.model.train(was)
        loss, correct = _sum_over_ranks([loss, correct], self.procs)
        return loss / len(val), 100.0 * correct / len(val)

    @contextlib.contextmanager
    def _stopping_at(self, where: str):
        """A NonFiniteError inside says where the run stopped and what holds its last checkpoint."""
        try:
            yield
        except NonFiniteError as exc:
            raise NonFiniteError(f"{self.out}: {where}: {exc}; the run stopped and {self.out / 'last.pt'} holds its "
                                 "last checkpoint (lower --lr or set --clip-grad-norm, then --resume)") from None

    def fit(self, log=print) -> RunResult:
        t, p = self.setup.train, self.progress
        steps = self.sampler.steps_per_epoch
        self.model.train()
        while p.epoch < t.epochs:
            self.sampler.start(p.epoch, p.step_in_epoch)
            bar = None
            if self.progress_bar and self.procs.main:
                from tqdm import tqdm
                bar = tqdm(total=steps, initial=p.step_in_epoch, desc=f"epoch {p.epoch + 1}/{t.epochs}", unit="step",
                           leave=False, disable=None)
            t0 = time.perf_counter() - p.seconds
            steps_before = p.step_in_epoch
            for x, y in self.loader:
                with self._stopping_at(f"epoch {p.epoch + 1}, step {p.step + 1}"):
                    self._step(x.to(self.procs.device, non_blocking=True), y.to(self.procs.device, non_blocking=True))
                p.seconds = time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{p.loss_sum / p.seen:.3f}", acc=f"{100 * p.correct / p.seen:.1f}%",
                                    steps_per_s=f"{(p.step_in_epoch - steps_before) / max(p.seconds, 1e-9):.1f}")
                if t.checkpoint_every and p.step % t.checkpoint_every == 0 and p.step_in_epoch < steps:
                    self.save()
            if bar is not None:
                bar.close()
            with self._stopping_at(f"epoch {p.epoch + 1}, held-out evaluation"):
                self._end_epoch(log)
        return RunResult(self.out, self.metrics, p.best_acc, p.best_epoch, self.model)

    def _end_epoch(self, log) -> None:
        t, p = self.setup.train, self.progress
        val_loss, val_acc = self.evaluate()
        differing = ranks_agree(self.model, self.procs)
        if differing is not None and self.procs.main:
            log(f"warning: after epoch {p.epoch + 1} the ranks hold different values of {differing!r}")
        row = {"epoch": p.epoch + 1, "step": p.step,
               "lr": t.lr * lr_factor(t, p.step - 1, self.sampler.steps_per_epoch),
               "train_loss": p.loss_sum / p.seen, "train_acc": 100.0 * p.correct / p.seen,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": p.seconds,
               "steps_per_s": self.sampler.steps_per_epoch / max(p.seconds, 1e-9),
               "ranks_agree": "" if self.procs.world == 1 else differing is None}
        self.metrics.append(row)
        best = val_acc > p.best_acc
        if best:
            p.best_acc, p.best_epoch = val_acc, p.epoch + 1
        p.epoch, p.step_in_epoch, p.loss_sum, p.correct, p.seen, p.seconds = p.epoch + 1, 0, 0.0, 0.0, 0.0, 0.0
        self.save(best=best)
        if self.procs.main:
            _write_metrics(self.out, self.metrics)
            _write_curves(self.out, self.metrics, f"{self.setup.train.model} {describe(self.setup)} on "
                                                  f"{self.setup.train.data}")
            if self.setup.quantized:
                checkpoint.write_atomic(self.out / "summary.txt", lambda f: f.write(self.model.summary().encode()))
            log(f"epoch {row['epoch']}/{t.epochs}  step {row['step']}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.2f}%  held-out loss {val_loss:.4f} acc {val_acc:.2f}%  "
                f"{row['steps_per_s']:.1f} steps/s" + ("" if self.procs.world == 1 else
                                                       f"  ranks agree: {'yes' if differing is None else 'NO'}"))


# ---- entry points ---------------------------------------------------------------------------------
def _print(text: str) -> None:
    print(text, flush=True)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not empty; give a new directory, or continue that run "
                         f"with --resume {out}")


def _fresh(setup: Setup, out: Path, log, progress_bar: bool) -> RunResult:
    trainer = Trainer(setup, out, progress_bar)
    # every rank draws its own dropout masks; stochastic rounding is reseeded per step (Trainer._step)
    torch.manual_seed(derived_seed(setup.train.seed, setup.procs.rank))
    seen = trainer.calibrate()
    if seen and setup.procs.main:
        log(f"calibrated the ranges on {seen} training batch(es)")
    return trainer.fit(log)


def _continue(setup: Setup, out: Path, log, progress_bar: bool) -> RunResult:
    path = out / "last.pt"
    ckpt = checkpoint.read(path)
    stored = json.loads(setup.run_json())
    changed = sorted(f"{table}.{k}" for table in ("train", "qcompile") for k in set(stored[table] or {}) |
                     set(ckpt["run"].get(table) or {}) if (stored[table] or {}).get(k) != (ckpt["run"].get(table) or {}).get(k))
    if changed:
        raise CheckpointError(f"checkpoint {str(path)!r} belongs to another run: {changed[:5]} differ from "
                              f"{out / 'run.json'}; nothing was loaded")
    trainer = Trainer(setup, out, progress_bar)
    trainer.load(ckpt, f"checkpoint {str(path)!r}")
    p = trainer.progress
    if setup.procs.main:
        log(f"resuming {out}: epoch {p.epoch + 1}, step {p.step} ({p.step_in_epoch} into the epoch)")
        if ckpt["run"].get("threads") != torch.get_num_threads():
            log(f"note: the run used {ckpt['run'].get('threads')} thread(s) per process, this process has "
                f"{torch.get_num_threads()}: float sums change order, so the result will not be bit-identical to an "
                f"uninterrupted run (set OMP_NUM_THREADS={ckpt['run'].get('threads')} for that)")
    return trainer.fit(log)


def summary_table(result: RunResult, name: str) -> str:
    rows = [(name, result)] + ([("FP32 baseline", result.baseline)] if result.baseline else [])
    lines = [f"{'run':<28} {'best held-out':>13} {'(epoch)':>7} {'final':>8} {'ms/step':>8}"]
    for label, r in rows:
        lines.append(f"{label:<28} {r.best_acc:>12.2f}% {r.best_epoch:>7} {r.final_acc:>7.2f}% {r.ms_per_step:>8.2f}")
    if result.baseline:
        lines.append(f"gap to FP32 (final): {result.baseline.final_acc - result.final_acc:+.2f} points; step-time "
                     f"ratio {result.ms_per_step / result.baseline.ms_per_step:.2f}x")
    return "\n".join(lines)


def run(train: TrainConfig, qconfig: QConfig | None, out, *, log=None, progress_bar: bool = True) -> RunResult:
    """Train `train.model` compiled with `qconfig` (the float model when None) as `train` says, in the
    new directory `out`; with `train.baseline` also the float model (same initial weights) in out/fp32."""
    out, log = Path(out), log or _print
    _check_out(out)
    with processes(train.device) as procs:
        return _run(train, qconfig, out, procs, log, progress_bar)


def _run(train: TrainConfig, qconfig: QConfig | None, out: Path, procs: Processes, log, progress_bar: bool):
    setup = prepare(train, qconfig, procs)
    baseline_setup = None
    if train.baseline and qconfig is not None:
        torch.manual_seed(train.seed)
        baseline_setup = prepare(train, None, procs, _model(train.model, setup.data.classes))
    if procs.main:
        log(f"{train.model} {describe(setup)} on {setup.data.description}; {procs.world} process(es), "
            f"{procs.device}; run directory {out}")
    result = _fresh(setup, out, log, progress_bar)
    if baseline_setup is not None:
        result.baseline = _fresh(baseline_setup, out / "fp32", log, progress_bar)
    if procs.main:
        log(summary_table(result, describe(setup)))
    return result


def stored_configs(stored: dict, where: str) -> tuple[TrainConfig, QConfig | None]:
    """The (TrainConfig, QConfig or None for a float baseline) of a run's stored JSON (run.json, or a
    checkpoint's "run"); CheckpointError naming `where` when they are not valid."""
    try:
        train = TrainConfig.from_dict(stored["train"])
        qconfig = None if stored["qcompile"] is None else QConfig.from_dict(stored["qcompile"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a valid run configuration ({exc})") from None
    return train, qconfig


def configs_of(run_dir: Path) -> tuple[TrainConfig, QConfig | None]:
    """The configs `run.json` of a run directory holds."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory: {path} does not exist")
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return stored_configs(stored, str(path))


def resume(out, *, log=None, progress_bar: bool = True) -> RunResult:
    """Continue the run in `out` from its last checkpoint (its configs from `out/run.json`), then its
    baseline when it has one; a finished run is evaluated and reported, not retrained."""
    out, log = Path(out), log or _print
    train, qconfig = configs_of(out)
    if not (out / "last.pt").is_file():
        raise CheckpointError(f"{str(out)!r} has no last.pt yet (the run stopped before its first checkpoint); "
                              "start it again")
    with processes(train.device) as procs:
        return _resume(train, qconfig, out, procs, log, progress_bar)


def _resume(train: TrainConfig, qconfig: QConfig | None, out: Path, procs: Processes, log, progress_bar: bool):
    setup = prepare(train, qconfig, procs)
    result = _continue(setup, out, log, progress_bar)
    if train.baseline and qconfig is not None:
        torch.manual_seed(train.seed)
        base = prepare(train, None, procs, _model(train.model, setup.data.classes))
        fp32 = out / "fp32"
        result.baseline = (_continue(base, fp32, log, progress_bar) if (fp32 / "last.pt").is_file()
                           else _fresh(base, fp32, log, progress_bar))
    if procs.main:
        log(summary_table(result, describe(setup)))
    return result
