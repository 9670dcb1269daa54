"""A small, explicit training loop for classifiers (used by the demo and the experiments).

Any loop works with a compiled model; this one adds `qm.regularization()` when the model
has it and reports seconds per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TrainLog:
    steps: int = 0
    seconds: float = 0.0
    losses: list = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 5,
                     batch_size: int = 64, lr: float = 0.05, momentum: float = 0.9,
                     weight_decay: float = 5e-4, seed: int = 0, progress: bool = False,
                     desc: str = "train", on_step=None, optimizer: str = "sgd") -> TrainLog:
    """SGD with momentum (or AdamW: `optimizer="adamw"`, the transformers' choice) and a cosine schedule;
    the batch order depends on `seed` only."""
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer {optimizer!r}: choose 'sgd' or 'adamw'")
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    log = TrainLog()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=True, disable=None)  # off without a TTY
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if hasattr(model, "regularization"):
                loss = loss + model.regularization()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            log.seconds += time.perf_counter() - t0
            log.steps += 1
            log.losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(model, log)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{log.losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    return log


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(x)
