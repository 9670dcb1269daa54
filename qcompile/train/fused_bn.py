"""BatchNorm folded into the conv/linear before it, trained with simulated folding
(Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient inference",
section 3.2).

For a layer L (conv1d/conv2d/linear) with weight W and bias b followed by a BatchNorm
(γ, β, running μ_r, σ_r² = running_var + eps), the fused graph is

    W_fold = fold_weight(W, γ, running_var, eps)          = W · γ/σ_r   (per output channel)
    y      = L(x, Q_W(W_fold), bias=None)                 ← the weight quantizer sees W_fold
    out    = BatchNormFold(y, x, W, b)                    ← before the output quantizer

BatchNormFold in training (statistics not frozen) computes the batch statistics μ_B, σ_B of
z = y·σ_r/γ — the folded layer's own output with the fold undone, which is L(x, W) exactly
when quantization is off, and L(x, Q_W(W·γ/σ_r))·σ_r/γ with it (one conv per layer, as in
torch.ao's fused ConvBn) — differentiably, and returns

    out = y · σ_r/σ_B + (β − γ·μ_B/σ_B)

When the layer has a narrow accumulator (the call's `float_statistics=True`, set by the
`narrow_acc` pass), y may have overflowed, so
μ_B, σ_B come instead from a second, float conv of the same operands (Krishnamoorthi's
figure): overflow would otherwise shrink σ_B, grow the fold and overflow more. The gradient
through μ_B, σ_B (and γ's) is then BatchNorm's on that conv, as if nothing overflowed (the
straight-through view of the accumulator); z itself passes γ/σ_B straight through. Either way
updating μ_r, σ_r² exactly as nn.BatchNorm does (with the statistics of z + b); in eager float32 CPU
training without a layer bias, sync, float statistics or a differentiated rectification term, on y of at
least UNFOLDED_MIN_VALUES values, z is never formed (`_NormalizeUnfolded`: the moments of y give z's, in one
C call). Where the weight quantizer commutes with per-row scaling (`fold_cancels`: symmetric per-channel
current min-max, set by the fold_bn pass from the layer's config), Q_W(W·γ/σ_r) = Q_W(W)·γ/σ_r in exact
arithmetic, so with batch statistics the fold cancels: `fold_weight` returns W, the layer gives z itself and
BatchNorm normalizes it as it is (`BatchNormFold.fold_cancelled`). In eval
mode, or after `freeze_steps` training steps, it returns out = y + (β + γ·(b − μ_r)/σ_r):
a per-channel bias, which is what lowering folds into the integer bias.

Under torch.distributed (initialized, world size > 1) with `sync=True`, μ_B and σ_B are the
statistics of every rank's batch together, as `nn.SyncBatchNorm` computes them (per-channel
sums all-reduced, the backward all-reduced too), so every rank updates the same running
statistics and its weight quantizer sees the same W·γ/σ_r.

Invariant: with every quantizer off, out equals BatchNorm(L(x, W) + b) in value and in its
gradients with respect to x, W, b, γ and β, in train and eval mode (with `sync` under
torch.distributed: SyncBatchNorm's). The per-channel
arithmetic γ/σ is `qcompile.core.batchnorm.bn_scale` and β − μ·γ/σ is written once here (`bn_affine`) and reused by
the rectification loss and by lowering.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.core.batchnorm import bn_scale, channel_gain_sq, tap_coverage
from qcompile.train import native
from qcompile.train.estimators import distributed
from qcompile.train.reused_storage import ReusedStorage

FOLD_EPS = 1e-12   # |γ/σ_r| below this is treated as this (a zero γ folds the weight to 0)
# the smallest activation BatchNormFold normalizes without forming z (_NormalizeUnfolded); below it its few
# more small operations cost more than the two passes it saves (measured, forward + backward: 0.13 vs 0.27 ms at
# 2×64×8×8, 0.76 vs 0.72 ms at 32×512×2×2, 1.45 vs 0.97 ms at 32×64×16×16)
UNFOLDED_MIN_VALUES = 1 << 16


@torch.library.custom_op("qcompile::running_snapshot", mutates_args=())
def _running_snapshot(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


@_running_snapshot.register_fake
def _(t):
    return torch.empty_like(t)


def running(t: torch.Tensor) -> torch.Tensor:
    """A running statistic as the arithmetic reads it. Under torch.compile, a copy the partitioner
    saves for the backward pass and never recomputes from the buffer itself (an opaque op): the
    same training forward updates that buffer in place, and a backward that re-read it would see the
    new value (autograd's version check refuses it). Eager: the buffer itself."""
    return _running_snapshot(t) if torch.compiler.is_compiling() else t


def affine(gamma, beta, running_mean, running_var, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of BatchNorm in eval mode from its tensors: BN(x) = x·scale + shift per channel."""
    running_mean, running_var = running(running_mean), running(running_var)
    scale = bn_scale(gamma, running_var, eps)
    shift = -running_mean * scale
    return scale, shift if beta is None else shift + beta


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a BatchNorm (or BatchNormFold) in eval mode: BN(x) = x·scale + shift per channel."""
    if getattr(bn, "running_var", None) is None:
        raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False): "
                         "it normalizes with batch statistics even in eval mode and is not a per-channel affine op")
    return affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def folded_bias(gamma, beta, running_mean, running_var, eps: float, layer_bias=None,
                bn: BatchNormFold | None = None) -> torch.Tensor | None:
    """β + γ·(b − μ_r)/σ_r: the bias of the folded layer in eval mode (a graph node of its own, so the
    bias quantizer and lowering see it like any layer bias). None where `bn` (the BatchNormFold the bias
    belongs to) says the fold cancels in this forward: BatchNorm then uses batch statistics and adds no
    bias, and no narrow accumulator reads it (`fold_cancels` is never set on one)."""
    if bn is not None and bn.fold_cancelled:
        return None
    scale, shift = affine(gamma, beta, running_mean, running_var, eps)
    return shift if layer_bias is None else shift + layer_bias * scale


def _variance_from_invstd(invstd: torch.Tensor, eps: float) -> torch.Tensor:
    """The biased batch variance from native_batch_norm's saved 1/√(σ² + eps)."""
    return invstd.pow(-2) - eps


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast along dim 1 of an `ndim`-dim activation."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


class _FoldWeight(torch.autograd.Function):
    """weight · scale written into `storage`; the gradient g · scale, the product's own."""

    @staticmethod
    def forward(ctx, weight, scale, storage):
        ctx.save_for_backward(scale)
        return torch.mul(weight, scale, out=storage.empty_like(weight))

    @staticmethod
    def backward(ctx, g):
        return g * ctx.saved_tensors[0], None, None


_FOLDED = WeakIdKeyDictionary()   # weight → its folded copy's ReusedStorage (not state; dies with the weight)


def fold_weight(weight: torch.Tensor, gamma: torch.Tensor | None, running_var: torch.Tensor,
                eps: float, bn: BatchNormFold | None = None) -> torch.Tensor:
    """W · γ/σ_r, scaled per output channel (dim 0): the weight the quantizer and the integer layer see.
    γ enters as a constant: BatchNormFold divides the fold out again before normalizing, so γ's two
    paths through it cancel exactly and γ's gradient is BatchNorm's own. Eager: written into storage kept
    for this weight (ReusedStorage), the same bits as the product. W itself where `bn` (the BatchNormFold
    the fold belongs to) says the fold cancels in this forward (`BatchNormFold.fold_cancelled`)."""
    if bn is not None and bn.fold_cancelled:
        return weight
    scale = bn_scale(None if gamma is None else gamma.detach(), running(running_var), eps)
    scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    if torch.compiler.is_compiling() or scale.dtype != weight.dtype:
        return weight * scale
    storage = _FOLDED.get(weight)
    if storage is None:
        storage = _FOLDED[weight] = ReusedStorage()
    return _FoldWeight.apply(weight, scale, storage)


@functools.cache
def _with_signature(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.qc_unfolded_batchnorm.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ctypes.c_double, ptr, ptr]
    lib.qc_unfolded_batchnorm.restype = None
    return lib


def _unfolded_batchnorm_lib(y: torch.Tensor, *per_channel: torch.Tensor | None) -> ctypes.CDLL | None:
    """csrc/unfolded_batchnorm.c where y and the per-channel tensors (None allowed) are contiguous float32 CPU
    tensors in eager mode; else None (and None where it cannot be built)."""
    if torch.compiler.is_compiling() or any(
            t is not None and (not t.is_cpu or t.dtype is not torch.float32 or not t.is_contiguous())
            for t in (y, *per_channel)):
        return None
    lib = native.library("unfolded_batchnorm")
    return None if lib is None else _with_signature(lib)


class _NormalizeUnfolded(torch.autograd.Function):
    """BatchNorm with batch statistics of z = y / fold (fold per channel of dim 1, nonzero), never forming z:
    with μ_y, σ_y² the moments of y, z's are μ_y/fold and σ_y²/fold², and x̂ = (z − μ_z)/√(σ_z² + eps) =
    (y − μ_y)·s with s = 1/(fold·√(σ_z² + eps)); out = x̂·γ + β, in one C call (csrc/unfolded_batchnorm.c).
    Returns (out, μ_z, σ_z² biased); the backward is torch's native_batch_norm_backward on y with saved mean
    μ_y and saved invstd s (its arithmetic reads x̂ as (y − mean)·invstd, so it gives z's gradient divided by
    fold, which is y's)."""

    @staticmethod
    def forward(ctx, y, fold, weight, bias, eps, lib):
        channels = y.shape[1]
        out, stats = torch.empty_like(y), torch.empty(4, channels)
        lib.qc_unfolded_batchnorm(y.data_ptr(), y.shape[0], channels, y.numel() // (y.shape[0] * channels),
                                  fold.data_ptr(), None if weight is None else weight.data_ptr(),
                                  None if bias is None else bias.data_ptr(), eps, out.data_ptr(), stats.data_ptr())
        mean_y, s, mean_z, var_z = stats
        ctx.save_for_backward(y, weight, mean_y, s)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean_z, var_z)
        return out, mean_z, var_z

    @staticmethod
    def backward(ctx, g, _mean, _var):
        y, weight, mean_y, s = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gy, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, y, weight, None, None, mean_y, s, True, ctx.eps, [needs[0], weight is not None and needs[2], needs[3]])
        return gy, None, gw, gb, None, None


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its adjoint as backward (the sum over ranks of the incoming gradients)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def synced_moments(t: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) per channel of `t` over `dims` and over every rank's `t`:
    two all-reduces (the sum, then the squared deviations from the global mean), differentiable
    (their backward all-reduces the gradient, so DDP's averaged gradient is SyncBatchNorm's)."""
    count = torch.tensor(float(t.numel() // t.shape[1]), dtype=t.dtype, device=t.device)
    sums = _SumOverRanks.apply(torch.cat([t.sum(dims), count.reshape(1)]))
    n = sums[-1]
    mean = sums[:-1] / n
    var = _SumOverRanks.apply((t - _per_channel(mean, t.dim())).square().sum(dims)) / n
    return mean, var, int(n.detach())


class BatchNormFold(nn.Module):
    """The BatchNorm half of a fused layer (see the module docstring for the arithmetic).

    Parameters and buffers carry BatchNorm's names (`weight`, `bias`, `running_mean`,
    `running_var`, `num_batches_tracked`) and are BatchNorm's own tensors, so the model's
    `state_dict()` keys are unchanged by folding. `num_batches_tracked` counts training
    forward passes; once it reaches `freeze_steps` the running statistics stop updating and
    training uses them (no batch correction). `layer_fn`/`layer_args` are the preceding
    layer's function and its arguments after the bias (stride, padding, ...), used for the
    float batch-statistics pass. After every forward, `gain_sq` holds the per-channel noise
    gain² (γ·‖W_c‖/σ_c)² of that batch (see qcompile.train.bn_rectification), differentiable.
    """

    def __init__(self, bn: _BatchNorm, layer: str, layer_fn, layer_args: tuple = (),
                 freeze_steps: int | None = None, rectification: float = 0.0,
                 propagates_gradient: bool = True, sync: bool = True):
        super().__init__()
        if not bn.track_running_stats:
            raise ValueError(f"BatchNorm after {layer!r} has track_running_stats=False: it cannot be folded")
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.layer, self.layer_fn, self.layer_args = layer, layer_fn, tuple(layer_args)
        self.freeze_steps = freeze_steps
        self.propagates_gradient = propagates_gradient   # False when the layer reads the graph input
        self.sync = sync   # batch statistics over every rank under torch.distributed
        # λ of this block's rectification term; > 0: the gain is computed differentiably in every training forward
        self.rectification = float(rectification) if propagates_gradient else 0.0
        self._gain: torch.Tensor | None = None
        self._gain_inputs: tuple | None = None
        self._coverage: dict = {}   # input spatial shape → kernel-tap coverage (a cache, not state)
        # the layer's weight quantizer commutes with per-row scaling, no gradient quantizer or narrow accumulator
        # reads the folded weight (set by the fold_bn pass from the layer's config): see `fold_cancelled`
        self.fold_cancels = False
        self.measured_gain: tuple[float, float] | None = None   # (noise, signal) of the last probe

    def extra_repr(self) -> str:
        fn = getattr(self.layer_fn, "__name__", str(self.layer_fn))
        freeze = f", freeze_steps={self.freeze_steps}" if self.freeze_steps is not None else ""
        return f"{self.num_features}, eps={self.eps}, folded into {self.layer} ({fn}){freeze}"

    @property
    def frozen(self) -> bool:
        return self.freeze_steps is not None and int(self.num_batches_tracked) >= self.freeze_steps

    @property
    def fold_cancelled(self) -> bool:
        """True where this forward skips the fold: training with batch statistics and `fold_cancels`. The
        layer then reads Q(W) for Q(W·γ/σ_r) and gives z = L(x, Q(W)) itself, which is y/(γ/σ_r) in exact
        arithmetic (the grid of each row scales with |γ/σ_r|, its codes with the sign), and BatchNorm
        normalizes z as it is: no weight-sized product forward or backward, no division. `fold_weight` and
        `forward` read it before the step counts the batch, so both see the same value."""
        return self.fold_cancels and self.training and not self.frozen

    def _momentum(self) -> float:
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """nn.BatchNorm's running-statistics update from batch statistics (biased `var` over `count`)."""
        m = self._momentum()
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(var * (count / (count - 1)), alpha=m)

    def folded_bias(self, layer_bias: torch.Tensor | None = None) -> torch.Tensor:
        """β + γ·(b − μ_r)/σ_r of this block's tensors (see `folded_bias`)."""
        return folded_bias(self.weight, self.bias, self.running_mean, self.running_var, self.eps, layer_bias)

    def forward(self, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                layer_bias: torch.Tensor | None = None, eval_bias: torch.Tensor | None = None,
                float_statistics: bool = False) -> torch.Tensor:
        """`eval_bias`: the folded bias the eval / frozen form adds (the graph's `folded_bias` node, rounded
        by the layer's bias quantizer); computed here from the block's tensors when not given.
        `float_statistics`: take the batch statistics from a float conv (the layer's accumulator may
        overflow; see the module docstring)."""
        if y.dim() < 2 or y.shape[1] != self.num_features:
            raise ValueError(f"BatchNormFold after {self.layer!r}: expected {self.num_features} channels on dim 1, "
                             f"got shape {tuple(y.shape)}")
        frozen, cancelled = self.frozen, self.fold_cancelled  # steps 1..freeze_steps use batch statistics
        if self.training:
            self.num_batches_tracked.add_(1)
        if not self.training or frozen:
            self._record_gain(x, weight, self.running_var, None)
            bias = self.folded_bias(layer_bias) if eval_bias is None else eval_bias
            return y + _per_channel(bias, y.dim())
        count = y.numel() // y.shape[1]
        if count < 2:
            raise ValueError(f"BatchNormFold after {self.layer!r}: expected more than 1 value per channel when "
                             f"training, got input of shape {tuple(y.shape)}")
        sync = self.sync and distributed()
        if cancelled:
            z = y                                                # the layer read Q(W): y is z; no eval bias
        else:
            fold = bn_scale(None if self.weight is None else self.weight.detach(), running(self.running_var),
                            self.eps)  # γ/σ_r
            fold = torch.where(fold.abs() < FOLD_EPS, torch.full_like(fold, FOLD_EPS), fold)
            plain = not (float_statistics or sync or layer_bias is not None or y.numel() < UNFOLDED_MIN_VALUES
                         or (self.rectification > 0 and torch.is_grad_enabled()))
            lib = _unfolded_batchnorm_lib(y, fold, self.weight, self.bias) if plain else None
            if lib is not None:
                # as the last branch below, without forming z or dividing its gradient by the fold
                out, mean_b, var_b = _NormalizeUnfolded.apply(y, fold, self.weight, self.bias, self.eps, lib)
                self._update_running(mean_b, var_b, count)
                self._record_gain(x, weight, var_b, count)
                return out
            z = y / _per_channel(fold, y.dim())                  # L(x, W) when quantization is off
        if layer_bias is not None:
            z = z + _per_channel(layer_bias, z.dim())            # shifts μ_B only; the running mean tracks it
        dims = [0] + list(range(2, z.dim()))
        if float_statistics:
            # a narrow accumulator may have overflowed y: the statistics come from a float conv of the
            # same operands, as a wide accumulator would give them (else overflow shrinks σ_B, the
            # fold γ/σ_r grows and overflows more)
            stats = self.layer_fn(x, weight, layer_bias, *self.layer_args)
            if sync:
                mean_b, var_b, count = synced_moments(stats, dims)
            else:
                var_b, mean_b = torch.var_mean(stats, dim=dims, unbiased=False)
            gamma = torch.ones_like(var_b) if self.weight is None else self.weight
            k = _per_channel(gamma * torch.rsqrt(var_b + self.eps), z.dim())
            # value (z − μ_B)·k; gradient: z straight through k, and μ_B, k (so γ, x, W through them) as
            # BatchNorm of `stats` gives it. Differentiating (z − μ_B)·k as written would weigh ∂k by the
            # overflowed z − μ_B, a mismatch with the statistics that blows the gradient up.
            s = stats.detach()
            out = z * k.detach() + (s - _per_channel(mean_b, z.dim())) * k - s * k.detach()
            if self.bias is not None:
                out = out + _per_channel(self.bias, z.dim())
            self._update_running(mean_b, var_b, count)
        elif sync:
            # as below, with every rank's batch: SyncBatchNorm's statistics and running-statistics update
            mean_b, var_b, count = synced_moments(z, dims)
            out = (z - _per_channel(mean_b, z.dim())) * _per_channel(torch.rsqrt(var_b + self.eps), z.dim())
            if self.weight is not None:
                out = out * _per_channel(self.weight, z.dim()) + _per_channel(self.bias, z.dim())
            self._update_running(mean_b, var_b, count)
        else:
            # BatchNorm with batch statistics on z: γ(z − μ_B)/σ_B + β = y·σ_r/σ_B + β − γμ_B/σ_B, with
            # running statistics updated as nn.BatchNorm does (one fused kernel, forward and backward)
            out, _, invstd = torch.native_batch_norm(z, self.weight, self.bias, self.running_mean, self.running_var,
                                                     True, self._momentum(), self.eps)
            if self.rectification > 0 and torch.is_grad_enabled():   # the loss differentiates the gain
                var_b = torch.var(z, dim=dims, unbiased=False)
            else:   # formed only if the gain is computed
                var_b = functools.partial(_variance_from_invstd, invstd.detach(), self.eps)
        self._record_gain(x, weight, var_b, count)
        return out

    def _record_gain(self, x: torch.Tensor, weight: torch.Tensor, var, count: int | None) -> None:
        """Keep what this batch's per-channel noise gain² needs (`var`: the batch variance, or a function
        giving it). It is computed here, differentiably, when the rectification loss uses it, and otherwise
        only when `gain_sq` is read."""
        self._gain_inputs = (var, weight, count, tuple(x.shape))
        self._gain = None
        if self.rectification > 0 and torch.is_grad_enabled():
            self._gain = self._compute_gain()

    def _compute_gain(self) -> torch.Tensor:
        var, weight, count, input_shape = self._gain_inputs
        var = var() if callable(var) else var
        key = (input_shape[2:], tuple(weight.shape))
        if key not in self._coverage:
            self._coverage[key] = tap_coverage(self.layer_fn, self.layer_args, input_shape, weight.shape)
        return channel_gain_sq(self.weight, var, self.eps, weight, count, self._coverage[key])

    @property
    def gain_sq(self) -> torch.Tensor | None:
        """Per-channel noise gain² (γ·‖W_c‖/σ_c)² of the last forward pass (None before one)."""
        if self._gain is None and self._gain_inputs is not None:
            with torch.no_grad():
                self._gain = self._compute_gain()
        return self._gain

    @gain_sq.setter
    def gain_sq(self, value: torch.Tensor | None) -> None:
        self._gain, self._gain_inputs = value, None

    def describe(self) -> str:
        state = "frozen statistics" if self.frozen else "batch statistics + σ_r/σ_B correction"
        text = f"BN folded into {self.layer} ({state})"
        if not self.propagates_gradient:
            return text + "; reads the graph input (no gradient to amplify)"
        if self.rectification:
            text += f"; rectification λ={self.rectification:g}"
        if self.gain_sq is not None:
            text += f"; noise gain predicted {float(self.gain_sq.detach().mean().sqrt()):.3f}"
        if self.measured_gain is not None:
            text += f", measured {self.measured_gain[0]:.3f} (float gradient's gain {self.measured_gain[1]:.3f})"
        return text
