"""TrainConfig: every option of a `qcompile train` run except the quantization config (QConfig).

Invariant: a TrainConfig that exists is valid. A run file (TOML) holds it under `[train]` and the
QConfig under `[qcompile]`; command-line flags replace single fields of either. Both are stored
in the run directory (`run.json`) and in every checkpoint, so resume and export need no flags.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "models:lenet5"
    data: str = "mnist5k"
    epochs: int = 2
    batch_size: int = 64                 # the global batch: split evenly over the processes
    optimizer: str = "sgd"
    lr: float = 0.05
    opt_momentum: float = 0.9            # SGD momentum (AdamW: beta1)
    weight_decay: float = 5e-4
    no_decay_norm: bool = False          # no weight decay on BatchNorm / LayerNorm / GroupNorm parameters
    schedule: str = "cosine"             # per step: cosine to 0, step (×gamma at each milestone epoch), constant
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    lr_groups: dict = field(default_factory=dict)   # parameter-name glob (or "depthwise") → learning rate
    clip_grad_norm: float | None = None
    seed: int = 0
    calibration_batches: int = 4         # training batches the ranges are estimated on before step 1
    workers: int = 0                     # DataLoader worker processes
    image_size: int | None = None        # image folders: default the first training image's shorter side
    augment: bool = False                # image folders: RandomResizedCrop + flip for training
    eval_batch_size: int = 256
    checkpoint_every: int = 0            # also write last.pt every N steps (0: at the end of each epoch only)
    device: str = "cpu"
    baseline: bool = False               # also train the float model with the same protocol (RUN_DIR/fp32)

    def __post_init__(self):
        def need(cond, name, what):
            if not cond:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {what}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "must be a positive integer")
        for name in ("calibration_batches", "workers", "checkpoint_every", "seed"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"choose one of {OPTIMIZERS}")
        need(self.schedule in SCHEDULES, "schedule", f"choose one of {SCHEDULES}")
        need(self.device in DEVICES, "device", f"choose one of {DEVICES}")
        for name in ("lr", "weight_decay", "gamma"):
            need(_is_num(getattr(self, name)) and getattr(self, name) >= 0, name, "must be a number >= 0")
        need(_is_num(self.opt_momentum) and 0 <= self.opt_momentum < 1, "opt_momentum", "must be in [0, 1)")
        need(self.clip_grad_norm is None or (_is_num(self.clip_grad_norm) and self.clip_grad_norm > 0),
             "clip_grad_norm", "must be None or a number > 0")
        need(self.image_size is None or (_is_int(self.image_size) and self.image_size >= 1), "image_size",
             "must be None or a positive integer")
        for name in ("no_decay_norm", "augment", "baseline"):
            need(isinstance(getattr(self, name), bool), name, "must be true or false")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        need(all(_is_int(m) and 0 < m for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
             "milestones", "must be increasing positive epochs")
        need(self.schedule != "step" or self.milestones, "milestones", "schedule='step' needs milestones (epochs)")
        need(isinstance(self.lr_groups, dict) and all(isinstance(k, str) and _is_num(v) and v >= 0
                                                      for k, v in self.lr_groups.items()),
             "lr_groups", "must map parameter-name globs (or 'depthwise') to learning rates >= 0")
        for name in ("model", "data"):
            need(isinstance(getattr(self, name), str) and getattr(self, name), name, "must be a non-empty string")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - FIELD_NAMES
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {sorted(unknown)}; known fields are {sorted(FIELD_NAMES)}")
        return cls(**d)


FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_run_file(path: str | Path) -> tuple[dict, dict]:
    """({train fields}, {qcompile fields}) of a run file: `[train]` and `[qcompile]` tables."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"config {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config {str(path)!r}: not valid TOML: {exc}") from None
    extra = set(data) - {"train", "qcompile"}
    if extra:
        raise ValueError(f"config {str(path)!r}: unknown top-level keys {sorted(extra)}; a run file holds a "
                         "[train] table (TrainConfig) and a [qcompile] table (QConfig)")
    return dict(data.get("train", {})), dict(data.get("qcompile", {}))
