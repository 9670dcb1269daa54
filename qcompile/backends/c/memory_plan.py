"""Static arena planning for the generated C runtime.

Every intermediate buffer (activation or kernel scratch) is live from the op that writes
it to the last op that reads it. Buffers whose live ranges overlap never share bytes;
the others may. Offsets are chosen greedily by size (largest first, each at the lowest
aligned offset that fits between the already placed buffers it overlaps in time), the
"greedy by size" strategy of TFLite's arena planner.

Invariant of `plan`: for any two buffers a, b with overlapping [first, last] ranges,
[a.offset, a.offset + a.size) and [b.offset, b.offset + b.size) are disjoint, every offset
is a multiple of `align`, and `arena_bytes` covers every buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Buffer:
    name: str
    size: int          # bytes
    first: int         # index of the op that writes it
    last: int          # index of the last op that reads it (inclusive)
    offset: int = -1


@dataclass
class Plan:
    buffers: dict[str, Buffer]
    arena_bytes: int
    naive_bytes: int   # every buffer given its own space
    align: int = 64
    offsets: dict[str, int] = field(default_factory=dict)


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def plan(buffers: list[Buffer], align: int = 64) -> Plan:
    """Assign offsets to `buffers` (mutated) and return the plan."""
    placed: list[Buffer] = []
    for buf in sorted(buffers, key=lambda b: (-b.size, b.first, b.name)):
        if buf.first > buf.last:
            raise ValueError(f"buffer {buf.name!r}: live range [{buf.first}, {buf.last}] is empty")
        overlapping = sorted((b for b in placed if b.first <= buf.last and buf.first <= b.last),
                             key=lambda b: b.offset)
        offset = 0
        for other in overlapping:
            if offset + buf.size <= other.offset:
                break
            offset = max(offset, _round_up(other.offset + other.size, align))
        buf.offset = offset
        placed.append(buf)
    arena = max((_round_up(b.offset + b.size, align) for b in buffers), default=0)
    naive = sum(_round_up(b.size, align) for b in buffers)
    return Plan({b.name: b for b in buffers}, arena, naive, align, {b.name: b.offset for b in buffers})


def check(p: Plan) -> None:
    """Raise AssertionError if two simultaneously live buffers share a byte."""
    bufs = list(p.buffers.values())
    for i, a in enumerate(bufs):
        assert a.offset % p.align == 0 and a.offset + a.size <= p.arena_bytes, a
        for b in bufs[i + 1:]:
            if a.first <= b.last and b.first <= a.last:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
