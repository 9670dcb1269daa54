"""Modules whose behaviour follows the graph module's mode (qm.train() / qm.eval()), standing for
what a trace in train mode bakes in as a constant.

StochasticDepth: torchvision calls `stochastic_depth(x, p, mode, self.training)`, so a trace bakes
the mode in. `normalize` replaces such a call (one traced with the model's mode) by this module,
which calls the same function with `self.training`: it drops paths after `qm.train()` and is the
identity after `qm.eval()`, with the float model's numbers in both.

EvalOutput: a model that returns more in training than in eval (GoogLeNet's and Inception's
auxiliary heads: a namedtuple in train mode, the logits in eval). `trace` puts it before the
graph's output when the float model's eval output is one field of the traced output: it passes
the whole output through in training and that field in eval, and lowering keeps only what that
field needs.
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


class EvalOutput(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index = int(index)

    def extra_repr(self) -> str:
        return f"eval: field {self.index}"

    def forward(self, outputs):
        return outputs if self.training else outputs[self.index]
