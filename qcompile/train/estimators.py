"""Range estimators: where a quantizer's [lo, hi] comes from.

Each estimator keeps its whole state in buffers (`lo`, `hi`, `initialized`, `nonfinite`,
and `step` for DSGC), so `state_dict()` restores it exactly. `forward(x, update)` returns
the range to quantize `x` with, and, when `update` is true, folds the statistics of `x`
into the state. Statistics that are not finite never touch the state: the update is
skipped, `nonfinite` is incremented, and `forward` reports it through `finite=False`.

A state of [0, 0] (every value seen so far was 0: the gradient behind a zero-initialized
classifier head, a ReLU dead on the first batch) holds no scale: the running and in-hindsight
estimators treat it as no state yet, so the first batch with a non-zero value sets the range
as the first batch does (blending it into [0, 0] would leave a grid far too fine, which
saturates every later value and, for gradients, every layer below it; the state stays
usable in eval).

Under torch.distributed, batch statistics are all-reduced (min of mins, max of maxes) so
every rank quantizes with the same range.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from qcompile.core.grids import qparams, quantize_codes
from qcompile.errors import CalibrationError
from qcompile.train.one_pass import one_pass


def minmax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `x` (per slice along `axis` when given), in float32."""
    x = x.detach()
    if axis is None:
        lo, hi = torch.aminmax(x)
    elif x.dim() == 1:          # one value per slice
        lo, hi = x, x
    elif axis % x.dim() == 0 and (lib := one_pass(x)) is not None:   # rows (weights): one pass of C
        lo, hi = torch.empty(x.shape[0]), torch.empty(x.shape[0])
        lib.qc_minmax_rows(x.data_ptr(), x.shape[0], x.numel() // x.shape[0], lo.data_ptr(), hi.data_ptr())
    else:                       # amin + amax over the other dims: several times faster than aminmax(dim=)
        dims = [d for d in range(x.dim()) if d != axis % x.dim()]
        lo, hi = x.amin(dims), x.amax(dims)
    return lo.float(), hi.float()


def distributed() -> bool:
    """True under torch.distributed with more than one rank: statistics are then reduced over ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_minmax(lo: torch.Tensor, hi: torch.Tensor) -> None:
    """lo ← min over ranks, hi ← max over ranks, in place, as one all-reduce (max(hi) = −min(−hi), exact)."""
    if distributed():
        both = torch.cat([lo.reshape(-1), hi.reshape(-1).neg()])
        dist.all_reduce(both, op=dist.ReduceOp.MIN)
        lo.copy_(both[:lo.numel()].view_as(lo))
        hi.copy_(both[lo.numel():].neg().view_as(hi))


def require(ok: torch.Tensor, error: type[Exception], message: str) -> None:
    """Raise `error(message)` unless the boolean tensor `ok` holds. Eager: at once. Under torch.compile,
    where a data-dependent branch would break the graph: an assertion op in the graph, which raises a
    RuntimeError with the same message when the step runs."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise error(message)


def select(cond, if_true, if_false):
    """if_true() where the 0-d boolean `cond` holds, else if_false() (tuples of tensors elementwise).
    Eager: a branch, so only the chosen side is computed. Under torch.compile: torch.where of both
    sides, no data-dependent branch in the graph. The one way state-dependent choices are made here."""
    if not torch.compiler.is_compiling():
        return if_true() if bool(cond) else if_false()
    a, b = if_true(), if_false()
    if isinstance(a, tuple):
        return tuple(torch.where(cond, u, v) for u, v in zip(a, b))
    return torch.where(cond, a, b)


class RangeEstimator(nn.Module):
    """Base class. `static` is True when the range used at step t is known before step t.

    `forward` returns (lo, hi, finite) with `finite` a boolean tensor, and updates the state only
    through `_set(lo, hi, finite)`; its choices go through `select`: the running, in-hindsight,
    current and fixed estimators have no data-dependent Python branch under torch.compile, which
    traces them whole."""

    name = "base"
    static = False

    def __init__(self, shape: tuple[int, ...] = (), axis: int | None = None, sync: bool = True):
        super().__init__()
        self.axis = axis
        self.sync = sync
        self.register_buffer("lo", torch.zeros(shape))
        self.register_buffer("hi", torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("nonfinite", torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"{self.name}, {'static' if self.static else 'dynamic'}"

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(min, max, finite) of x, reduced over ranks; counts a non-finite batch in `nonfinite`."""
        lo, hi = minmax(x, self.axis)
        if self.sync:
            _all_reduce_minmax(lo, hi)
        finite = ((lo > -math.inf) & (hi < math.inf)).all()   # lo ≤ hi: so both are finite (a NaN compares false)
        self.nonfinite.add_(finite.logical_not())
        return lo, hi, finite

    def stored(self, who: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored range (finite); CalibrationError when there is none yet."""
        require(self.initialized, CalibrationError,
                f"{who or 'quantizer'}: the {self.name} estimator has no range yet; run "
                "qm.calibrate(batches) or train a few steps before using it in eval mode")
        return self.lo.clone(), self.hi.clone(), self.initialized.clone()

    def unset(self) -> torch.Tensor | bool:
        """No state yet, or only [0, 0] (see the module docstring): a boolean tensor under torch.compile;
        in eager, where the caller branches on it at once, a bool (read in fewer ops)."""
        if torch.compiler.is_compiling():
            return self.initialized.logical_not() | ((self.lo == 0).all() & (self.hi == 0).all())
        return not bool(self.initialized) or not any(bool(t) if t.dim() == 0 else bool(t.any()) for t in (self.lo, self.hi))

    def _set(self, lo: torch.Tensor, hi: torch.Tensor, finite: torch.Tensor) -> None:
        """State ← [lo, hi] where `finite` holds; untouched where it does not."""
        lo, hi = select(finite, lambda: (lo, hi), lambda: (self.lo, self.hi))
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        self.initialized.logical_or_(finite)

    def forward(self, x: torch.Tensor, update: bool, who: str = ""):
        raise NotImplementedError


class CurrentMinMax(RangeEstimator):
    """Dynamic: the range of the tensor being quantized. `lo`/`hi` hold the last one seen."""

    name = "current"

    def forward(self, x, update, who=""):
        lo, hi, finite = self.stats(x)
        if update:
            self._set(lo, hi, finite)
        return lo, hi, finite


class RunningMinMax(RangeEstimator):
    """Dynamic: q^t = (1-η)·minmax(G^t) + η·q^(t-1); q^0 = minmax(G^0). Frozen when not updating."""

    name = "running"

    def __init__(self, momentum: float, **kw):
        super().__init__(**kw)
        self.momentum = momentum

    def forward(self, x, update, who=""):
        if not update:
            return self.stored(who)
        lo, hi, finite = self.stats(x)
        eta = self.momentum
        self._set(*select(self.unset(), lambda: (lo, hi),
                          lambda: ((1 - eta) * lo + eta * self.lo, (1 - eta) * hi + eta * self.hi)), finite)
        return self.lo.clone(), self.hi.clone(), finite


class HindsightMinMax(RangeEstimator):
    """Static: step t is quantized with q^t = (1-η)·minmax(G^(t-1)) + η·q^(t-1), the range
    known before G^t is seen; G^t's statistics then update the state for step t+1. The
    first batch (the first with a non-zero value) initializes the state with its own min-max
    and is quantized with it."""

    name = "hindsight"
    static = True

    def __init__(self, momentum: float, **kw):
        super().__init__(**kw)
        self.momentum = momentum

    def forward(self, x, update, who=""):
        if not update:
            return self.stored(who)
        lo, hi, finite = self.stats(x)
        eta = self.momentum
        use_lo, use_hi, new_lo, new_hi = select(
            self.unset(), lambda: (lo, hi, lo, hi),
            lambda: (self.lo.clone(), self.hi.clone(), (1 - eta) * lo + eta * self.lo, (1 - eta) * hi + eta * self.hi))
        self._set(new_lo, new_hi, finite)
        return use_lo, use_hi, finite


class DSGC(RangeEstimator):
    """Direction-sensitive gradient clipping: every `interval` updates (the first included),
    a golden-section search picks α ∈ [α_min, 1] maximizing cos(x, Q(x; α·minmax(x)));
    the range α·minmax(x) is then used, unchanged (static), until the next search."""

    name = "dsgc"
    static = True
    alpha_min = 0.01
    search_iters = 20

    def __init__(self, interval: int, qrange: tuple[int, int], symmetric: bool, **kw):
        super().__init__(**kw)
        self.interval = interval
        self.qrange = qrange
        self.symmetric = symmetric
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))

    def _cosine(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> float:
        scale, zp = qparams(lo, hi, self.qrange, self.symmetric)
        xq = (quantize_codes(x, scale, zp, self.qrange) - zp) * scale
        return float(torch.nn.functional.cosine_similarity(x.flatten(), xq.flatten(), dim=0))

    def search(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> float:
        """The α in [alpha_min, 1] that maximizes the cosine similarity (golden section)."""
        x = x.detach().float()
        inv_phi = (math.sqrt(5) - 1) / 2
        a, b = self.alpha_min, 1.0
        c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
        fc, fd = self._cosine(x, c * lo, c * hi), self._cosine(x, d * lo, d * hi)
        for _ in range(self.search_iters):
            if fc > fd:
                b, d, fd = d, c, fc
                c = b - inv_phi * (b - a)
                fc = self._cosine(x, c * lo, c * hi)
            else:
                a, c, fc = c, d, fd
                d = a + inv_phi * (b - a)
                fd = self._cosine(x, d * lo, d * hi)
        return (a + b) / 2

    @torch.compiler.disable   # the search is Python control flow on measured cosines: runs eagerly
    def forward(self, x, update, who=""):
        if not update:
            return self.stored(who)
        finite = self.initialized.new_ones(())
        if int(self.step) % self.interval == 0 or not bool(self.initialized):
            lo, hi, finite = self.stats(x)
            if bool(finite):
                alpha = self.search(x, lo, hi)
                self._set(alpha * lo, alpha * hi, finite)
        self.step += 1
        return self.lo.clone(), self.hi.clone(), finite


class FixedRange(RangeEstimator):
    """Static: a user-given range that never changes."""

    name = "fixed"
    static = True

    def __init__(self, lo: float, hi: float, **kw):
        super().__init__(**kw)
        self._set(torch.full_like(self.lo, lo), torch.full_like(self.hi, hi), torch.tensor(True))

    def forward(self, x, update, who=""):
        return self.lo.clone(), self.hi.clone(), self.initialized.clone()


def make_estimator(kind: str, *, momentum: float, interval: int, fixed: tuple[float, float] | None,
                   qrange: tuple[int, int], symmetric: bool, shape=(), axis=None, sync=True) -> RangeEstimator:
    """Build the estimator named `kind` (one of QConfig's estimator names)."""
    kw = dict(shape=shape, axis=axis, sync=sync)
    if kind == "current":
        return CurrentMinMax(**kw)
    if kind == "running":
        return RunningMinMax(momentum, **kw)
    if kind == "hindsight":
        return HindsightMinMax(momentum, **kw)
    if kind == "dsgc":
        return DSGC(interval, qrange, symmetric, **kw)
    if kind == "fixed":
        return FixedRange(*fixed, **kw)
    raise ValueError(f"unknown range estimator {kind!r}")
