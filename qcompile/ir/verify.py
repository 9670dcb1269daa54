"""`verify(graph)`: the integer IR checked against its specification (`SPEC`).

`SPEC` (`qcompile.ir.ops`) maps each op kind to its attrs dataclass, whose fields state every
attribute a backend may read, its type and whether it is required (no default); the op semantics
are in `qcompile.ir.graph`'s docstring. verify checks that `op.attrs` is an instance of exactly
`SPEC[op.kind]`, that no required field is missing and no attribute outside the fields was set,
and each field's value against its type annotation. On top of the attribute types, verify checks
what every backend relies on:
  - tensors: 2–16 bits, a zero point inside the code range, a positive scale;
  - order: every op input is a graph input or the output of an earlier op, every tensor is
    written once, every graph output is written;
  - requantization: each multiplier m is 0 or in [2^30, 2^31) and each shift keeps the
    right shift 31 − s within 0..94 (`qcompile.core.requant`); act_min ≤ act_max inside the
    output tensor's code range;
  - accumulators: acc_bits / tile / overflow valid (`qcompile.core.accumulator.check_mode`);
    conv2d/linear weights are int8/int16 and biases int32/int64; weights, bias and per-channel
    multipliers agree in the number of outputs,
    and the weights' input channels × groups match the input tensor;
  - lookup tables: one entry per input code;
  - add / mul: operands of equal per-sample rank;
  - layer_norm: weight and bias of the last axis's length; constant: value of the output's
    shape, inside its codes; softmax: a non-empty exp table; embedding: unsigned ids with zero point 0,
    an int8/int16 table, output shape ids' shape + (E,).
An `IRError` names the op (name and kind), the attribute or tensor, and what was expected.
"""
from __future__ import annotations

import dataclasses
import numbers
import types
import typing

import numpy as np

from qcompile.core.accumulator import check_mode
from qcompile.core.requant import MAX_RIGHT_SHIFT
from qcompile.errors import QCompileError
from qcompile.ir.graph import Graph, Op
from qcompile.ir.ops import SPEC, Accumulator, AdaptiveAvgPool2d, Clamp, Constant, Conv2d, LayerNorm, Linear, Lut


class IRError(QCompileError):
    """An integer graph that breaks the IR specification."""


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


def _real(v) -> bool:
    return isinstance(v, numbers.Real)


def _checker(tp):
    """(check, description) for a field's type annotation (see `qcompile.ir.ops`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return _int, "an integer"
    if tp is bool:
        return _bool, "a bool"
    if tp is float:
        return _real, "a real number"
    if origin is typing.Annotated and args[0] is np.ndarray:
        ndims = args[1:]
        return (lambda v: isinstance(v, np.ndarray) and v.ndim in ndims and np.issubdtype(v.dtype, np.integer),
                f"an integer numpy array of {' or '.join(map(str, ndims))} dimensions")
    if origin is typing.Literal:
        return (lambda v: isinstance(v, str) and v in args), f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        check, what = _checker(rest[0]) if len(rest) == 1 else (None, None)
        if check is None:
            raise TypeError(f"unsupported IR field type {tp!r}")
        return (lambda v: v is None or check(v)), f"None or {what}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item, what = _checker(args[0])
            return (lambda v: isinstance(v, (tuple, list)) and all(item(i) for i in v)), f"a sequence of {what}s"
        items = [_checker(a)[0] for a in args]
        return (lambda v: isinstance(v, (tuple, list)) and len(v) == len(items)
                and all(c(i) for c, i in zip(items, v))), f"a sequence of {len(items)} values ({tp!r})"
    raise TypeError(f"unsupported IR field type {tp!r}")


# attrs class → {field name: (check, description, required)}, derived once from the dataclass fields
CHECKS: dict[type, dict[str, tuple]] = {}
for _cls in SPEC.values():
    _hints = typing.get_type_hints(_cls, include_extras=True)
    CHECKS[_cls] = {f.name: (*_checker(_hints[f.name]),
                             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                    for f in dataclasses.fields(_cls)}
MULTIPLIER_SHIFT = (("multiplier", "shift"), ("multiplier_a", "shift_a"), ("multiplier_b", "shift_b"),
                    ("multipliers", "shifts"))


def _fail(op: Op, what: str) -> None:
    raise IRError(f"IR op {op.name!r} ({op.kind}): {what}")


def _check_requant(op: Op, m, s) -> None:
    for mi, si in zip(np.ravel(m), np.ravel(s)):
        if not (int(mi) == 0 or (1 << 30) <= int(mi) < (1 << 31)):
            _fail(op, f"requantization multiplier {int(mi)} is neither 0 nor in [2^30, 2^31)")
        if not 0 <= 31 - int(si) <= MAX_RIGHT_SHIFT and int(mi) != 0:
            _fail(op, f"shift {int(si)}: the right shift 31 − s must lie in 0..{MAX_RIGHT_SHIFT}")


def _check_op(graph: Graph, op: Op) -> None:
    cls = SPEC.get(op.kind)
    if cls is None:
        _fail(op, f"unknown kind; the IR has {sorted(SPEC)}")
    a = op.attrs
    if type(a) is not cls:
        _fail(op, f"attrs is a {type(a).__name__}, expected ir.{cls.__name__} (the attributes of {op.kind})")
    checks = CHECKS[cls]
    present = vars(a)
    unknown = sorted(set(present) - set(checks))
    if unknown:
        _fail(op, f"attributes {unknown} are not in the specification of {op.kind} ({sorted(checks)})")
    for name, (check, what, required) in checks.items():
        if name not in present and required:
            _fail(op, f"missing attribute {name!r}")
        value = getattr(a, name)
        if not check(value):
            _fail(op, f"attribute {name!r} = {value!r:.80} has the wrong type or shape: expected {what}")
    for m, s in MULTIPLIER_SHIFT:
        if m in checks:
            _check_requant(op, getattr(a, m), getattr(a, s))
    out = graph.tensors[op.output]
    if isinstance(a, Clamp) and not out.qmin <= a.act_min <= a.act_max <= out.qmax:
        _fail(op, f"act_min..act_max = {a.act_min}..{a.act_max} is not inside the output's codes "
                  f"{out.qmin}..{out.qmax}")
    if isinstance(a, Accumulator):
        try:
            check_mode(a.acc_bits, a.tile, a.overflow)
        except ValueError as exc:
            _fail(op, str(exc))
    if isinstance(a, (Conv2d, Linear)):
        outputs = a.weight.shape[0]
        for name in ("bias", "multiplier", "shift"):
            if getattr(a, name).shape != (outputs,):
                _fail(op, f"{name} has shape {getattr(a, name).shape}, expected ({outputs},): one per output channel")
        if a.weight.dtype not in (np.int8, np.int16):
            _fail(op, f"weight dtype {a.weight.dtype}: weights are int8 or int16 codes")
        if a.bias.dtype not in (np.int32, np.int64):
            _fail(op, f"bias dtype {a.bias.dtype}: the bias is int32, or int64 where int32 cannot hold it")
        x = graph.tensors[op.inputs[0]]
        groups = a.groups if isinstance(a, Conv2d) else 1
        if x.shape and a.weight.shape[1] * groups != x.shape[0 if op.kind == "conv2d" else -1]:
            _fail(op, f"weight {a.weight.shape} × groups {groups} does not match input {op.inputs[0]!r} of "
                      f"shape {x.shape}")
    if isinstance(a, AdaptiveAvgPool2d):
        _check_windows(graph, op)
    if isinstance(a, Lut):
        x = graph.tensors[op.inputs[0]]
        if a.table.shape[-1] != x.qmax - x.qmin + 1:
            _fail(op, f"table has {a.table.shape[-1]} entries per row for {x.qmax - x.qmin + 1} input codes")


    if isinstance(a, LayerNorm):
        n = graph.tensors[op.inputs[0]].shape[-1:]
        if a.weight.shape != n or a.bias.shape != n:
            _fail(op, f"weight {a.weight.shape} and bias {a.bias.shape} must both be {n}: one per element of the "
                      "normalized (last) axis")
    if isinstance(a, Constant) and (tuple(a.value.shape) != tuple(out.shape) or
                                    not out.qmin <= int(a.value.min(initial=out.qmin)) <= int(a.value.max(initial=out.qmin)) <= out.qmax):
        _fail(op, f"value of shape {a.value.shape} must have the output's shape {out.shape} and lie in its codes")
    if op.kind in ("add", "mul") and len({len(graph.tensors[i].shape) for i in op.inputs}) != 1:
        _fail(op, f"operands of per-sample shapes {[graph.tensors[i].shape for i in op.inputs]}: equal ranks "
                  "(broadcast over axes of size 1)")
    if op.kind == "embedding":
        ids = graph.tensors[op.inputs[0]]
        if ids.signed or ids.zero_point != 0 or a.table.dtype not in (np.int8, np.int16) or \
                tuple(out.shape) != tuple(ids.shape) + (a.table.shape[1],):
            _fail(op, f"reads unsigned ids (zero point 0) of shape {ids.shape} into {out.shape} = ids' shape + (E,) from "
                      f"an int8/int16 table {a.table.shape}")
    if op.kind == "softmax" and a.table.size == 0:
        _fail(op, "empty exp table")
    if op.kind == "softmax" and a.visible is not None and (
            a.visible.ndim > len(out.shape) or not np.isin(a.visible, (0, 1)).all()
            or any(m not in (1, n) for m, n in zip(a.visible.shape[::-1], tuple(out.shape)[::-1]))):
        _fail(op, f"visible mask of shape {a.visible.shape} must hold 0/1 and broadcast to the input's {out.shape}")


def _check_windows(graph: Graph, op: Op) -> None:
    """adaptive_avg_pool2d: OH row windows and OW column windows, each non-empty and inside the
    input; one multiplier/shift per output position."""
    a, x, y = op.attrs, graph.tensors[op.inputs[0]], graph.tensors[op.output]
    if len(x.shape) != 3 or len(y.shape) != 3 or x.shape[0] != y.shape[0]:
        _fail(op, f"pools (C, H, W) to (C, OH, OW), not {x.shape} to {y.shape}")
    for axis, (starts, ends, size, out) in enumerate(((a.h_start, a.h_end, x.shape[1], y.shape[1]),
                                                      (a.w_start, a.w_end, x.shape[2], y.shape[2]))):
        if len(starts) != out or len(ends) != out:
            _fail(op, f"{len(starts)} window starts and {len(ends)} ends along axis {axis + 1}; the output has {out}")
        if any(not 0 <= s < e <= size for s, e in zip(starts, ends)):
            _fail(op, f"a window along axis {axis + 1} is empty or outside 0..{size}: {list(zip(starts, ends))}")
    for name in ("multiplier", "shift"):
        if getattr(a, name).shape != (y.shape[1] * y.shape[2],):
            _fail(op, f"{name} has shape {getattr(a, name).shape}, expected ({y.shape[1] * y.shape[2]},): one per "
                      "output position")


def verify(graph: Graph) -> Graph:
    """Check `graph` against the IR specification (module docstring); return it, or raise IRError."""
    for name, t in graph.tensors.items():
        if not 2 <= t.bits <= 16:
            raise IRError(f"IR tensor {name!r}: {t.bits} bits; tensors are 2–16 bits wide")
        if not t.qmin <= t.zero_point <= t.qmax:
            raise IRError(f"IR tensor {name!r}: zero point {t.zero_point} outside its codes {t.qmin}..{t.qmax}")
        if not t.scale > 0:
            raise IRError(f"IR tensor {name!r}: scale {t.scale} is not positive")
    defined = set()
    for name in graph.inputs:
        if name not in graph.tensors:
            raise IRError(f"IR graph input {name!r} is not a tensor of the graph")
        defined.add(name)
    for op in graph.ops:
        for name in op.inputs:
            if name not in defined:
                _fail(op, f"input {name!r} is not a graph input nor the output of an earlier op")
        if op.output not in graph.tensors:
            _fail(op, f"output {op.output!r} is not a tensor of the graph")
        if op.output in defined:
            _fail(op, f"output {op.output!r} is written twice")
        _check_op(graph, op)
        defined.add(op.output)
    missing = [n for n in graph.outputs if n not in defined]
    if missing:
        raise IRError(f"IR graph outputs {missing} are never written")
    return graph
