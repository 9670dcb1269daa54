"""Each estimator against its formula, step by step, on a known tensor sequence."""
import math

import pytest
import torch

from qcompile.train.estimators import DSGC, CurrentMinMax, FixedRange, HindsightMinMax, RunningMinMax
from qcompile.core.grids import qrange

SEQ = [torch.tensor([-1.0, 2.0, 0.5]), torch.tensor([-3.0, 1.0]), torch.tensor([-0.5, 6.0]),
       torch.tensor([-2.0, 2.0])]


def mm(t):
    return t.min(), t.max()


@pytest.mark.parametrize("eta", [0.5, 0.9])
def test_running_minmax(eta):
    est = RunningMinMax(eta)
    q = None
    for g in SEQ:
        lo, hi, finite = est(g, update=True)
        m = mm(g)
        q = m if q is None else ((1 - eta) * m[0] + eta * q[0], (1 - eta) * m[1] + eta * q[1])
        assert finite and torch.equal(lo, q[0]) and torch.equal(hi, q[1])


@pytest.mark.parametrize("eta", [0.5, 0.9])
def test_hindsight_uses_the_range_known_before_the_step(eta):
    est = HindsightMinMax(eta)
    used = [est(g, update=True)[:2] for g in SEQ]
    # t = 0: the first batch initializes with its own min-max
    assert torch.equal(used[0][0], SEQ[0].min()) and torch.equal(used[0][1], SEQ[0].max())
    q = mm(SEQ[0])                                              # q^0
    for t in range(1, len(SEQ)):
        m = mm(SEQ[t - 1])                                      # statistics of G^(t-1)
        q = ((1 - eta) * m[0] + eta * q[0], (1 - eta) * m[1] + eta * q[1])
        assert torch.equal(used[t][0], q[0]) and torch.equal(used[t][1], q[1]), t
    # a range never depends on the tensor it quantizes
    assert used[2][1] < SEQ[2].max()
    assert est.static


@pytest.mark.parametrize("cls", [HindsightMinMax, RunningMinMax])
def test_all_zero_batches_leave_no_scale(cls):
    """The gradient behind a zero-initialized head is all zeros on the first steps: [0, 0] holds no scale,
    so the first non-zero batch sets the range as a first batch does (not 10 % of it), and the state of
    [0, 0] stays usable in eval."""
    est = cls(0.9)
    for _ in range(2):
        lo, hi, finite = est(torch.zeros(5), update=True)
        assert finite and lo == 0 and hi == 0
    assert est(torch.zeros(5), update=False)[:2] == (0, 0)            # eval: the [0, 0] state, no error
    g = torch.tensor([-3e-4, 1e-4, 2e-4])
    lo, hi, _ = est(g, update=True)
    assert lo == g.min() and hi == g.max()                            # quantized with its own range
    lo, hi, _ = est(torch.ones(3), update=True)
    if cls is HindsightMinMax:                                        # the range known before this step
        assert lo == g.min() and hi == g.max()
    assert torch.isclose(est.hi, 0.1 * 1 + 0.9 * g.max())             # then blended as usual


def test_current_minmax_is_dynamic():
    est = CurrentMinMax()
    for g in SEQ:
        lo, hi, _ = est(g, update=True)
        assert torch.equal(lo, g.min()) and torch.equal(hi, g.max())
    assert not est.static


def test_fixed_range():
    est = FixedRange(-1.5, 3.0)
    for g in SEQ:
        lo, hi, _ = est(g, update=True)
        assert (float(lo), float(hi)) == (-1.5, 3.0)


def _cos(x, alpha, est):
    return est._cosine(x, alpha * x.min(), alpha * x.max())


def test_dsgc_searches_every_interval_and_is_static_between():
    torch.manual_seed(0)
    est = DSGC(interval=2, qrange=qrange(4, False), symmetric=False)
    xs = [torch.randn(2000) * s for s in (1.0, 5.0, 0.2)]
    r0 = est(xs[0], update=True)[:2]
    r1 = est(xs[1], update=True)[:2]        # between searches: the range of step 0, unchanged
    r2 = est(xs[2], update=True)[:2]        # step 2: a new search on xs[2]
    assert torch.equal(r0[0], r1[0]) and torch.equal(r0[1], r1[1])
    assert not torch.equal(r2[1], r0[1])
    alpha = float(r2[1] / xs[2].max())
    best_grid = max(_cos(xs[2], a, est) for a in torch.linspace(0.01, 1.0, 200).tolist())
    assert _cos(xs[2], alpha, est) >= best_grid - 1e-3
    # 4-bit Gaussian data: clipping beats the full min-max range
    assert alpha < 1.0 and _cos(xs[2], alpha, est) > _cos(xs[2], 1.0, est)


def test_nonfinite_statistics_never_touch_the_state():
    est = HindsightMinMax(0.9)
    est(SEQ[0], update=True)
    before = (est.lo.clone(), est.hi.clone())
    lo, hi, finite = est(torch.tensor([1.0, math.nan]), update=True)
    assert not finite and int(est.nonfinite) == 1
    assert torch.equal(est.lo, before[0]) and torch.equal(est.hi, before[1])
    assert torch.equal(lo, before[0])       # the range used is the one known before the step


def test_eval_without_state_is_an_error():
    from qcompile import CalibrationError
    with pytest.raises(CalibrationError, match="calibrate"):
        HindsightMinMax(0.9)(SEQ[0], update=False)


def test_per_channel_state():
    est = HindsightMinMax(0.5, shape=(3,), axis=0)
    w = torch.arange(12.0).reshape(3, 4)
    lo, hi, _ = est(w, update=True)
    assert torch.equal(lo, torch.tensor([0.0, 4.0, 8.0])) and torch.equal(hi, torch.tensor([3.0, 7.0, 11.0]))
