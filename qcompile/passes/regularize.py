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

from qcompile.train.bn_rectification import add_bn_rectification
from qcompile.config import QConfig
from qcompile.errors import QCompileError
from qcompile.train.log_barrier import LogBarrier
from qcompile.passes.quantize import _module_type
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
    add_bn_rectification(gm, config)
    return gm
