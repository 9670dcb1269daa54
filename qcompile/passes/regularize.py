"""Pass `regularize`: register the training loss terms in `gm.regularizers`.

Invariant after this pass: `gm.regularizers` (what `qm.regularization()` sums) holds
  "log_barrier" — a `qcompile.train.log_barrier.LogBarrier` over every accumulator op
                  (`<layer>.accumulator`) whose layer config has `log_barrier=True`,
  "bn_rectification" — a `qcompile.train.bn_rectification.BNRectificationLoss` over every folded
                  BatchNorm whose config has `bn_rectification` > 0 (and a gradient to rectify),
and nothing when no term is enabled. Each term is a module whose forward() takes no
argument and returns a scalar.
"""
from __future__ import annotations

from torch import fx

from qcompile.config import QConfig
from qcompile.errors import QCompileError, VerificationError
from qcompile.passes.quantize import _module_type
from qcompile.train.bn_rectification import BNRectificationLoss, add_bn_rectification
from qcompile.train.fused_bn import BatchNormFold
from qcompile.train.log_barrier import LogBarrier
from qcompile.train.tiled import NarrowAccOp


def regularize(gm: fx.GraphModule, config: QConfig) -> fx.GraphModule:
    ops = [op for _, op in gm.named_modules() if isinstance(op, NarrowAccOp) and op.acc_bits is not None
           and config.for_layer(op.layer, _module_type(gm, op.layer)).log_barrier]
    if ops:
        for op in ops:
            op.track_exact = True
        gm.regularizers["log_barrier"] = LogBarrier(ops, config.barrier_weight, config.barrier_bound_weight,
                                                    config.barrier_t0, config.barrier_growth,
                                                    config.barrier_interval)
    elif config.log_barrier:
        raise QCompileError("QConfig.log_barrier=True but no layer has a narrow accumulator: the barrier keeps "
                            "an acc_bits-bit accumulator from overflowing; set acc_bits (or disable log_barrier)")
    add_bn_rectification(gm)
    return gm


def verify(gm: fx.GraphModule, config: QConfig) -> None:
    """Raise VerificationError unless gm.regularizers holds exactly the terms the config asks for:
    "log_barrier" over exactly the accumulator ops with acc_bits whose layer sets log_barrier, and
    "bn_rectification" over exactly the folded BatchNorms with λ > 0 that pass a gradient on."""
    barrier = [op for _, op in gm.named_modules() if isinstance(op, NarrowAccOp) and op.acc_bits is not None
               and config.for_layer(op.layer, _module_type(gm, op.layer)).log_barrier]
    rectified = [name for name, m in gm.named_modules() if isinstance(m, BatchNormFold) and m.propagates_gradient
                 and config.for_layer(name, BatchNormFold).bn_rectification > 0]
    expected = {"log_barrier": (LogBarrier, sorted(id(op) for op in barrier)),
                "bn_rectification": (BNRectificationLoss, sorted(rectified))}
    expected = {k: v for k, v in expected.items() if v[1]}
    terms = dict(getattr(gm, "regularizers", {}).items())
    for name in sorted(terms.keys() | expected.keys()):
        where = f"verify after pass 'regularize': gm.regularizers[{name!r}]"
        if name not in terms:
            raise VerificationError(f"{where} is missing; the config asks for it over {len(expected[name][1])} layer(s)")
        if name not in expected:
            raise VerificationError(f"{where} ({type(terms[name]).__name__}) is a term the config does not ask for")
        kind, members = expected[name]
        term = terms[name]
        got = None if not isinstance(term, kind) else \
            sorted(id(op) for op in term.ops) if name == "log_barrier" else sorted(n for n, _ in term.blocks)
        if got != members:
            layers = [op.layer for op in barrier] if name == "log_barrier" else members
            raise VerificationError(f"{where} ({type(term).__name__}): expected a {kind.__name__} over exactly "
                                    f"the layers {layers}")
