"""QConfig: every option of the compiler, validated on construction.

Invariant: a QConfig that exists is valid; `for_layer(name, module_type)` returns the
config that applies to one layer after the `overrides` are merged (later, more specific
patterns win: type matches first, then globs in insertion order).
"""
from __future__ import annotations

import dataclasses
import math
import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ESTIMATORS = ("current", "running", "hindsight", "dsgc", "fixed")
GRANULARITIES = ("per_channel", "per_tensor")
NONFINITE_POLICIES = ("raise", "skip")
OVERFLOW_MODES = ("saturate", "wrap", "pairwise")   # core.accumulator's modes (config imports nothing: a test
PAIR = 2                                              # checks they agree); "pairwise" sums tiles of PAIR products
ACC_GRAD_MODES = ("ste", "zero_saturated")


@dataclass(frozen=True)
class QConfig:
    weight_bits: int = 8
    act_bits: int = 8
    grad_bits: int | None = None
    quantize_weights: bool = True       # false: weights stay float (the paper's Tables 1-2)
    quantize_activations: bool = True   # false: activations stay float (Table 1: only gradients quantized)
    weight_granularity: str = "per_channel"
    act_symmetric: bool = False
    weight_range: str = "current"
    act_range: str = "hindsight"
    grad_range: str = "hindsight"
    momentum: float = 0.9
    stochastic_rounding: bool = True
    seed: int | None = None
    quantize_weight_grad: bool = False
    dsgc_interval: int = 100
    act_fixed_range: tuple[float, float] | None = None
    grad_fixed_range: tuple[float, float] | None = None
    weight_fixed_range: tuple[float, float] | None = None
    pow2_scales: bool = False
    # narrow accumulators (passes/narrow_acc) and the log-barrier loss (passes/regularize)
    acc_bits: int | None = None
    tile: int | None = None
    overflow: str = "saturate"
    grad_acc_bits: int | None = None
    acc_grad: str = "ste"
    log_barrier: bool = False
    overflow_free_weights: bool = False  # weight scale raised per channel until no input can overflow (A2Q)
    barrier_weight: float = 0.05        # λ of the realized-accumulator (tail) term
    barrier_bound_weight: float = 1e-2  # λ of the worst-case bound term
    barrier_t0: float = 5.0             # log-barrier temperature at step 0
    barrier_growth: float = 1.1         # t is multiplied by this every barrier_interval training steps
    barrier_interval: int = 100
    # BatchNorm folding (passes/fold_bn) and the BN-rectification loss (passes/regularize)
    fold_bn: bool = True
    bn_freeze_steps: int | None = None
    bn_rectification: float = 0.0
    bn_sync: bool = True                # under torch.distributed: folded BN's batch statistics over every rank
    on_nonfinite: str = "raise"
    strict: bool = False
    verify: bool = False                # check each pass's invariant after it runs (also QCOMPILE_VERIFY=1)
    leaf_modules: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)

    @property
    def acc_tile(self) -> int | None:
        """The tile of the accumulator semantics: `tile`, or 2 for overflow='pairwise'."""
        return PAIR if self.overflow == "pairwise" else self.tile

    def __post_init__(self):
        for name in ("weight_bits", "act_bits", "grad_bits"):
            v = getattr(self, name)
            if v is None and name == "grad_bits":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
                raise ValueError(f"QConfig.{name}={v!r}: bits must be an integer in 2..16")
        for name in ("weight_range", "act_range", "grad_range"):
            v = getattr(self, name)
            if v not in ESTIMATORS:
                raise ValueError(f"QConfig.{name}={v!r}: unknown range estimator; choose one of {ESTIMATORS}")
            kind = name.split("_")[0]
            if v == "fixed" and getattr(self, f"{kind}_fixed_range") is None:
                raise ValueError(f"QConfig.{name}='fixed' needs QConfig.{kind}_fixed_range=(lo, hi)")
        for name in ("act_fixed_range", "grad_fixed_range", "weight_fixed_range"):
            v = getattr(self, name)
            if v is not None:
                if len(v) != 2 or not float(v[0]) < float(v[1]):
                    raise ValueError(f"QConfig.{name}={v!r}: must be (lo, hi) with lo < hi")
                object.__setattr__(self, name, (float(v[0]), float(v[1])))
        if self.pow2_scales:
            for kind, symmetric in (("weight", True), ("act", self.act_symmetric), ("grad", False)):
                _check_pow2_fixed_range(self, kind, symmetric)
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(f"QConfig.weight_granularity={self.weight_granularity!r}: choose one of {GRANULARITIES}")
        if not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"QConfig.momentum={self.momentum!r}: must be in [0, 1)")
        if not isinstance(self.dsgc_interval, int) or self.dsgc_interval < 1:
            raise ValueError(f"QConfig.dsgc_interval={self.dsgc_interval!r}: must be a positive integer")
        for name in ("acc_bits", "grad_acc_bits"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 4 <= v <= 64):
                raise ValueError(f"QConfig.{name}={v!r}: accumulator width must be None (exact) or an integer in 4..64")
        if self.tile is not None and (not isinstance(self.tile, int) or self.tile < 1):
            raise ValueError(f"QConfig.tile={self.tile!r}: must be None (whole reduction) or a positive integer")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"QConfig.overflow={self.overflow!r}: choose one of {OVERFLOW_MODES}")
        if self.overflow == "pairwise" and self.tile not in (None, PAIR):
            raise ValueError(f"QConfig.tile={self.tile!r} with overflow='pairwise': pairwise sums pairs of products "
                             f"(tile {PAIR}; leave tile None)")
        if self.acc_grad not in ACC_GRAD_MODES:
            raise ValueError(f"QConfig.acc_grad={self.acc_grad!r}: choose one of {ACC_GRAD_MODES}")
        if self.grad_acc_bits is not None and self.grad_bits is None:
            raise ValueError(f"QConfig.grad_acc_bits={self.grad_acc_bits!r} needs grad_bits: the backward matmuls "
                             "accumulate quantized gradients (set grad_bits, or leave grad_acc_bits=None)")
        for name in ("barrier_weight", "barrier_bound_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"QConfig.{name}={v!r}: the loss weight must be a number >= 0")
        if not isinstance(self.barrier_t0, (int, float)) or not self.barrier_t0 > 0:
            raise ValueError(f"QConfig.barrier_t0={self.barrier_t0!r}: the barrier temperature must be > 0")
        if not isinstance(self.barrier_growth, (int, float)) or not self.barrier_growth >= 1:
            raise ValueError(f"QConfig.barrier_growth={self.barrier_growth!r}: must be >= 1 (t never decreases)")
        if not isinstance(self.barrier_interval, int) or isinstance(self.barrier_interval, bool) \
                or self.barrier_interval < 1:
            raise ValueError(f"QConfig.barrier_interval={self.barrier_interval!r}: must be a positive integer")
        if self.bn_freeze_steps is not None and (not isinstance(self.bn_freeze_steps, int) or self.bn_freeze_steps < 0):
            raise ValueError(f"QConfig.bn_freeze_steps={self.bn_freeze_steps!r}: must be None or a non-negative integer")
        if not isinstance(self.bn_rectification, (int, float)) or self.bn_rectification < 0:
            raise ValueError(f"QConfig.bn_rectification={self.bn_rectification!r}: the loss weight λ must be >= 0")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"QConfig.on_nonfinite={self.on_nonfinite!r}: choose one of {NONFINITE_POLICIES}")
        for name in ("quantize_weights", "quantize_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QConfig.{name}={getattr(self, name)!r}: must be True or False")
            if not getattr(self, name) and self.acc_bits is not None:
                raise ValueError(f"QConfig.{name}=False with acc_bits={self.acc_bits}: a narrow accumulator sums "
                                 "integer codes, so weights and activations must be quantized")
        if not isinstance(self.overflow_free_weights, bool):
            raise ValueError(f"QConfig.overflow_free_weights={self.overflow_free_weights!r}: must be True or False")
        if self.overflow_free_weights and self.acc_bits is None:
            raise ValueError("QConfig.overflow_free_weights=True needs acc_bits: it bounds the weights for a narrow "
                             "accumulator (set acc_bits, or leave overflow_free_weights=False)")
        if not isinstance(self.bn_sync, bool):
            raise ValueError(f"QConfig.bn_sync={self.bn_sync!r}: must be True or False")
        if not isinstance(self.verify, bool):
            raise ValueError(f"QConfig.verify={self.verify!r}: must be True or False")
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        if not isinstance(self.overrides, dict):
            raise ValueError("QConfig.overrides must be a dict {module-name glob or module type: {field: value}}")
        for key, partial in self.overrides.items():
            if not isinstance(key, (str, type)):
                raise ValueError(f"QConfig.overrides key {key!r}: must be a module-name glob or a module type")
            if not isinstance(partial, dict):
                raise ValueError(f"QConfig.overrides[{key!r}] must be a dict of QConfig fields")
            bad = (set(partial) - _FIELD_NAMES) | ({"overrides"} & set(partial))
            if bad:
                raise ValueError(f"QConfig.overrides[{key!r}]: unknown or non-overridable fields {sorted(bad)}")
            try:
                dataclasses.replace(self, overrides={}, **partial)  # validates the merged values
            except ValueError as exc:
                raise ValueError(f"QConfig.overrides[{key!r}]: {exc}") from None

    # ---- construction helpers -------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QConfig":
        unknown = set(d) - _FIELD_NAMES
        if unknown:
            raise ValueError(f"QConfig: unknown fields {sorted(unknown)}; known fields are {sorted(_FIELD_NAMES)}")
        d = dict(d)
        for k in ("act_fixed_range", "grad_fixed_range", "weight_fixed_range"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> "QConfig":
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict(data.get("qcompile", data))

    def replace(self, **changes) -> "QConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = {(k if isinstance(k, str) else k.__name__): v for k, v in self.overrides.items()}
        return d

    def for_layer(self, name: str, module_type: type | None = None) -> "QConfig":
        """The config for the layer `name` (a module path), with matching overrides merged."""
        merged: dict[str, Any] = {}
        for key, partial in self.overrides.items():
            if isinstance(key, type) and module_type is not None and issubclass(module_type, key):
                merged.update(partial)
        for key, partial in self.overrides.items():
            if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
                merged.update(partial)
        return dataclasses.replace(self, overrides={}, **merged) if merged else self


_FIELD_NAMES = {f.name for f in dataclasses.fields(QConfig)}


def _check_pow2_fixed_range(cfg: QConfig, kind: str, symmetric: bool) -> None:
    """With pow2_scales a fixed range must have a power-of-two grid step, or the rounded-up step would
    silently widen it: ValueError naming the field, the widened range and one that works."""
    rng = getattr(cfg, f"{kind}_fixed_range")
    bits = getattr(cfg, f"{kind}_bits")
    estimator = getattr(cfg, {"weight": "weight_range", "act": "act_range", "grad": "grad_range"}[kind])
    if rng is None or bits is None or estimator != "fixed":
        return
    lo, hi = min(rng[0], 0.0), max(rng[1], 0.0)
    levels = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    step = max(abs(lo), abs(hi)) / levels if symmetric else (hi - lo) / levels
    exponent = math.log2(step)
    if exponent == math.floor(exponent):
        return
    up, down = 2.0 ** math.ceil(exponent), 2.0 ** math.floor(exponent)
    if symmetric:
        widened, fits = (-up * levels, up * levels), (-down * levels, down * levels)
    else:
        zp_up, zp_down = round(-lo / up), round(-lo / down)
        widened = (0.0 - up * zp_up, up * (levels - zp_up))
        fits = (0.0 - down * zp_down, down * (levels - zp_down))
    raise ValueError(f"QConfig.{kind}_fixed_range={rng!r} with pow2_scales=True: the {bits}-bit "
                     f"{'symmetric' if symmetric else 'asymmetric'} grid step {step:.6g} is not a power of two, so "
                     f"the step would round up to {up:g} and the range silently widen to "
                     f"({widened[0]:g}, {widened[1]:g}); give a range with a power-of-two step, e.g. "
                     f"({fits[0]:g}, {fits[1]:g}) (step {down:g}), or set pow2_scales=False")
