"""`verify(graph)`: the integer IR checked against its specification (`SPEC`).

SPEC states, per op kind, every attribute a backend may read, its type and whether it is
required; the op semantics are in `qcompile.ir.graph`'s docstring. On top of the attribute
types, verify checks what every backend relies on:
  - tensors: 2–16 bits, a zero point inside the code range, a positive scale;
  - order: every op input is a graph input or the output of an earlier op, every tensor is
    written once, every graph output is written;
  - requantization: each multiplier m is 0 or in [2^30, 2^31) and each shift keeps the
    right shift 31 − s within 0..62 (`qcompile.core.requant`); act_min ≤ act_max inside the
    output tensor's code range;
  - accumulators: acc_bits / tile / overflow valid (`qcompile.core.accumulator.check_mode`);
    conv2d/linear weights, bias and per-channel multipliers agree in the number of outputs,
    and the weights' input channels × groups match the input tensor;
  - lookup tables: one entry per input code (per channel for a 2-D table).
An `IRError` names the op (name and kind), the attribute or tensor, and what was expected.
"""
from __future__ import annotations

import numbers

import numpy as np

from qcompile.core.accumulator import check_mode
from qcompile.errors import QCompileError
from qcompile.ir.graph import Graph, Op


class IRError(QCompileError):
    """An integer graph that breaks the IR specification."""


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(_int(i) for i in v)


def _ints(v) -> bool:
    return isinstance(v, (tuple, list)) and all(_int(i) for i in v)


def _array(ndim):
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    return lambda v: isinstance(v, np.ndarray) and v.ndim in ndims and np.issubdtype(v.dtype, np.integer)


def _floats(v) -> bool:
    return isinstance(v, (tuple, list)) and all(isinstance(i, numbers.Real) for i in v)


def _opt(check):
    return lambda v: v is None or check(v)


INT, PAIR, INTS, BOOL = _int, _pair, _ints, (lambda v: isinstance(v, (bool, np.bool_)))
OVERFLOW = lambda v: v in ("saturate", "wrap")  # noqa: E731
CLAMP = {"act_min": (INT, True), "act_max": (INT, True)}
REQUANT = {"multiplier": (INT, True), "shift": (INT, True)}
ACC = {"acc_bits": (_opt(INT), False), "tile": (_opt(INT), False), "overflow": (OVERFLOW, False)}
PER_CHANNEL = {"weight": None, "bias": (_array(1), True), "multiplier": (_array(1), True),
               "shift": (_array(1), True), "weight_scale": (_floats, False)}

# kind → {attribute: (type check, required)}
SPEC: dict[str, dict] = {
    "conv2d": {**PER_CHANNEL, "weight": (_array(4), True), "stride": (PAIR, True), "padding": (PAIR, True),
               "dilation": (PAIR, True), "groups": (INT, True), **ACC, **CLAMP},
    "linear": {**PER_CHANNEL, "weight": (_array(2), True), **ACC, **CLAMP},
    "matmul": {**REQUANT, **ACC, **CLAMP},
    "add": {"left_shift": (INT, True), "multiplier_a": (INT, True), "shift_a": (INT, True),
            "multiplier_b": (INT, True), "shift_b": (INT, True), **REQUANT, **CLAMP},
    "mul": {**REQUANT, **CLAMP},
    "concat": {"axis": (INT, True), "multipliers": (INTS, True), "shifts": (INTS, True), **CLAMP},
    "requantize": {**REQUANT, **CLAMP},
    "max_pool2d": {"kernel": (PAIR, True), "stride": (PAIR, True), "padding": (PAIR, True),
                   "ceil_mode": (BOOL, True)},
    "avg_pool2d": {"kernel": (PAIR, True), "stride": (PAIR, True), "padding": (PAIR, True),
                   "global": (BOOL, True), **REQUANT, **CLAMP},
    "lut": {"table": (_array((1, 2)), True)},
    "reshape": {"shape": (INTS, True)},
    "transpose": {"perm": (INTS, True)},
    "slice": {"axis": (INT, True), "start": (INT, True), "stop": (INT, True)},
}
MULTIPLIER_SHIFT = (("multiplier", "shift"), ("multiplier_a", "shift_a"), ("multiplier_b", "shift_b"),
                    ("multipliers", "shifts"))


def _fail(op: Op, what: str) -> None:
    raise IRError(f"IR op {op.name!r} ({op.kind}): {what}")


def _check_requant(op: Op, m, s) -> None:
    for mi, si in zip(np.ravel(m), np.ravel(s)):
        if not (int(mi) == 0 or (1 << 30) <= int(mi) < (1 << 31)):
            _fail(op, f"requantization multiplier {int(mi)} is neither 0 nor in [2^30, 2^31)")
        if not 0 <= 31 - int(si) <= 62 and int(mi) != 0:
            _fail(op, f"shift {int(si)}: the right shift 31 − s must lie in 0..62")


def _check_op(graph: Graph, op: Op) -> None:
    spec = SPEC.get(op.kind)
    if spec is None:
        _fail(op, f"unknown kind; the IR has {sorted(SPEC)}")
    unknown = sorted(set(op.attrs) - set(spec))
    if unknown:
        _fail(op, f"attributes {unknown} are not in the specification of {op.kind} ({sorted(spec)})")
    for name, (check, required) in spec.items():
        if name not in op.attrs:
            if required:
                _fail(op, f"missing attribute {name!r}")
            continue
        if not check(op.attrs[name]):
            _fail(op, f"attribute {name!r} = {op.attrs[name]!r:.80} has the wrong type or shape")
    a = op.attrs
    for m, s in MULTIPLIER_SHIFT:
        if m in a:
            _check_requant(op, a[m], a[s])
    out = graph.tensors[op.output]
    if "act_min" in a and not out.qmin <= a["act_min"] <= a["act_max"] <= out.qmax:
        _fail(op, f"act_min..act_max = {a['act_min']}..{a['act_max']} is not inside the output's codes "
                  f"{out.qmin}..{out.qmax}")
    if "overflow" in a or "acc_bits" in a or "tile" in a:
        try:
            check_mode(a.get("acc_bits"), a.get("tile"), a.get("overflow", "saturate"))
        except ValueError as exc:
            _fail(op, str(exc))
    if op.kind in ("conv2d", "linear"):
        outputs = a["weight"].shape[0]
        for name in ("bias", "multiplier", "shift"):
            if a[name].shape != (outputs,):
                _fail(op, f"{name} has shape {a[name].shape}, expected ({outputs},): one per output channel")
        x = graph.tensors[op.inputs[0]]
        groups = a.get("groups", 1)
        if x.shape and a["weight"].shape[1] * groups != x.shape[0 if op.kind == "conv2d" else -1]:
            _fail(op, f"weight {a['weight'].shape} × groups {groups} does not match input {op.inputs[0]!r} of "
                      f"shape {x.shape}")
    if op.kind == "lut":
        x = graph.tensors[op.inputs[0]]
        if a["table"].shape[-1] != x.qmax - x.qmin + 1:
            _fail(op, f"table has {a['table'].shape[-1]} entries per row for {x.qmax - x.qmin + 1} input codes")


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
