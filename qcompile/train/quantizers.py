"""Quantizer primitives and the Quantizer module (Q_W, Q_Y and Q_G of the paper, fig. 1).

The grid and its rounding rules are written once, in `qcompile.core.grids`:
code(x) = clamp(round_half_even(x · (1/scale)) + z, qmin, qmax); x̂ = (code − z)·scale.

Forward quantizers use torch's fused fake-quantize kernel per tensor (eager) and `_FakeQuant`
otherwise, whose rounding is exactly `code()` above, with the straight-through estimator: gradient 1 inside the grid, 0 where
the input was clamped. Gradient quantizers are identity in the forward pass and quantize
the incoming gradient in the backward pass, with stochastic rounding
floor(g/scale + u) (u uniform on the 2^16 levels (k + ½)/2^16: unbiased to within 2^-17 of a
step) or round-half-even. In eager mode, per-row (dim 0) fake quant and the stochastic codes of
float32 CPU tensors run in one pass of C (csrc/fake_quant.c) that gives the torch expressions'
results bit for bit; a hindsight quantizer past its first batch, whose grid is known before the
tensor is seen, quantizes it in the same pass that measures its range, and a symmetric per-channel
current min-max weight quantizer quantizes each row right after measuring it, both calls also setting
the estimator's and the grid's buffers (`_one_call`).
"""
from __future__ import annotations

import ctypes
import math

import torch
from torch import nn
from torch.autograd.graph import increment_version

from qcompile.core.accumulator import overflow_free_scale
from qcompile.core.grids import (
    any_nonzero,
    bias_codes,
    broadcast_along,
    dither_key,
    max_code_magnitude,
    qparams,
    qrange,
    register_generator,
    stochastic_codes,
    unclamped_codes,
)
from qcompile.errors import NonFiniteError
from qcompile.train.estimators import CurrentMinMax, HindsightMinMax, RangeEstimator, distributed, require, select
from qcompile.train.one_pass import (
    MASK_INSIDE,
    MASK_POSITIVE,
    QC_CLIPPED,
    QC_FINITE,
    QC_UNSET,
    RELU_AFTER,
    RELU_BEFORE,
    QuantizerState,
    one_pass,
)
from qcompile.train.reused_storage import ReusedStorage

KINDS = ("weight", "activation", "gradient")
RELU_PLACES = {None: 0, "before": RELU_BEFORE, "after": RELU_AFTER}   # a quantizer call's relu= (the C step's flag)


def _masked(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """g · mask (a bool mask of g's shape): a fake quant's straight-through gradient, in one pass of C
    (csrc/fake_quant.c qc_masked, torch's bits) where g is a contiguous float32 CPU tensor in eager mode and
    no graph of the backward is recorded (torch converts the mask to float first: two passes)."""
    lib = one_pass(g) if mask.is_contiguous() and not torch.is_grad_enabled() else None
    if lib is None:
        return g * mask
    out = torch.empty_like(g)
    lib.qc_masked(g.data_ptr(), mask.data_ptr(), out.data_ptr(), g.numel())
    return out


class _FakeQuant(torch.autograd.Function):
    """(code(x) - z)·scale, `scale` and `zp` broadcast against x; gradient 1 where x was inside the
    grid, else 0. (torch's per-channel fused kernel is not vectorized on CPU; this is, with equal
    results. Its per-tensor kernel has no fake-tensor form, so torch.compile traces this one instead.)"""

    @staticmethod
    def forward(ctx, x, scale, zp, qr, can_clip):
        ctx.can_clip = can_clip
        rows = (x.shape[0],) + (1,) * (x.dim() - 1) if x.dim() else None
        lib = one_pass(x) if scale.shape == rows and zp.shape == rows else None
        if lib is not None:                      # per row of dim 0 (weights, axis 0): one pass
            v = torch.empty_like(x)
            mask = torch.empty(x.shape, dtype=torch.bool) if can_clip else None
            s = scale.to(torch.float32).contiguous()
            inv = 1.0 / s                        # held: the kernel reads it
            z = zp.to(torch.float32).contiguous() if any_nonzero(zp) else None
            lib.qc_fake_quant_rows(x.data_ptr(), v.data_ptr(), None if mask is None else mask.data_ptr(), x.shape[0],
                                   x.numel() // max(x.shape[0], 1), inv.data_ptr(), s.data_ptr(),
                                   None if z is None else z.data_ptr(), qr[0], qr[1])
            if can_clip:
                ctx.save_for_backward(mask)
            return v
        v = unclamped_codes(x, scale, zp)
        if can_clip:
            ctx.save_for_backward((v >= qr[0]) & (v <= qr[1]))
        v.clamp_(*qr)
        if any_nonzero(zp):
            v.sub_(zp)
        return v.mul_(scale)

    @staticmethod
    def backward(ctx, g):
        if ctx.can_clip:
            g = _masked(g, ctx.saved_tensors[0])
        return g, None, None, None, None


def _masked_rectified(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The gradient of a fake quant and a relu together from a rectified step's two-bit mask: torch's
    threshold_backward and product by the fake quant's mask, in one pass of C (csrc/fake_quant.c
    qc_masked_rectified) where g is a contiguous float32 CPU tensor and no graph of the backward is recorded."""
    lib = one_pass(g) if not torch.is_grad_enabled() else None
    if lib is None:
        return torch.where(mask & MASK_POSITIVE != 0, g * (mask & MASK_INSIDE), torch.zeros((), dtype=g.dtype))
    out = torch.empty_like(g)
    lib.qc_masked_rectified(g.data_ptr(), mask.data_ptr(), out.data_ptr(), g.numel())
    return out


class _FakeQuantHindsight(torch.autograd.Function):
    """A hindsight quantizer's one-pass step on a forward tensor (csrc/fake_quant.c qc_fake_quant_hindsight, on
    `state`'s buffers): torch.fake_quantize_per_tensor_affine(x, scale, zp, *qr) on the stored range's grid (the
    same bits and gradient mask), the state then advanced by x's range; the step's status goes to `status`.
    Where no value was clipped the mask is all ones and the backward passes the gradient as it is. `relu`
    (RELU_BEFORE / RELU_AFTER, or 0): the same step with torch.relu before or after it, its gradient too."""

    @staticmethod
    def forward(ctx, x, lib, state, status, relu):
        out = torch.empty_like(x)
        mask = torch.empty(x.shape, dtype=torch.uint8 if relu else torch.bool) if ctx.needs_input_grad[0] else None
        status.value = lib.qc_fake_quant_hindsight(ctypes.byref(state), x.data_ptr(), out.data_ptr(),
                                                   None if mask is None else mask.data_ptr(), x.numel(), relu)
        ctx.relu, ctx.clipped = relu, bool(status.value & QC_CLIPPED)
        if mask is not None and (relu or ctx.clipped):
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.relu:
            g = _masked_rectified(g, ctx.saved_tensors[0])
        elif ctx.clipped:
            g = _masked(g, ctx.saved_tensors[0])
        return g, None, None, None, None


class _FakeQuantCurrentRows(torch.autograd.Function):
    """A symmetric per-row current min-max quantizer's training step on a weight (csrc/fake_quant.c
    qc_fake_quant_rows_current, on `state`'s buffers): each row on its own range's grid, the bits of the
    estimator, qparams and _FakeQuant (a grid that covers its row: the gradient passes as it is); the step's
    status goes to `status`. The output is written into `storage` (a ReusedStorage)."""

    @staticmethod
    def forward(ctx, x, lib, state, status, storage):
        out, stats = storage.empty_like(x), torch.empty(3 * x.shape[0])
        status.value = lib.qc_fake_quant_rows_current(ctypes.byref(state), x.data_ptr(), out.data_ptr(), x.shape[0],
                                                      x.numel() // x.shape[0], stats.data_ptr())
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qr: tuple[int, int],
               axis: int | None = None, can_clip: bool = True) -> torch.Tensor:
    """x̂ = (code(x) - z)·scale with the straight-through estimator (clipped). `can_clip=False`
    promises the grid covers x (a min-max range of x itself), so the gradient mask is all ones."""
    if axis is None and not torch.compiler.is_compiling():
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zp.to(torch.int32), *qr)
    return _FakeQuant.apply(x, broadcast_along(scale, x, axis), broadcast_along(zp, x, axis), qr, can_clip)


def stochastic_fake_quant(g: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qr: tuple[int, int],
                          generator: torch.Generator | None = None, times_scale: bool = True) -> torch.Tensor:
    """(clamp(floor(g/scale + u) + z) - z)·scale: stochastic_codes on the grid (times_scale=False: the
    codes minus z, stochastic_codes itself). Per-tensor grids of float32 CPU tensors in one pass."""
    lib = one_pass(g) if scale.numel() == 1 else None
    if lib is None:
        codes = stochastic_codes(g, scale, zp, qr, generator)
        return codes.mul_(scale) if times_scale else codes
    out, z = torch.empty_like(g), float(zp)
    lib.qc_stochastic_codes(g.data_ptr(), out.data_ptr(), g.numel(), int(dither_key(generator, g)), float(scale),
                            qr[0] - z, qr[1] - z, int(times_scale), None, 0, 1, None)
    return out


def _stochastic_codes_hindsight(lib: ctypes.CDLL, state: QuantizerState, status: ctypes.c_int, g: torch.Tensor,
                                generator, times_scale: bool, mult: torch.Tensor | None = None,
                                axis: int | None = None) -> torch.Tensor:
    """A hindsight quantizer's one-pass step on x = g (or g·mult, one multiplier per index of `axis`, as torch
    multiplies; csrc/fake_quant.c qc_stochastic_codes_hindsight, on `state`'s buffers): stochastic_fake_quant of x
    on the stored range's grid, the state then advanced by x's range; the step's status goes to `status`."""
    m, inner, channels = None, 0, 1
    if mult is not None:
        channels, inner = g.shape[axis], math.prod(g.shape[axis + 1:])
        m = mult.to(torch.float32).reshape(-1).expand(channels).contiguous()
    out = torch.empty_like(g)
    status.value = lib.qc_stochastic_codes_hindsight(ctypes.byref(state), g.data_ptr(), out.data_ptr(), g.numel(),
                                                     int(dither_key(generator, g)), int(times_scale),
                                                     None if m is None else m.data_ptr(), inner, channels)
    return out


class _Replace(torch.autograd.Function):
    """Forward: the second argument; backward: the gradient goes to the first, unchanged."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, g):
        return g, None


class BiasQuant(nn.Module):
    """Rounds a layer's bias onto the grid S_x·S_w its integer form adds it on (straight-through
    gradient), so the trained graph in eval mode adds the bias the integer runtimes add: exactly
    (codes·scale formed in float64, then cast to the bias dtype: exact in a float64 graph, and in
    float32 while |codes| < 2^24). Off (`enabled=False`) it passes the bias through; `float_by_config`
    (the layer's weights or input stay float): always off, not a switch."""

    def __init__(self, layer: str = "", float_by_config: bool = False):
        super().__init__()
        self.layer = layer
        self.float_by_config = float_by_config
        self.enabled = not float_by_config

    def forward(self, bias: torch.Tensor | None, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled or bias is None:     # None: a folded bias this forward does not form
            return bias
        codes, scale = bias_codes(bias.detach(), input_scale, weight_scale)
        return _Replace.apply(bias, (codes * scale.double()).to(bias.dtype))


class _QuantizeGradient(torch.autograd.Function):
    """Identity forward; the backward pass hands the incoming gradient to a Quantizer. The output is
    a view of x, except under torch.compile: there a view that leaves a compiled graph (at a graph
    break) is rebuilt from its base outside the graph, which would bypass this backward; a copy is not."""

    @staticmethod
    def forward(ctx, x, quantizer):
        ctx.quantizer = quantizer
        return x.clone() if torch.compiler.is_compiling() else x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.quantizer.quantize_gradient(g), None


class Quantizer(nn.Module):
    """One quantizer node: kind (weight / activation / gradient), bits, grid and estimator.

    `scale` and `zero_point` buffers hold the grid of the last tensor quantized (what an
    export of a static quantizer uses). `enabled=False` turns quantization off; with
    `observing=True` as well, the estimator still updates (calibration). `float_by_config=True`
    (QConfig `quantize_weights` / `quantize_activations` false): the tensor stays float; the
    quantizer is off and is not one of the model's switches, so nothing turns it on.
    A call with `relu="before"` / `"after"` (an activation quantizer's graph node, where the fuse_relu
    pass put a relu it took the place of) is Q(relu(x)) / relu(Q(x)) in every mode; a training step on
    the one-pass path does both in one pass forward and one backward.
    """

    def __init__(self, kind: str, bits: int, symmetric: bool, estimator: RangeEstimator,
                 axis: int | None = None, pow2: bool = False, stochastic: bool = False,
                 on_nonfinite: str = "raise", layer: str = "", generator: torch.Generator | None = None,
                 float_by_config: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Quantizer kind {kind!r}: choose one of {KINDS}")
        self.kind, self.bits, self.symmetric, self.axis = kind, bits, symmetric, axis
        self.qrange = qrange(bits, symmetric)
        self.pow2, self.stochastic, self.on_nonfinite = pow2, stochastic, on_nonfinite
        self.layer = layer
        self.generator = generator
        register_generator(generator)
        self.estimator = estimator
        self.float_by_config = float_by_config
        self.enabled = not float_by_config
        self.observing = False
        shape = tuple(estimator.lo.shape)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_kept_state", None)       # pointers into this object's buffers
        state.pop("_kept_output", None)      # the storage of an output
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        register_generator(self.generator)   # a copy's generator is a new object

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else "asymmetric"
        per = f", per_channel(axis={self.axis})" if self.axis is not None else ""
        return f"{self.kind}, {self.bits} bits, {grid}{per}"

    def grid(self, lo: torch.Tensor, hi: torch.Tensor):
        return qparams(lo, hi, self.qrange, self.symmetric, self.pow2)

    def _check_finite(self, finite: torch.Tensor, where: str) -> None:
        if self.on_nonfinite == "raise":
            require(finite, NonFiniteError,
                    f"{self.kind} quantizer of layer {self.layer!r}: NaN or Inf in the {where}; "
                    "the range state was left untouched (set on_nonfinite='skip' to pass such tensors through)")

    def _keep_grid(self, grid, finite: torch.Tensor):
        """The buffers ← grid() = (scale, zp) where `finite` holds (else they keep the last grid; eager does
        not compute grid() then); returns the buffers' grid."""
        scale, zp = select(finite, grid, lambda: (self.scale, self.zero_point))
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        return self.scale, self.zero_point

    def _passed_through(self, q, x, finite: torch.Tensor) -> torch.Tensor:
        """q(), or x() where the tensor was not finite and on_nonfinite='skip' (callables: eager computes one)."""
        return q() if self.on_nonfinite == "raise" else select(finite, q, x)

    def commutes_with_row_scaling(self) -> bool:
        """Q(x·d) = Q(x)·d for every x and every nonzero d per row (dim 0), in exact arithmetic: off by config,
        or a plain symmetric per-row current min-max quantizer with no power-of-two step (each row's step
        scales with |d| and its codes with the sign of d)."""
        est = self.estimator
        return self.float_by_config or (type(self) is Quantizer and self.axis == 0 and self.symmetric and not self.pow2
                                        and type(est) is CurrentMinMax and est.axis == 0)

    def forward_grid(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *context):
        """(scale, zero_point) a forward tensor `x` with range [lo, hi] is quantized on: `grid(lo, hi)`."""
        return self.grid(lo, hi)

    def forward(self, x: torch.Tensor, *context, relu: str | None = None) -> torch.Tensor:
        """Q(x), or with `relu` "before" / "after" Q(relu(x)) / relu(Q(x)); `context` (the graph's further
        inputs of this node) goes to `forward_grid`."""
        if relu not in RELU_PLACES or relu and self.kind != "activation":
            raise ValueError(f"{self.kind} quantizer of layer {self.layer!r}: relu={relu!r}; an activation "
                             f"quantizer takes one of {sorted(p for p in RELU_PLACES if p)} or None, others None")
        if self.kind == "gradient":
            if self.enabled and self.training and torch.is_grad_enabled() and x.requires_grad:
                return _QuantizeGradient.apply(x, self)
            return x
        if self.enabled and self.training and type(self).forward_grid is Quantizer.forward_grid:
            if self.axis is None:
                fused = RELU_PLACES[relu]
                step = lambda lib, state, status: _FakeQuantHindsight.apply(x, lib, state, status, fused)  # noqa: E731
            else:   # a weight's copy, made anew each step: its storage is kept
                storage = self.__dict__.get("_kept_output")
                if storage is None:
                    storage = self.__dict__["_kept_output"] = ReusedStorage()
                step = lambda lib, state, status: _FakeQuantCurrentRows.apply(x, lib, state, status, storage)  # noqa: E731
            one = self._one_call(x, "forward tensor", step)
            if one is not None:   # (out, finite); x not finite (on_nonfinite="skip"): passed through, relu applied
                return one[0] if bool(one[1]) else torch.relu(x) if relu else x
        if relu == "before":
            x = torch.relu(x)
        out = self._quantized(x, context)
        return torch.relu(out) if relu == "after" else out

    def _quantized(self, x: torch.Tensor, context: tuple) -> torch.Tensor:
        """Q(x) by the estimator, grid and fake quant in torch (the off and observing switches included)."""
        if not self.enabled:
            if self.observing:
                self.estimator(x, update=True, who=self.layer)
            return x
        lo, hi, finite = self.estimator(x, update=self.training, who=self.layer)
        self._check_finite(finite, "forward tensor")
        scale, zp = self._keep_grid(lambda: self.forward_grid(x, lo, hi, *context), finite)
        return self._passed_through(
            lambda: fake_quant(x, scale, zp, self.qrange, self.axis, can_clip=not isinstance(self.estimator, CurrentMinMax)),
            lambda: x, finite)

    def _gradient_grid(self, g: torch.Tensor) -> torch.Tensor:
        """Set the grid from the incoming gradient's range; returns whether g was finite (the grid is
        kept when it was not, on_nonfinite='skip')."""
        lo, hi, finite = self.estimator(g, update=True, who=self.layer)
        self._check_finite(finite, "incoming gradient")
        self._keep_grid(lambda: self.grid(lo, hi), finite)
        return finite

    def _one_call(self, x: torch.Tensor, where: str, quantize, generator: torch.Generator | None = None):
        """Q(x) in one call of C (csrc/fake_quant.c) that also updates the estimator and the grid buffers as
        the torch path does (the same state, grid and result, tested bit for bit), where the grid allows it:
        a per-tensor hindsight range once one is stored (the grid known before x is seen: one pass; before, the
        C step reports the state unset and does nothing), or a
        symmetric per-row (axis 0) current min-max range (each row's range, then the row on its grid while in
        cache); pow2 off, float32 CPU tensors, eager, not under torch.distributed (whose statistics are
        all-reduced between the pass and the update). `quantize(lib, state, status)` runs the step on this
        quantizer's buffers (`state`) and returns the output; its status goes to `status`. (out, finite), or
        None where it does not apply. `generator` (the one `quantize` draws from) is left as it was when x was
        not finite or no range was stored."""
        est = self.estimator
        hindsight = type(est) is HindsightMinMax and est.axis is None and self.axis is None
        rows = (type(est) is CurrentMinMax and est.axis == 0 and self.axis == 0 and self.symmetric and x.dim() > 1
                and est.lo.numel() == x.shape[0])
        if not ((hindsight or rows) and x.numel() and not self.pow2) or distributed():
            return None
        lib = one_pass(x)
        state = None if lib is None else self._one_call_state(est)
        if state is None:
            return None
        drawn = None if generator is None else generator.get_state()
        status = ctypes.c_int()
        out = quantize(lib, state, status)
        if status.value & QC_UNSET:               # no stored range yet (hindsight): nothing was done
            if drawn is not None:
                generator.set_state(drawn)
            return None
        increment_version(list(state.tensors))    # written in place, as copy_ would
        finite = bool(status.value & QC_FINITE)
        if not finite:
            if drawn is not None:
                generator.set_state(drawn)
            self._check_finite(finite, where)
        return out, finite

    def _one_call_state(self, est: RangeEstimator) -> QuantizerState | None:
        """The QuantizerState of this quantizer's buffers and grid, or None where a buffer is not a CPU tensor of
        the kernels' dtype. Kept between calls (a cache, not state: dropped from copies) while the buffers' data,
        the momentum, the code range and the symmetry are those it was made from."""
        b, own = est._buffers, self._buffers     # read as est.lo, ..., self.scale are: the modules' buffer tables
        buffers = (b["lo"], b["hi"], b["initialized"], b["nonfinite"], own["scale"], own["zero_point"])
        key = (tuple(t.data_ptr() for t in buffers), getattr(est, "momentum", 0.0), self.qrange, self.symmetric)
        kept = self.__dict__.get("_kept_state")
        if kept is not None and kept[0] == key:
            return kept[1]
        if any(not t.is_cpu for t in buffers) or any(t.dtype != torch.float32 for t in buffers[:2] + buffers[4:]):
            return None
        state = QuantizerState.of(buffers, key[1], self.qrange, self.symmetric)
        self.__dict__["_kept_state"] = (key, state)
        return state

    def _gradient_one_pass(self, g: torch.Tensor, times_scale: bool, mult=None, axis=None):
        """Stochastic codes of x = g (or g·mult along `axis`) by `_one_call`: (out, finite) or None."""
        if not self.stochastic:
            return None
        return self._one_call(g, "incoming gradient", lambda lib, state, status: _stochastic_codes_hindsight(
            lib, state, status, g, self.generator, times_scale, mult, axis),
            self.generator if self.generator is not None else torch.default_generator)

    def quantize_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """Q_G(g) on a grid set from g's range (g itself when it is not finite and on_nonfinite='skip')."""
        one = self._gradient_one_pass(g, times_scale=True)
        if one is not None:
            return one[0] if bool(one[1]) else g
        finite = self._gradient_grid(g)
        if self.stochastic:
            return self._passed_through(
                lambda: stochastic_fake_quant(g, self.scale, self.zero_point, self.qrange, self.generator), lambda: g, finite)
        return self._passed_through(lambda: fake_quant(g, self.scale, self.zero_point, self.qrange), lambda: g, finite)

    def gradient_codes(self, g: torch.Tensor, mult: torch.Tensor | None = None, axis: int | None = None) -> torch.Tensor:
        """Q_G(x) / scale for x = g, or g·mult (one multiplier per index of `axis`; formed in the same pass
        as the codes where _gradient_one_pass applies): the codes minus the zero point (integer-valued
        floats), without forming Q_G(x) (x / scale rounded when x is not finite and on_nonfinite='skip')."""
        one = self._gradient_one_pass(g, False, mult, axis)
        if one is not None and bool(one[1]):
            return one[0]
        if mult is not None:
            g = g * broadcast_along(mult, g, axis)
        if one is not None:                   # not finite, passed through: the grid was kept
            return torch.round(g / self.scale)
        finite = self._gradient_grid(g)
        if self.stochastic:
            codes = lambda: stochastic_fake_quant(g, self.scale, self.zero_point, self.qrange, self.generator,  # noqa: E731
                                                  times_scale=False)
        else:
            codes = lambda: torch.round(fake_quant(g, self.scale, self.zero_point, self.qrange) / self.scale)  # noqa: E731
        return self._passed_through(codes, lambda: torch.round(g / self.scale), finite)


class OverflowFreeWeights(Quantizer):
    """The weight quantizer of a layer with `overflow_free_weights` (A2Q's constraint): the grid of
    `Quantizer`, its scale raised per output channel (`overflow_free_scale`) until no input on the
    layer's input grid can overflow its `acc_bits` accumulator, the bias included. The graph calls it
    as weight_quant(w, a_scale, a_zero_point, bias) after the input's quantizer has run, the last
    three read from that quantizer's buffers and the layer's float bias (or None): the guarantee is
    for the grid the layer's input is on in this very forward."""

    def __init__(self, *args, acc_bits: int, input_qrange: tuple[int, int], **kw):
        super().__init__("weight", *args, **kw)
        self.acc_bits = acc_bits
        self.input_qrange = tuple(input_qrange)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, overflow-free for a {self.acc_bits}-bit accumulator"

    def forward_grid(self, w, lo, hi, a_scale=None, a_zero_point=None, bias=None):
        if a_scale is None or a_zero_point is None:
            raise TypeError(f"weight quantizer of layer {self.layer!r} is overflow-free: call it as "
                            "weight_quant(w, a_scale, a_zero_point, bias)")
        scale, zp = self.grid(lo, hi)
        scale = overflow_free_scale(w, scale, self.qrange, bias, a_scale,
                                    max_code_magnitude(self.input_qrange, a_zero_point.detach()).max(),
                                    self.acc_bits, self.pow2)
        return scale, zp
