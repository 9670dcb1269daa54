"""StochasticDepth: stochastic depth whose randomness follows the module's own mode.

torchvision calls `stochastic_depth(x, p, mode, self.training)`, so a trace bakes the mode in as a
constant. `normalize` replaces such a call (one traced with the model's mode) by this module, which
calls the same function with `self.training`: it drops paths after `qm.train()` and is the identity
after `qm.eval()`, with the float model's numbers in both.
"""
from __future__ import annotations

from torch import nn


class StochasticDepth(nn.Module):
    def __init__(self, fn, p: float, mode: str):
        super().__init__()
        self.fn, self.p, self.mode = fn, float(p), mode

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}"

    def forward(self, x):
        return self.fn(x, self.p, self.mode, self.training)
