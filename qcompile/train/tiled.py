"""Tiled narrow-accumulator matmuls: the training implementation of the accumulator semantics
(the reference interpreter has its own, in numpy; tests check both against plain integer loops).

Semantics: `qcompile.core.accumulator` (tiles of `tile` products, each exact; after each
tile the accumulator saturates or wraps into acc_bits; wrap is modular, so it is applied once;
"pairwise" saturates each pair's sum before adding it).
Overflow statistics: with saturation an event is one tile update whose exact value
acc_(t-1) + p_t left the range (it was clamped; "pairwise": also a pair sum p_t that was); with
wrap, intermediate wraps that cancel leave the result exact, so an event is an output whose wrapped result differs from the exact
sum. An output `overflowed` when it had at least one event.

Every function takes integer-valued tensors (int64, or float32/float64 holding integers) and
is exact whenever the bounds below hold; it raises otherwise. Integer operands give integer
results; float operands give the accumulator in the float dtype used (float32 or float64).
Partial sums are computed in float32 when every tile's Σ|products| < 2^24 (float32 holds every
integer below 2^24, so any summation order is exact) and in float64 (exact below 2^53)
otherwise. When the worst case |bias| + Σ|products| cannot leave the range, the whole
reduction is one exact op. Otherwise, on the CPU, a plan float32 keeps exact runs in the fused
kernel csrc/tiled_gemm.c (`_fused_gemm`: operands read in place through offset tables, each tile's
partial sums in registers). Elsewhere one batched GEMM (over the im2col matrix for a conv)
computes a chunk of tiles' partial sums at once, a (tiles, outputs) tensor; a clamp-scan over its
tile axis folds them into the accumulator (on the CPU in one pass, the C kernel csrc/clamp_scan.c;
torch ops elsewhere). Chunks bound the memory whatever the number of tiles. Both paths reduce in
the same order and give the same bits.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.core.accumulator import (
    OVERFLOW_MODES,
    acc_range,
    check_mode,
    l1_bounds,
    min_acc_bits,
    tile_plan,
    wrap,
)
from qcompile.core.grids import bias_codes, max_code_magnitude
from qcompile.train import native
from qcompile.train.one_pass import one_pass

FLOAT32_EXACT = 2 ** 24
FLOAT64_EXACT = 2 ** 53


@dataclass
class AccResult:
    """The accumulator after the last tile, per output; `exact` is bias + Σ partials (no overflow),
    None when not asked for (exact=False)."""
    acc: torch.Tensor
    exact: torch.Tensor | None  # exact as an integer type or below 2^24 (float32) / 2^53 (float64)
    overflowed: torch.Tensor | None     # bool, per output: at least one overflow event (None: not asked for,
                                        # flags=False, where the fused kernel only counted them)
    events: torch.Tensor        # int64 scalar: number of overflow events
    overflowed_count: int | None = None     # outputs that overflowed, where the fused kernel counted them


def _absmax(t: torch.Tensor | None) -> float:
    return float(t.detach().abs().max()) if t is not None and t.numel() else 0.0


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class _Plan:
    """How to run one reduction exactly: tile length/count and the float dtypes of partials and sums."""
    tile: int
    tiles: int
    part_dtype: torch.dtype
    acc_dtype: torch.dtype
    dense: bool                 # no overflow possible: compute the whole reduction at once
    fused_tile: int | None      # the tile length the fused kernel (float32) runs it with, or None: it cannot


WRAP_EXACT = 2 ** 22              # the fused kernel's wrap: |partial sum|, |bias| below it, acc_bits <= 23 keep it exact


def _plan(a, b, bias, length: int, acc_bits, tile, overflow, absmax=None) -> _Plan:
    check_mode(acc_bits, tile, overflow)
    amax, bmax = absmax if absmax is not None else (_absmax(a), _absmax(b))
    prod = amax * bmax
    total = length * prod + _absmax(bias)
    if total >= FLOAT64_EXACT:
        raise ValueError(f"operands too large for an exact accumulation: |bias| + Σ|products| can reach "
                         f"{total:.3g} >= 2^53")
    dense = acc_bits is None or total <= acc_range(acc_bits)[1]
    tl, T = tile_plan(length, None if dense else tile)
    part = torch.float32 if tl * prod < FLOAT32_EXACT else torch.float64
    # float32 sums are exact below 2^24; with saturation the accumulator stays in range (acc_bits <= 24),
    # an out-of-range value is clamped whatever its rounding, and `exact` is then only used as a float
    acc_ok = total < FLOAT32_EXACT or (overflow != "wrap" and acc_bits is not None and acc_bits <= 24
                                       and _absmax(bias) < FLOAT32_EXACT)
    acc = torch.float32 if part == torch.float32 and acc_ok else torch.float64
    if dense:
        fused = None
    elif overflow == "wrap":    # modular: any tile that keeps the sums exact gives the same result
        exact_wrap = acc_bits <= 23 and prod < WRAP_EXACT and _absmax(bias) < WRAP_EXACT
        fused = int((WRAP_EXACT - 1) // max(prod, 1)) if exact_wrap else None
    else:
        fused = tl if T >= 2 and acc == torch.float32 else None
    return _Plan(tl, 1 if dense else T, part, acc, dense, fused)


CHUNK_ELEMENTS = 1 << 21          # partial sums materialized at once (~8 MB of float32): still in the last-level cache
                                  # when the scan reads them (measured best of 2^20..2^23 on the benchmark)


class _Scratch(threading.local):
    """Per-thread reusable CPU buffers for the large temporaries (padded input, im2col matrix, partial
    sums): a fresh multi-megabyte tensor pays its page faults on every call, which costs more than
    the GEMM that fills it. A buffer's contents are only valid until the next request of its name;
    each holds about what one chunk of tiles needs (CHUNK_ELEMENTS)."""

    def __init__(self):
        self.buffers = {}

    def empty(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


_SCRATCH = _Scratch()


def run_tiles(partials: Callable[[int, int], torch.Tensor], tiles: int, start, acc_bits: int | None,
              overflow: str, per_tile: int, exact: bool = True) -> AccResult:
    """The accumulator over exact per-tile partial sums: partials(t0, t1) returns tiles t0..t1−1 as
    a tensor (t1−t0, *tile shape), a permuted view of a contiguous buffer that may be overwritten
    here; `start` (the initial accumulator, e.g. the bias; None: 0) broadcasts to one tile. Tiles
    are requested in chunks of about CHUNK_ELEMENTS / per_tile. Saturation is a clamp-scan over the
    tile axis (_clamp_scan). exact=False skips the exact sum where the result does not need it."""
    chunk = max(1, min(tiles, CHUNK_ELEMENTS // max(per_tile, 1)))
    saturate = acc_bits is not None and overflow in ("saturate", "pairwise")
    lo, hi = acc_range(acc_bits) if saturate else (None, None)
    keep_exact = exact or not saturate
    exact = acc = overflowed = None
    events = 0
    for t0 in range(0, tiles, chunk):
        ps = partials(t0, min(t0 + chunk, tiles))
        if keep_exact:
            s = ps.sum(0)
            exact = exact.add_(s) if exact is not None else s if start is None else s.add_(start)
        if not saturate:
            continue
        first = acc is None
        if first:
            acc = torch.empty(ps.shape[1:], dtype=ps.dtype, device=ps.device)
            overflowed = torch.empty(ps.shape[1:], dtype=torch.bool, device=ps.device)
            if start is not None:
                acc.copy_(start)
        events += _clamp_scan(ps, acc, lo, hi, overflowed, from_zero=first and start is None, first=first,
                              pairs=overflow == "pairwise")
    if saturate:
        return AccResult(acc, exact, overflowed, torch.tensor(events, dtype=torch.int64, device=acc.device))
    if acc_bits is None:
        none = torch.zeros((), dtype=torch.int64, device=exact.device)
        return AccResult(exact, exact, torch.zeros(exact.shape, dtype=torch.bool, device=exact.device), none)
    acc = wrap(exact, acc_bits)
    hit = acc != exact
    return AccResult(acc, exact, hit, hit.sum())


def _clamp_scan(ps: torch.Tensor, acc: torch.Tensor, lo: int, hi: int, overflowed: torch.Tensor,
                from_zero: bool, first: bool, pairs: bool = False) -> int:
    """Saturate one chunk of partial sums ps (tiles, *shape) into acc (*shape, contiguous; from_zero:
    uninitialized, the accumulator starts at 0): for each tile in order acc = clamp(acc + p_t, lo, hi)
    (pairs: clamp(acc + clamp(p_t, lo, hi), lo, hi), the "pairwise" mode); sets `overflowed` (bool, like
    acc; first: uninitialized) where a clamp changed a value and returns the number of such events. ps
    may be overwritten. On the CPU the C kernel csrc/clamp_scan.c does it in one pass over ps;
    elsewhere (or without a C compiler) torch ops."""
    lib = native.library("clamp_scan") if ps.device.type == "cpu" and ps.dtype in _SCAN_KERNELS else None
    if lib is None:
        if from_zero:
            acc.zero_()
        if first:
            overflowed.zero_()
        events = 0
        if pairs:                                 # the pair sums' own clamps, then the plain scan
            clamped = ps.clamp(lo, hi)
            hit = clamped != ps
            overflowed.logical_or_(hit.any(0))
            events = int(hit.sum())
            ps.copy_(clamped)
        return events + _clamp_scan_torch(ps, acc, lo, hi, overflowed)
    fn = getattr(lib, _SCAN_KERNELS[ps.dtype][0])
    if fn.argtypes is None:
        c_t = _SCAN_KERNELS[ps.dtype][1]
        fn.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2 + [c_t, c_t] + [ctypes.c_int] * 3
        fn.restype = ctypes.c_int64
    dims, inner = _outer_inner(ps.shape[1:], ps.stride()[1:])
    (outer, outer_stride), loops = (dims[-1], dims[:-1]) if dims else ((1, 0), [])
    size = ps.element_size()
    events = 0
    for index in itertools.product(*(range(n) for n, _ in loops)):   # dims the kernel's layout cannot merge
        off = sum(i * st for i, (_, st) in zip(index, loops))
        at = sum(i * math.prod(n for n, _ in loops[k + 1:]) for k, i in enumerate(index)) * outer * inner
        events += fn(ps.data_ptr() + off * size, ps.shape[0], ps.stride(0), outer, outer_stride, inner,
                     acc.data_ptr() + at * size, overflowed.data_ptr() + at, lo, hi, from_zero, first, pairs)
    return events


_SCAN_KERNELS = {torch.float32: ("qc_clamp_scan_f32", ctypes.c_float),
                 torch.float64: ("qc_clamp_scan_f64", ctypes.c_double)}


def _outer_inner(shape, strides) -> tuple[list[tuple[int, int]], int]:
    """One tile's layout (`shape`, element `strides`) as outer dims [(size, stride), ...] (adjacent dims
    merged where their strides allow) around a contiguous innermost run of `inner` elements."""
    dims = [(n, st) for n, st in zip(shape, strides) if n != 1]
    inner = 1
    while dims and dims[-1][1] == inner:
        inner *= dims.pop()[0]
    merged = []
    for n, st in dims:
        if merged and merged[-1][1] == st * n:
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    return merged, inner


SCAN_BLOCK = 1 << 17              # accumulators scanned together over the tiles: they stay in cache
MIN_RUN = 1 << 12                 # contiguous runs at least this long are scanned as flat blocks


def _scan_views(ps: torch.Tensor, acc: torch.Tensor, hit: torch.Tensor):
    """(partials, accumulator, hit) views to scan: one per index of a tile's outer dimensions when
    the rest of a tile is a contiguous run of at least MIN_RUN (flat views: fast elementwise ops),
    else the whole (strided) chunk."""
    shape, inner, run = ps.shape[1:], ps.dim() - 1, 1
    while inner and ps.stride(inner) == run:
        run *= shape[inner - 1]
        inner -= 1
    if run < MIN_RUN:
        return [(ps, acc, hit)]
    T = ps.shape[0]
    return [(ps[(slice(None), *i)].view(T, -1), acc[i].view(-1), hit[(slice(None), *i)].view(T, -1))
            for i in itertools.product(*map(range, shape[:inner]))]


def _clamp_scan_torch(ps: torch.Tensor, acc: torch.Tensor, lo: int, hi: int, overflowed: torch.Tensor) -> int:
    """_clamp_scan with torch ops: tile after tile on blocks of about SCAN_BLOCK outputs of each view
    (_scan_views), leaving d_t = v_t − clamp(v_t) in ps and d_t != 0 in a bool scratch shaped like ps."""
    hit = _SCRATCH.empty("hit", (ps.numel(),), torch.bool, ps.device).as_strided(ps.shape, ps.stride())
    for p_all, acc_all, hit_all in _scan_views(ps, acc, hit):
        width = p_all.shape[-1]
        step = max(1, -(-width // max(1, -(-acc_all.numel() // SCAN_BLOCK))))
        for b0 in range(0, width, step):
            a = acc_all[..., b0:b0 + step]
            for p, h in zip(p_all[..., b0:b0 + step], hit_all[..., b0:b0 + step]):
                p.add_(a)
                torch.clamp(p, lo, hi, out=a)
                h.copy_(p.sub_(a))
    hit = hit.view(torch.uint8)
    clamps = None
    for i in range(0, len(hit), 255):         # uint8 counts hold up to 255 tiles
        n = hit[i:i + 255].sum(0, dtype=torch.uint8)
        clamps = n if clamps is None else clamps.to(torch.int32).add_(n)
    overflowed.logical_or_(clamps.bool())
    return int(clamps.sum(dtype=torch.int64))


FUSED_MIN_FILL = 1 / 16           # roughly where the torch ops get faster: a depthwise conv's weight gradient
                                  # (1 x 9 per group) fills 1/50 of the blocks and took 1.4-1.7x their time
                                  # (2 x 32 x 56², 2 x 96 x 28²); its forward, 1/14, 0.75-1x


class _Operand(ctypes.Structure):
    """csrc/tiled_gemm.c's qc_operand: element [g, r, c] at base[group[g] + row[r] + col[c]]."""
    _fields_ = [("base", ctypes.c_void_p), ("group", ctypes.c_void_p), ("row", ctypes.c_void_p),
                ("col", ctypes.c_void_p)]


def _gemm_kernel(plan: _Plan, overflow: str, device, rows: int, cols: int, exact: bool):
    """The library of the fused tiled GEMM (csrc/tiled_gemm.c), or None: it serves the plans it can run
    exactly in float32 (`plan.fused_tile`; wrap with the exact sum asked for: only below 2^24) on the CPU
    whose product (about rows x cols per group) fills at least FUSED_MIN_FILL of its register blocks;
    elsewhere the partial sums are materialized and clamp-scanned or summed (run_tiles)."""
    if (torch.device(device).type != "cpu" or plan.fused_tile is None
            or (overflow == "wrap" and exact and plan.acc_dtype != torch.float32)):
        return None
    lib = native.library("tiled_gemm")
    if lib is None:
        return None
    blocks = min(min(_rounded_up(rows, mr) * _rounded_up(cols, nr), _rounded_up(cols, mr) * _rounded_up(rows, nr))
                 for mr, nr in _block_shapes(lib))
    return None if blocks * FUSED_MIN_FILL > rows * cols else lib


@functools.cache
def _block_shapes(lib) -> tuple[tuple[int, int], ...]:
    """The register block shapes (rows, columns) of the kernel's build, in its index order; sets the
    kernel's ctypes signature."""
    lib.qc_tiled_gemm_f32.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.POINTER(_Operand)] * 7 + \
        [ctypes.c_void_p] * 3 + [ctypes.c_float] * 2 + [ctypes.c_int, ctypes.c_void_p]
    lib.qc_tiled_gemm_f32.restype = ctypes.c_int
    shapes = (ctypes.c_int64 * 5)()
    lib.qc_tiled_gemm_shapes(shapes)
    return tuple((shapes[1 + 2 * i], shapes[2 + 2 * i]) for i in range(shapes[0]))


SHAPE_COST = {(8, 48): 1.05}      # a padded block's relative time by shape (others 1): 8 x 48 (AVX-512's second)
                                  # does 24 multiply-adds a step to 14 x 32's 28 (measured about 5% slower
                                  # unpadded); AVX2's 4 x 24 and 6 x 16 both do 12 (measured even unpadded)


def _block_plan(lib, M: int, N: int) -> tuple[int, bool]:
    """(shape index, swap) for C (M x N): the register block shape and orientation (swap: Cᵀ = Bᵀ Aᵀ,
    the short side as rows) that pad the product least, by SHAPE_COST; a shape's orientation swaps
    only where N's padding is over 1.1 times M's (a large operand packed as A costs more)."""
    best = None
    for i, (mr, nr) in enumerate(_block_shapes(lib)):
        swap = _rounded_up(N, nr) / N > 1.1 * _rounded_up(M, mr) / M
        rows, cols = (N, M) if swap else (M, N)
        cost = _rounded_up(rows, mr) * _rounded_up(cols, nr) * SHAPE_COST.get((mr, nr), 1.0)
        if best is None or cost < best[0]:
            best = (cost, i, swap)
    return best[1], best[2]


@functools.lru_cache(maxsize=1024)
def _offsets(*axes: tuple[int, ...]) -> torch.Tensor:
    """An offset table: for axes (n, step) or (n, step, first), first + i·step summed over the axes for
    every index (i_0, i_1, ...) in row-major order, flattened (int64; cached by geometry, never written)."""
    out = torch.zeros((), dtype=torch.int64)
    for n, step, *first in axes:
        out = out.unsqueeze(-1) + (sum(first) + torch.arange(n, dtype=torch.int64) * step)
    return out.reshape(-1)


@functools.lru_cache(maxsize=4096)
def _table_pointers(group: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> tuple[int, int, int]:
    """The data pointers of an operand's offset tables: _offsets' tensors, contiguous and never written (the
    cache holds them, so a pointer stays valid)."""
    if not all(t.is_contiguous() and t.dtype == torch.int64 for t in (group, row, col)):
        raise ValueError("tiled accumulator: offset tables are contiguous int64 tensors")
    return group.data_ptr(), row.data_ptr(), col.data_ptr()


def _fused_gemm(lib, tile: int, acc_bits: int, overflow: str, a: torch.Tensor, a_tab, b: torch.Tensor, b_tab,
                out: AccResult, out_tab, start: torch.Tensor | None = None, start_tab=None, a_mult=None,
                b_mult=None, out_mult=None) -> None:
    """The tiled accumulator of C[g] = A[g] B[g] (+ start) in the `overflow` mode through the fused
    kernel (`lib`), each operand read through its offset tables (group, row, col) relative to its first
    element (A's col and B's row walk the reduction, in its order); writes out.acc / out.overflowed
    (/ out.exact, when not None) at out_tab's offsets and adds the events and the outputs that
    overflowed to out.events and out.overflowed_count (each output written by one call). Float32
    operands; a_mult / b_mult (None, or (multipliers, their tables) shaped like the operand's): the
    operand holds real values whose codes are rint(value·multiplier) (_codes); out_mult (the same,
    shaped like the output): out.acc is written times it (real units; out.exact stays in codes)."""
    if max(t.numel() for t in (a, b, out.acc)) >= 2 ** 31:
        raise ValueError("tiled accumulator: the fused kernel addresses its operands with 32-bit offsets; "
                         f"a tensor of {max(a.numel(), b.numel(), out.acc.numel())} elements is too large")
    lo, hi = acc_range(acc_bits)
    shape, swap = _block_plan(lib, len(a_tab[1]), len(b_tab[2]))
    if swap:                                                        # Cᵀ = Bᵀ Aᵀ
        def flip(tab):
            return None if tab is None else (tab[0], tab[2], tab[1])
        a, a_tab, b, b_tab = b, flip(b_tab), a, flip(a_tab)
        a_mult, b_mult = (None if m is None else (m[0], flip(m[1])) for m in (b_mult, a_mult))
        out_mult = None if out_mult is None else (out_mult[0], flip(out_mult[1]))
        out_tab, start_tab = flip(out_tab), flip(start_tab)

    def operand(base: torch.Tensor | None, tab):
        return _Operand(None if base is None else base.data_ptr(), *_table_pointers(*tab))
    ops = [operand(a, a_tab), operand(b, b_tab), *(operand(None, out_tab) if m is None else operand(*m)
                                                  for m in (a_mult, b_mult)),
           operand(start, start_tab or out_tab), operand(None, out_tab),
           operand(None, out_tab) if out_mult is None else operand(*out_mult)]
    counts = (ctypes.c_int64 * 2)()
    if lib.qc_tiled_gemm_f32(shape, len(a_tab[0]), len(a_tab[1]), len(b_tab[2]), len(a_tab[2]), tile,
                             *map(ctypes.byref, ops), out.acc.data_ptr(),
                             None if out.exact is None else out.exact.data_ptr(),
                             None if out.overflowed is None else out.overflowed.data_ptr(),
                             lo, hi, OVERFLOW_MODES.index(overflow), counts) < 0:
        raise MemoryError("tiled accumulator: the fused kernel could not allocate its scratch memory")
    out.events.add_(counts[0])
    out.overflowed_count += counts[1]


def _matrix_tables(t: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offset tables (batch index, row, column) of a matrix or batch of matrices `t` broadcast to the
    batch shape `batch` (broadcast dimensions: offset 0)."""
    t = t.expand(*batch, *t.shape[-2:])
    st = t.stride()
    return _offsets(*zip(batch, st[:-2])), _offsets((t.shape[-2], st[-2])), _offsets((t.shape[-1], st[-1]))


def _rounded_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _outputs(shape, exact: bool, flags: bool, zeroed: bool = False) -> AccResult:
    """Float32 accumulator (and exact sum, and overflow flags where asked for) of `shape` for _fused_gemm
    to write: uninitialized, or zeroed where some outputs get no product (then 0, no overflow); no
    events yet."""
    new = torch.zeros if zeroed else torch.empty
    return AccResult(new(shape), new(shape) if exact else None, new(shape, dtype=torch.bool) if flags else None,
                     torch.zeros((), dtype=torch.int64), 0)


def _codes(t: torch.Tensor, mult: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """The integer codes of real values `t` on a grid: rint(t·mult), mult = 1/scale (a 0-d tensor, or one
    per index of `axis`), the product in float32 and rounded half to even: the fused kernel's arithmetic
    (csrc/tiled_gemm.c, multiplier operands). On the grid, t·(1/scale) is within a few ulps of its code."""
    m = mult.to(torch.float32)
    return torch.mul(t.to(torch.float32), m if axis is None or m.dim() == 0 else _channel_view(m, t.dim(), axis)).round_()


def _per_channel(mult: torch.Tensor, n: int) -> torch.Tensor:
    """A multiplier (0-d, or one per channel) as n float32 values, one per channel."""
    return mult.to(torch.float32).reshape(-1).expand(n).contiguous()


def _scaled(res: AccResult, scale: torch.Tensor | None, view) -> AccResult:
    """res with its accumulator times `scale` (reshaped to `view` over the outputs; None: res itself), in
    the accumulator's float dtype (float32 for an integer one): what the fused kernel's output
    multipliers write (out_mult), elsewhere. The exact sum is left in codes."""
    if scale is None:
        return res
    acc = res.acc.to(torch.float32) if not res.acc.is_floating_point() else \
        res.acc.clone() if res.acc is res.exact else res.acc
    return AccResult(acc.mul_(scale.to(acc.dtype).reshape(view)), res.exact, res.overflowed, res.events,
                     res.overflowed_count)


def _bias_start(bias: torch.Tensor | None, dtype: torch.dtype):
    """The initial accumulator: the bias (shaped to broadcast to one tile) or None (0)."""
    return None if bias is None else bias.to(dtype)


def _apply(res: AccResult, fn) -> AccResult:
    """`fn` (a reshape / permutation) applied to every per-output tensor of `res`."""
    return AccResult(fn(res.acc), None if res.exact is None else fn(res.exact),
                     None if res.overflowed is None else fn(res.overflowed), res.events, res.overflowed_count)


def _out_dtype(ref: torch.Tensor) -> torch.dtype | None:
    """Integer operands give integer results; float operands keep the (exact) accumulation dtype."""
    return ref.dtype if ref.dtype in (torch.int64, torch.int32) else None


def _cast(res: AccResult, dtype: torch.dtype | None) -> AccResult:
    if dtype is None:
        return res
    return _apply(res, lambda t: t if t.dtype == torch.bool else t.round().to(dtype))


@torch.no_grad()
def tiled_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
                 acc_bits: int | None, tile: int | None, overflow: str = "saturate", absmax=None,
                 exact: bool = True) -> AccResult:
    """a (..., M, K) @ b (..., K, N) (+ bias broadcast to (..., M, N)) with the tiled accumulator;
    the reduction runs over K in index order. `absmax`=(max|a|, max|b|), when known, skips measuring;
    exact=False may leave AccResult.exact None (as in every tiled op)."""
    K = a.shape[-1]
    if b.shape[-2] != K:
        raise ValueError(f"tiled_matmul: inner dimensions differ ({tuple(a.shape)} @ {tuple(b.shape)})")
    plan = _plan(a, b, bias, K, acc_bits, tile, overflow, absmax)
    tl, T = plan.tile, plan.tiles
    M, N = a.shape[-2], b.shape[-1]
    fused = _gemm_kernel(plan, overflow, a.device, M, N, exact)
    if fused is not None:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        out = _outputs((*batch, M, N), exact, True)
        start = None if bias is None else bias.to(torch.float32).expand(*batch, M, N)
        a_, b_ = a.to(torch.float32), b.to(torch.float32)
        _fused_gemm(fused, plan.fused_tile, acc_bits, overflow, a_, _matrix_tables(a_, batch), b_,
                    _matrix_tables(b_, batch), out, _matrix_tables(out.acc, batch), start,
                    None if start is None else _matrix_tables(start, batch))
        return _cast(out, _out_dtype(a))
    a_, b_ = a.to(plan.part_dtype), b.to(plan.part_dtype)
    full = K // tl                                                          # tiles of tl products; then maybe a short one
    a_t = a_[..., :full * tl].unflatten(-1, (full, tl)).movedim(-2, 0)      # (full, ..., M, tl): views
    b_t = b_[..., :full * tl, :].unflatten(-2, (full, tl)).movedim(-3, 0)   # (full, ..., tl, N)
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])

    def partials(t0, t1):
        ps = _SCRATCH.empty("partials", (t1 - t0, *shape), a_.dtype, a.device)
        n = min(t1, full) - t0
        if n > 0:
            torch.matmul(a_t[t0:t0 + n], b_t[t0:t0 + n], out=ps[:n])
        if t1 > full:                                                       # the short last tile
            torch.matmul(a_[..., full * tl:], b_[..., full * tl:, :], out=ps[-1])
        return ps.to(plan.acc_dtype)

    res = run_tiles(partials, T, _bias_start(bias, plan.acc_dtype), None if plan.dense else acc_bits, overflow,
                    per_tile=math.prod(shape), exact=exact)
    return _cast(res, _out_dtype(a))


def tiled_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                 acc_bits: int | None, tile: int | None, overflow: str = "saturate", absmax=None,
                 exact: bool = True) -> AccResult:
    """x (..., in) · w (out, in)ᵀ + bias (out,), reduction over in_features in index order (the leading
    dimensions of x are flattened into rows: w has no batch dimensions to broadcast with them)."""
    res = tiled_matmul(x.reshape(-1, x.shape[-1]), w.t(), bias, acc_bits=acc_bits, tile=tile, overflow=overflow,
                       absmax=absmax, exact=exact)
    return _apply(res, lambda t: t.reshape(*x.shape[:-1], t.shape[-1]))


@torch.no_grad()
def tiled_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                 dilation=1, groups: int = 1, *, acc_bits: int | None, tile: int | None,
                 overflow: str = "saturate", absmax=None, exact: bool = True,
                 w_mult: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
                 flags: bool = True) -> AccResult:
    """conv2d of integer operands x (N, C, H, W) (already x − zx: padding contributes 0) and
    w (O, C/groups, kh, kw), bias (O,), with the tiled accumulator (see the module docstring).
    The tiles are GEMMs over the im2col matrix, whose rows are in (c, ky, kx) order.
    w_mult: w holds real values on a grid and the operand is its codes, _codes(w, w_mult per output
    channel); `absmax` (the codes' bounds) is then required. The fused kernel reads the codes from the
    real values as it packs them; elsewhere they are formed first. out_scale (0-d, or one per output
    channel): the accumulator is returned times it, the output in real units (`_scaled`; the exact sum
    stays in codes), written so by the fused kernel. flags=False: the overflow flags may be left None
    (as in every tiled conv; the fused kernel then only counts the outputs that overflowed)."""
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"tiled_conv2d: expects 4-d x and w, got {tuple(x.shape)} and {tuple(w.shape)}")
    O, cin_g, kh, kw = w.shape
    N, K = x.shape[0], cin_g * kh * kw
    if w_mult is not None and absmax is None:
        raise ValueError("tiled_conv2d: a weight given as real values (w_mult) needs its codes' bounds (absmax)")
    plan = _plan(x, w, bias, K, acc_bits, tile, overflow, absmax)
    og, kk = O // groups, kh * kw
    Ho, Wo = _conv_out_hw(x.shape[-2:], (kh, kw), stride, padding, dilation)
    L = Ho * Wo
    fused = None if plan.tiles == 1 else _gemm_kernel(plan, overflow, x.device, og, N * L, exact)
    if w_mult is not None and fused is None:
        w = _codes(w, w_mult, 0)
    if plan.tiles == 1:
        y = F.conv2d(x.to(plan.part_dtype), w.to(plan.part_dtype), None, stride, padding, dilation, groups)
        y = y.to(plan.acc_dtype)
        start = _bias_start(None if bias is None else bias.view(-1, 1, 1), plan.acc_dtype)
        res = run_tiles(lambda t0, t1: y.unsqueeze(0), 1, start, None if plan.dense else acc_bits, overflow,
                        per_tile=y.numel(), exact=exact)
        return _scaled(_cast(res, _out_dtype(x)), out_scale, (1, -1, 1, 1))
    tl, T = plan.tile, plan.tiles
    ph, pw = _pair(padding)
    if fused is not None:                                  # A = the weights (G, og, K), B = im2col read in place
        xp = _padded(x, (ph, ph, pw, pw), torch.float32)
        sN, sC, sH, sW = xp.stride()
        (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
        out = _outputs((N, O, Ho, Wo), exact, flags)
        a_tab = (_offsets((groups, og * K)), _offsets((og, K)), _offsets((K, 1)))
        b_tab = (_offsets((groups, cin_g * sC)), _offsets((cin_g, sC), (kh, dh * sH), (kw, dw * sW)),
                 _offsets((N, sN), (Ho, sh * sH), (Wo, sw * sW)))
        out_tab = (_offsets((groups, og * L)), _offsets((og, L)), _offsets((N, O * L), (L, 1)))
        start = None if bias is None else bias.to(torch.float32).contiguous()
        start_tab = (_offsets((groups, og)), _offsets((og, 1)), _offsets((N * L, 0)))      # the bias: per row
        a_mult = None if w_mult is None else (             # per output channel: per row
            _per_channel(w_mult, O), (_offsets((groups, og)), _offsets((og, 1)), _offsets((K, 0))))
        out_mult = None if out_scale is None else (
            _per_channel(out_scale, O), (_offsets((groups, og)), _offsets((og, 1)), _offsets((N * L, 0))))
        _fused_gemm(fused, plan.fused_tile, acc_bits, overflow, w.to(torch.float32).contiguous(), a_tab, xp, b_tab,
                    out, out_tab, start, start_tab, a_mult, out_mult=out_mult)
        return out if out_scale is not None else _cast(out, _out_dtype(x))
    xp = _padded(x, (ph, ph, pw, pw), plan.part_dtype)
    wt = w.to(plan.part_dtype).reshape(groups, og, K)
    wt = F.pad(wt, (0, T * tl - K)) if T * tl > K else wt                                  # (G, og, T·tl)

    def partials(t0, t1):                                  # tiles t0..t1−1: (t1−t0, G, og, N·L)
        k0, k1 = t0 * tl, min(t1 * tl, K)
        c0, c1 = k0 // kk, -(-k1 // kk)                    # the input channels (per group) these tiles read
        off, rows = k0 - c0 * kk, (t1 - t0) * tl
        cols = _SCRATCH.empty("cols", (groups, max((c1 - c0) * kk, off + rows), N * L), xp.dtype, x.device)
        _im2col(cols, xp, c0, c1, cin_g, (kh, kw), (Ho, Wo), stride, dilation)
        cols = cols[:, off:off + rows].view(groups, t1 - t0, tl, N * L)
        wk = wt[:, :, t0 * tl:t1 * tl].view(groups, og, t1 - t0, tl).transpose(1, 2)        # (G, T', og, tl)
        ps = _SCRATCH.empty("partials", (groups, t1 - t0, og, N * L), xp.dtype, x.device)
        return torch.matmul(wk, cols, out=ps).transpose(0, 1).to(plan.acc_dtype)

    start = _bias_start(None if bias is None else bias.view(groups, og, 1), plan.acc_dtype)
    res = run_tiles(partials, T, start, acc_bits, overflow, per_tile=max(O, tl) * N * L, exact=exact)
    res = _cast(_apply(res, lambda t: t.reshape(O, N, Ho, Wo).transpose(0, 1).contiguous()), _out_dtype(x))
    return _scaled(res, out_scale, (1, -1, 1, 1))


def _padded(x: torch.Tensor, pads, dtype: torch.dtype) -> torch.Tensor:
    """x (N, C, H, W) in `dtype`, zero-padded by pads = (top, bottom, left, right): a scratch buffer
    (x itself when there is nothing to pad or convert)."""
    (ph0, ph1, pw0, pw1), (N, C, H, W) = pads, x.shape
    if not any(pads) and x.dtype == dtype and x.is_contiguous():
        return x
    xp = _SCRATCH.empty("padded", (N, C, H + ph0 + ph1, W + pw0 + pw1), dtype, x.device)
    if dtype != torch.float32 or not _pad_in_one_pass(x, xp, pads):
        xp.zero_()              # one contiguous fill: faster than the border's strips (one element wide)
        xp[:, :, ph0:ph0 + H, pw0:pw0 + W] = x
    return xp


def _pad_in_one_pass(x: torch.Tensor, out: torch.Tensor, pads, mult: torch.Tensor | None = None) -> bool:
    """out (float32, contiguous) <- x (N, C, H, W) zero-padded by pads = (top, bottom, left, right), each value
    x or (a one-value `mult` given) _codes(x, mult), in one pass of C (csrc/fake_quant.c qc_padded) where x is a
    contiguous float32 CPU tensor (eager); False, nothing written, elsewhere."""
    lib = one_pass(x)
    if lib is None or (mult is not None and mult.numel() != 1):
        return False
    m = None if mult is None else mult.to(torch.float32).reshape(1)
    lib.qc_padded(x.data_ptr(), out.data_ptr(), x.shape[0] * x.shape[1], *x.shape[2:], *pads,
                  None if m is None else m.data_ptr())
    return True


def _im2col(out: torch.Tensor, xp: torch.Tensor, c0: int, c1: int, cin_g: int, k, hw_out, stride, dilation) -> None:
    """out (G, R, Q) ← the im2col matrix, one strided copy:
    out[g, (c − c0, ky, kx), (n, i, j)] = xp[n, g·cin_g + c, i·s + ky·d, j·s + kx·d] for c in [c0, c1) of
    each group g; every other entry ← 0. `xp` is the already padded input (N, C, Hp, Wp)."""
    (kh, kw), (Ho, Wo), (sh, sw), (dh, dw) = k, hw_out, _pair(stride), _pair(dilation)
    G = out.shape[0]
    N, n_c = xp.shape[0], c1 - c0
    rows, width = n_c * kh * kw, N * Ho * Wo
    sN, sC, sH, sW = xp.stride()
    src = xp.as_strided((G, n_c, kh, kw, N, Ho, Wo), (cin_g * sC, sC, dh * sH, dw * sW, sN, sh * sH, sw * sW),
                        xp.storage_offset() + c0 * sC)
    out[:, :rows, :width].view(G, n_c, kh, kw, N, Ho, Wo).copy_(src)
    out[:, rows:].zero_()
    out[:, :rows, width:].zero_()


def _conv_out_hw(hw, k, stride, padding, dilation) -> tuple[int, int]:
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return ((hw[0] + 2 * ph - dh * (k[0] - 1) - 1) // sh + 1, (hw[1] + 2 * pw - dw * (k[1] - 1) - 1) // sw + 1)


# ---- backward matmuls: the same tiled accumulator over the backward reductions ----------------

@torch.no_grad()
def tiled_conv2d_input_grad(g: torch.Tensor, w: torch.Tensor, input_hw, stride=1, padding=0, dilation=1,
                            groups: int = 1, *, acc_bits: int | None, tile: int | None,
                            overflow: str = "saturate", absmax=None, exact: bool = True,
                            w_mult: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
                            flags: bool = True) -> AccResult:
    """G_X = G_Y·Wᵀ of conv2d, for stride 1: the conv2d of G_Y padded by dilation·(k−1) − padding on
    each side with the spatially flipped, in/out-transposed kernel. Its reduction runs over
    (c_out/groups, ky', kx') of the flipped kernel (padding contributes 0) and is tiled like any conv.
    With stride > 1 (G_Y with stride − 1 zeros inserted between its rows and columns) the inserted
    zeros take no slot: each output reduces over the taps that meet G_Y (_strided_input_grad).
    w_mult: w holds real values, the operand is _codes(w, w_mult per output channel) (absmax required);
    out_scale (0-d, or one per input channel): the result times it, and flags, as tiled_conv2d's."""
    N, O, Ho, Wo = g.shape
    _, cin_g, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    if w_mult is not None and absmax is None:
        raise ValueError("tiled_conv2d_input_grad: a weight given as real values (w_mult) needs its codes' bounds "
                         "(absmax)")
    plan = _plan(g, w, None, (O // groups) * kh * kw, acc_bits, tile, overflow, absmax)
    fused = _gemm_kernel(plan, overflow, g.device, cin_g, N * input_hw[0] * input_hw[1] // (sh * sw), exact)
    if fused is not None:
        res = _fused_input_grad(fused, g, w, input_hw, stride, padding, dilation, groups, acc_bits, overflow,
                                plan.fused_tile, exact, flags, w_mult, out_scale)
        return res if out_scale is not None else _cast(res, _out_dtype(g))
    if w_mult is not None:
        w = _codes(w, w_mult, 0)
    if (sh, sw) != (1, 1):
        return _scaled(_strided_input_grad(g, w, input_hw, stride, padding, dilation, groups, acc_bits=acc_bits,
                                           tile=tile, overflow=overflow, absmax=absmax, exact=exact),
                       out_scale, (1, -1, 1, 1))
    lh, lw = dh * (kh - 1) - ph, dw * (kw - 1) - pw       # stride 1: the same padding after as before
    if lh < 0 or lw < 0:                                   # padding wider than the kernel: crop instead
        ch, cw = max(0, -lh), max(0, -lw)
        g, lh, lw = g[:, :, ch:Ho - ch, cw:Wo - cw], max(0, lh), max(0, lw)
    og = O // groups
    # the flipped, in/out-transposed kernel, laid out (groups, og, ky', kx', cin_g): a small transpose per
    # output channel; with one group its (cin_g, og·kh·kw) weight matrix is a view (no large transpose)
    wt = w.reshape(groups, og, cin_g, kh, kw).permute(0, 1, 3, 4, 2).flip(2, 3).contiguous()
    wt = wt.permute(0, 4, 1, 2, 3).reshape(groups * cin_g, og, kh, kw)
    return tiled_conv2d(g, wt, None, 1, (lh, lw), (dh, dw), groups, acc_bits=acc_bits, tile=tile, overflow=overflow,
                        absmax=absmax, exact=exact, out_scale=out_scale)


def _phase_taps(r: int, k: int, s: int, d: int, lead: int, n_in: int, n_out: int):
    """Along one axis of a strided conv's G_X (stuffed, padded G_Y read at y + a·d, `lead` = d·(k−1) −
    padding before it): the flipped-kernel taps a (ascending) that meet a real G_Y row at the outputs
    y ≡ r (mod s), as (taps, q0, q_step): output y = r + s·m reads G_Y row m + q0 + q_step·(index of a
    in taps). Also the zero rows G_Y needs before and after (n_in rows; m < n_out) for every read."""
    taps = [a for a in range(k) if (r + a * d - lead) % s == 0]
    if not taps:
        return taps, 0, 0, (0, 0)
    q0 = (r + taps[0] * d - lead) // s
    q_step = (taps[1] - taps[0]) * d // s if len(taps) > 1 else 0
    q1 = q0 + q_step * (len(taps) - 1)
    return taps, q0, q_step, (max(0, -q0), max(0, n_out - 1 + q1 - (n_in - 1)))


def _phase_pads(kernel, stride, dilation, padding, grad_hw, input_hw):
    """Per axis, _phase_taps of every phase (outputs y ≡ r mod s), and the padding of G_Y that serves all
    phases' reads: ((rows' taps, cols' taps), (top, bottom, left, right))."""
    axes = [[_phase_taps(r, k, s, d, d * (k - 1) - p, n_in, -(-n // s)) for r in range(s)]
            for k, s, d, p, n_in, n in zip(kernel, stride, dilation, padding, grad_hw, input_hw)]
    return axes, tuple(max(t[3][e] for t in axis) for axis in axes for e in (0, 1))


def _fused_input_grad(lib, g, w, input_hw, stride, padding, dilation, groups: int, acc_bits: int, overflow: str,
                      tile: int, exact: bool, flags: bool, w_mult: torch.Tensor | None,
                      out_scale: torch.Tensor | None) -> AccResult:
    """tiled_conv2d_input_grad through the fused kernel, phase by phase (see _strided_input_grad; stride 1
    is one phase with every tap): A = the flipped kernel's taps of the phase, read in place from w;
    B = G_Y (padded) at those taps, C written at the phase's outputs. An output no tap reaches stays 0."""
    N, O, Ho, Wo = g.shape
    _, cin_g, kh, kw = w.shape
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    H, W = input_hw
    og, C = O // groups, groups * cin_g
    (rows, cols), pads = _phase_pads((kh, kw), (sh, sw), (dh, dw), _pair(padding), (Ho, Wo), (H, W))
    gp = _padded(g, pads, torch.float32)
    top, left = pads[0], pads[2]
    sN, sC, sH, sW = gp.stride()
    wf = w.to(torch.float32).contiguous()
    reached = []                                           # the phases some tap reaches, with their outputs per axis
    for (ry, (ta, qa, sa, _)), (rx, (tb, qb, sb, _)) in itertools.product(enumerate(rows), enumerate(cols)):
        mh, mw = -(-(H - ry) // sh), -(-(W - rx) // sw)
        if ta and tb and mh > 0 and mw > 0:
            reached.append((ry, rx, ta, qa, sa, tb, qb, sb, mh, mw))
    out = _outputs((N, C, H, W), exact, flags, zeroed=len(reached) < len(rows) * len(cols))   # else all written
    w_m = None if w_mult is None else _per_channel(w_mult, O)
    out_m = None if out_scale is None else _per_channel(out_scale, C)
    for ry, rx, ta, qa, sa, tb, qb, sb, mh, mw in reached:
        da, db = (t[1] - t[0] if len(t) > 1 else 0 for t in (ta, tb))            # the taps step evenly
        a_tab = (_offsets((groups, og * cin_g * kh * kw)), _offsets((cin_g, kh * kw)),
                 _offsets((og, cin_g * kh * kw), (len(ta), -da * kw, (kh - 1 - ta[0]) * kw),
                          (len(tb), -db, kw - 1 - tb[0])))
        b_tab = (_offsets((groups, og * sC)),
                 _offsets((og, sC), (len(ta), sa * sH, (qa + top) * sH), (len(tb), sb * sW, (qb + left) * sW)),
                 _offsets((N, sN), (mh, sH), (mw, sW)))
        out_tab = (_offsets((groups, cin_g * H * W)), _offsets((cin_g, H * W)),
                   _offsets((N, C * H * W), (mh, sh * W, ry * W), (mw, sw, rx)))
        a_mult = None if w_m is None else (         # per output channel o: along the reduction (o, taps)
            w_m, (_offsets((groups, og)), _offsets((cin_g, 0)), _offsets((og, 1), (len(ta), 0), (len(tb), 0))))
        out_mult = None if out_m is None else (       # per input channel: per row
            out_m, (_offsets((groups, cin_g)), _offsets((cin_g, 1)), _offsets((N * mh * mw, 0))))
        _fused_gemm(lib, tile, acc_bits, overflow, wf, a_tab, gp, b_tab, out, out_tab, a_mult=a_mult,
                    out_mult=out_mult)
    return out


@torch.no_grad()
def _strided_input_grad(g, w, input_hw, stride, padding, dilation, groups, *, acc_bits, tile, overflow,
                        absmax, exact) -> AccResult:
    """tiled_conv2d_input_grad for stride > 1, without the inserted zeros. The outputs split into
    s_h·s_w phases (y mod s_h, x mod s_w); in each only the taps of _phase_taps meet G_Y rows, so a
    phase is an ordinary conv of G_Y with those taps of the flipped kernel: its reduction runs over
    (o, a, b) for those taps in that order and is tiled like any conv (an inserted zero takes no
    slot in a tile; padding does)."""
    N, O, Ho, Wo = g.shape
    _, cin_g, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    H, W = input_hw
    og, kk = O // groups, kh * kw
    K, C = og * kk, groups * cin_g
    plan = _plan(g, w, None, K, acc_bits, tile, overflow, absmax)       # every phase reduces over <= K products
    if plan.dense:
        y = torch.nn.grad.conv2d_input((N, C, H, W), w.to(plan.part_dtype), g.to(plan.part_dtype), stride,
                                       padding, dilation, groups).to(plan.acc_dtype)
        return _cast(run_tiles(lambda t0, t1: y.unsqueeze(0), 1, None, None, overflow, per_tile=y.numel()),
                     _out_dtype(g))
    Mh, Mw = -(-H // sh), -(-W // sw)                     # outputs per phase (padded to the largest phase)
    (rows, cols_), pads = _phase_pads((kh, kw), (sh, sw), (dh, dw), (ph, pw), (Ho, Wo), (H, W))
    top, left = pads[0], pads[2]
    gp = _padded(g, pads, plan.part_dtype)
    sN, sC, sH, sW = gp.stride()
    wg = w.to(plan.part_dtype).reshape(groups, og, cin_g, kh, kw)
    Q = N * Mh * Mw
    phases = []
    for s, ((ta, qa, sa, _), (tb, qb, sb, _)) in enumerate((ra, rb) for ra in rows for rb in cols_):
        R = og * len(ta) * len(tb)
        if not R:                                          # no tap meets G_Y: these outputs sum nothing
            phases.append(None)
            continue
        tl, T = tile_plan(R, tile)
        red = _SCRATCH.empty("phase", (groups, T * tl, Q), gp.dtype, g.device)  # the phase's im2col, rows (o, a, b)
        src = gp.as_strided((groups, og, len(ta), len(tb), N, Mh, Mw), (og * sC, sC, sa * sH, sb * sW, sN, sH, sW),
                            gp.storage_offset() + (qa + top) * sH + (qb + left) * sW)
        red[:, :R].view(groups, og, len(ta), len(tb), N, Mh, Mw).copy_(src)
        red[:, R:].zero_()
        ry, rx = divmod(s, sw)                             # outputs past H, W (phase padding) read zeros
        red.view(groups, T * tl, N, Mh, Mw)[:, :, :, -(-(H - ry) // sh):].zero_()
        red.view(groups, T * tl, N, Mh, Mw)[:, :, :, :, -(-(W - rx) // sw):].zero_()
        wk = _SCRATCH.empty("phase_weights", (groups, T * tl, cin_g), gp.dtype, g.device)     # row (o, a, b)
        flipped = wg.index_select(3, torch.tensor([kh - 1 - a for a in ta], device=g.device))
        flipped = flipped.index_select(4, torch.tensor([kw - 1 - b for b in tb], device=g.device))
        wk[:, :R].view(groups, og, len(ta), len(tb), cin_g).copy_(flipped.permute(0, 1, 3, 4, 2))
        wk[:, R:].zero_()

        def partials(t0, t1, red=red, wk=wk, tl=tl):       # tiles t0..t1−1: (t1−t0, G, cin_g, Q)
            ps = _SCRATCH.empty("partials", (groups, t1 - t0, cin_g, Q), gp.dtype, g.device)
            a = wk[:, t0 * tl:t1 * tl].view(groups, t1 - t0, tl, cin_g).transpose(-1, -2)
            return torch.matmul(a, red[:, t0 * tl:t1 * tl].view(groups, t1 - t0, tl, Q), out=ps).transpose(0, 1) \
                .to(plan.acc_dtype)

        phases.append(run_tiles(partials, T, None, acc_bits, overflow, per_tile=groups * max(cin_g, tl) * Q,
                                exact=exact))
    some = next(r for r in phases if r is not None)

    def stack(field):                                      # (S, G, cin_g, N·Mh·Mw), zeros for an empty phase
        if getattr(some, field) is None:                   # exact=False: no phase kept its exact sum
            return None
        return torch.stack([getattr(r, field) if r is not None else torch.zeros_like(getattr(some, field))
                            for r in phases])

    def to_input(t):                                       # (S, G, cin_g, N·Mh·Mw) → (N, C, H, W)
        t = t.reshape(sh, sw, C, N, Mh, Mw).permute(3, 2, 4, 0, 5, 1).reshape(N, C, Mh * sh, Mw * sw)
        return t[:, :, :H, :W].contiguous()
    res = AccResult(stack("acc"), stack("exact"), stack("overflowed"), sum(r.events for r in phases if r is not None))
    return _cast(_apply(res, to_input), _out_dtype(g))


@torch.no_grad()
def tiled_conv2d_weight_grad(x: torch.Tensor, g: torch.Tensor, weight_shape, stride=1, padding=0, dilation=1,
                             groups: int = 1, *, acc_bits: int | None, tile: int | None,
                             overflow: str = "saturate", absmax=None, exact: bool = True,
                             out_scale: torch.Tensor | None = None, flags: bool = True) -> AccResult:
    """G_W = Xᵀ·G_Y of conv2d: G_W[o, c, ky, kx] = Σ_(n, i, j) G_Y[n, o, i, j]·X_pad[n, c, i·s + ky·d, j·s + kx·d],
    the reduction over (n, i, j) in that order, tiled. Result shaped like the weight. out_scale (0-d, or
    one per output channel): the result times it, and flags, as tiled_conv2d's."""
    O, cin_g, kh, kw = weight_shape
    N, K = x.shape[0], cin_g * kh * kw
    og = O // groups
    Ho, Wo = g.shape[-2:]
    L = Ho * Wo
    plan = _plan(g, x, None, N * L, acc_bits, tile, overflow, None if absmax is None else (absmax[1], absmax[0]))
    tl, T = plan.tile, plan.tiles
    ph, pw = _pair(padding)
    fused = _gemm_kernel(plan, overflow, x.device, og, K, exact)
    xp = _padded(x, (ph, ph, pw, pw), torch.float32 if fused is not None else plan.part_dtype)
    if fused is not None:                                  # A = G_Y's rows (n, i, j), B = im2col transposed, in place
        sN, sC, sH, sW = xp.stride()
        (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
        out = _outputs(weight_shape, exact, flags)
        a_tab = (_offsets((groups, og * L)), _offsets((og, L)), _offsets((N, O * L), (L, 1)))
        b_tab = (_offsets((groups, cin_g * sC)), _offsets((N, sN), (Ho, sh * sH), (Wo, sw * sW)),
                 _offsets((cin_g, sC), (kh, dh * sH), (kw, dw * sW)))
        out_tab = (_offsets((groups, og * K)), _offsets((og, K)), _offsets((K, 1)))
        out_mult = None if out_scale is None else (
            _per_channel(out_scale, O), (_offsets((groups, og)), _offsets((og, 1)), _offsets((K, 0))))
        _fused_gemm(fused, plan.fused_tile, acc_bits, overflow, g.to(torch.float32).contiguous(), a_tab, xp, b_tab,
                    out, out_tab, out_mult=out_mult)
        return out if out_scale is not None else _cast(out, _out_dtype(x))
    gt = _SCRATCH.empty("grad_rows", (groups, og, T * tl), plan.part_dtype, g.device)     # (G, og, T·tl)
    gt[..., :N * L].view(groups, og, N, L).copy_(g.reshape(N, groups, og, L).permute(1, 2, 0, 3))
    gt[..., N * L:].zero_()

    def partials(t0, t1):                                  # tiles t0..t1−1: (t1−t0, G, og, K)
        r0, r1 = t0 * tl, min(t1 * tl, N * L)
        n0, n1 = r0 // L, -(-r1 // L)                      # the images these tiles read
        off, cols_n = r0 - n0 * L, (t1 - t0) * tl
        cols = _SCRATCH.empty("cols", (groups, K, max((n1 - n0) * L, off + cols_n)), xp.dtype, x.device)
        _im2col(cols, xp[n0:n1], 0, cin_g, cin_g, (kh, kw), (Ho, Wo), stride, dilation)
        cols = cols[:, :, off:off + cols_n].view(groups, K, t1 - t0, tl).permute(0, 2, 3, 1)   # (G, T', tl, K)
        gk = gt[:, :, r0:r0 + cols_n].view(groups, og, t1 - t0, tl).transpose(1, 2)            # (G, T', og, tl)
        ps = _SCRATCH.empty("partials", (groups, t1 - t0, og, K), xp.dtype, x.device)
        return torch.matmul(gk, cols, out=ps).transpose(0, 1).to(plan.acc_dtype)

    res = run_tiles(partials, T, None, acc_bits, overflow, per_tile=max(O, tl) * K, exact=exact)
    return _scaled(_cast(_apply(res, lambda t: t.reshape(weight_shape)), _out_dtype(x)), out_scale, (-1, 1, 1, 1))


# ---- the training op: what passes/narrow_acc puts in place of a quantized conv / linear / matmul ----

def _channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """`t` (a scalar or one value per channel) shaped to broadcast along `axis` of an ndim tensor."""
    if t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def grid_absmax(qrange: tuple[int, int], zero_point: torch.Tensor) -> float:
    """max |code − z| over a grid with code range `qrange` and zero point(s) `zero_point` (the largest
    over channels): the largest integer operand a matmul meets on that grid. Over channels that is
    max_code_magnitude at the smallest and the largest zero point, max(qmax − min z, max z − qmin), read with
    one reduction (per-tensor: none)."""
    z = zero_point.detach()
    lo, hi = (float(z), float(z)) if z.numel() == 1 else (float(t) for t in torch.aminmax(z))
    return float(max(max_code_magnitude(qrange, lo), max_code_magnitude(qrange, hi)))


def worst_case(kind: str, b_int, bias_int, a_absmax: float, b_absmax: float | None, tile: int | None):
    """(whole-reduction, largest-tile) worst-case |acc| per output channel of a `kind` op:
    Σ|w_int|·max|x_int| + |bias_int| (matmul: K·max|a_int|·max|b_int|, one value), with
    a_absmax = max|a_int|, b_absmax = max|b_int| (read for a matmul only). Differentiable in b_int
    and bias_int."""
    if kind == "matmul":
        K = b_int.shape[-2]
        w_abs = torch.full((1, K), b_absmax, dtype=torch.float64, device=b_int.device)
        return l1_bounds(w_abs, a_absmax, None, tile)
    w_abs = b_int.abs().reshape(b_int.shape[0], -1)
    return l1_bounds(w_abs, a_absmax, None if bias_int is None else bias_int.abs(), tile)


class _NarrowAccFunction(torch.autograd.Function):
    """y = acc·(s_a·s_b) with acc the tiled accumulator over the integer operands, the codes of a and b
    (_codes with 1/s_a, 1/s_b; a conv forms a's codes zero-padded, NarrowAccOp.padded_codes, which its
    weight gradient reads again, and passes b itself with its multipliers);
    also returns the exact accumulator (integer units; a 0-d zero unless op.keep_exact).
    `grid` = (s_a, s_b, (max|a_int|, max|b_int|)): the operands' grids as the op's graph inputs
    gave them at this forward; the backward uses the same. Backward: see NarrowAccOp."""

    @staticmethod
    def forward(ctx, a, b, bias, grid, op):
        sa, sb, absmax = grid
        a_mult, b_mult = torch.reciprocal(sa), torch.reciprocal(sb)
        if op.kind in ("conv2d", "conv1d"):        # the kernel reads the weight's codes from b: no copy of them
            a_op, b_op = op.padded_codes(a, a_mult), b.detach()
        else:
            a_op, b_op, b_mult = _codes(a, a_mult), _codes(b, b_mult, 0 if op.kind != "matmul" else None), None
        out_scale = sa * sb
        bias_int = None if bias is None else bias_codes(bias.detach(), sa, sb)[0]
        conv = op.kind in ("conv2d", "conv1d")
        res = op.forward_int(a_op, b_op, bias_int, absmax, b_mult, out_scale if conv else None,
                             flags=op.acc_grad == "zero_saturated")
        op.record("train" if op.training else "eval", res)
        op.last_operands = (b_op, b_mult, bias_int, absmax)
        ctx.save_for_backward(a_op, b_op, res.overflowed)
        ctx.b_mult, ctx.a_shape, ctx.y_shape = b_mult, a.shape, res.acc.shape
        ctx.op, ctx.sa, ctx.sb, ctx.absmax, ctx.has_bias = op, sa, sb, absmax, bias is not None
        ctx.set_materialize_grads(False)              # an unused output's gradient arrives as None, not zeros
        exact = a.new_zeros(()) if res.exact is None else res.exact.to(a.dtype)
        if conv:                                      # the tiled conv scaled it (out_scale)
            return res.acc.to(a.dtype), exact
        acc = res.acc.clone() if res.acc is res.exact else res.acc          # scaled in place: a fresh tensor
        return acc.mul_(op.out_view(out_scale, acc.dim())).to(a.dtype), exact

    @staticmethod
    def backward(ctx, gy, gexact):
        a_op, b_op, overflowed = ctx.saved_tensors
        op, sa, sb, b_mult = ctx.op, ctx.sa, ctx.sb, ctx.b_mult
        g = a_op.new_zeros(ctx.y_shape) if gy is None else gy
        if op.acc_grad == "zero_saturated":
            g = g.masked_fill(overflowed, 0.0)
        if gexact is not None:
            g = g + gexact / op.out_view(sa * sb, g.dim())
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=[d for d in range(g.dim()) if d != op.channel_axis(g.dim())])
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gq = op.grad_output_quant
        if gq is not None and gq.enabled:
            # one quantized gradient operand for both backward matmuls: u = G_Y·s_w (per output channel
            # for weights, so G_X's reduction over channels has one scale), u_int = û/s_u
            fold = op.kind != "matmul"
            u_int = gq.gradient_codes(g, sb, op.channel_axis(g.dim())) if fold else gq.gradient_codes(g)
            su = gq.scale.clone()
            a_scale, b_scale = (su, su * sa / sb) if fold else (su * sb, su * sa)
            if op.kind in ("conv2d", "conv1d"):       # the tiled convs scale their results (out_scale)
                ga, gb = op.backward_int(a_op, b_op, u_int, need_a, need_b, ctx.absmax, b_mult, ctx.a_shape,
                                         (a_scale, b_scale))
                grad_a, grad_b = (None if r is None else r.acc.to(g.dtype) for r in (ga, gb))
            else:
                ga, gb = op.backward_int(a_op, b_op, u_int, need_a, need_b, ctx.absmax)
                grad_a = ga.acc.to(g.dtype).mul_(a_scale) if need_a else None
                grad_b = gb.acc.to(g.dtype).mul_(_channel_view(b_scale, gb.acc.dim(), 0)) if need_b else None
        else:
            a_int = op.unpadded(a_op, ctx.a_shape)
            b_int = b_op if b_mult is None else _codes(b_op, b_mult, 0)
            a_hat = a_int * sa
            b_hat = b_int * (_channel_view(sb, b_int.dim(), 0) if op.kind != "matmul" else sb)
            grad_a, grad_b = op.backward_float(a_hat, b_hat, g, need_a, need_b)
        return grad_a, grad_b, grad_bias, None, None


class NarrowAccOp(nn.Module):
    """A quantized conv2d / conv1d / linear / matmul computed with the tiled narrow accumulator.

    Called as op(a, b, bias, a_scale=, a_zero_point=, b_scale=, b_zero_point=): a and b on the
    grids whose scales and zero points are the keyword inputs (in the graph, get_attr nodes of
    the operands' quantizers' `scale` / `zero_point` buffers, wired by the `narrow_acc` pass; the
    op holds no reference to another module). What is fixed at compile time is a constructor
    argument: kind, geometry, accumulator mode, the operands' code ranges (`a_qrange`, `b_qrange`)
    and whether the op keeps its exact accumulator (`keep_exact`, set by `narrow_acc` from the
    layer's `log_barrier`).

    Computes in the integer domain (the codes a·(1/s_a), b·(1/s_b) rounded, `_codes`: a conv's input
    codes zero-padded once, `padded_codes`, and its fused kernel reads the weight's codes from b;
    bias/(s_a·s_b) rounded; never saturated) and
    rescales. Returns y, or (y, exact) when `keep_exact`: exact = bias_int + Σ products without
    overflow (integer units, what the log barrier reads through the graph; the tail term's
    gradient reaches a and b through the op's backward). Backward, with a gradient quantizer:
    u = G_Y·s_w is quantized once and G_X = s_u·(u_int ⊛ W_int), G_W = s_u·s_x/s_w·(X_int ⊛ u_int)
    run through the same tiled accumulator with `grad_acc_bits`; without one, the backward
    matmuls are exact in float. The accumulator is straight-through (acc_grad="ste") or passes
    no gradient to outputs that overflowed ("zero_saturated").

    Quantization off: the op has its own switch, `enabled`, which QuantizedGraphModule's
    switches (`set_quantization`, `quantization_disabled`, `calibrate`) set together with the
    quantizers'; off, it is the plain float op (and `exact` is None). Overflow statistics are
    int64 buffers per phase (train, eval, grad); `reset_overflow_stats()`.
    """

    PHASES = ("train", "eval", "grad")

    def __init__(self, kind: str, layer: str, *, acc_bits: int | None, tile: int | None, overflow: str,
                 grad_acc_bits: int | None, acc_grad: str, a_qrange: tuple[int, int], b_qrange: tuple[int, int],
                 keep_exact: bool = False, grad_output_quant=None, stride=1, padding=0, dilation=1, groups: int = 1):
        super().__init__()
        if kind not in ("conv1d", "conv2d", "linear", "matmul"):
            raise ValueError(f"NarrowAccOp kind {kind!r}: choose conv1d, conv2d, linear or matmul")
        check_mode(acc_bits, tile, overflow)
        check_mode(grad_acc_bits, tile, overflow)
        self.kind, self.layer = kind, layer
        self.acc_bits, self.tile, self.overflow = acc_bits, tile, overflow
        self.grad_acc_bits, self.acc_grad = grad_acc_bits, acc_grad
        self.a_qrange, self.b_qrange = tuple(a_qrange), tuple(b_qrange)   # the operands' code ranges
        self.keep_exact = bool(keep_exact)     # return (y, exact accumulator): the log barrier reads it
        self.enabled = True                    # quantization switch (QuantizedGraphModule.switches)
        self.grad_output_quant = grad_output_quant
        if kind == "conv1d":
            stride, padding, dilation = (1, _pair1(stride)), (0, _pair1(padding)), (1, _pair1(dilation))
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.last_operands = None              # (b, b_mult, bias_int, absmax) of the last forward, for the summary:
                                               # the weight operand (its codes _codes(b, b_mult), or b itself: None)
        for phase in self.PHASES:
            for what in ("events", "overflowed", "outputs"):
                self.register_buffer(f"{what}_{phase}", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"{self.kind}, acc_bits={self.acc_bits}, tile={self.tile}, overflow={self.overflow}, "
                f"grad_acc_bits={self.grad_acc_bits}, acc_grad={self.acc_grad}"
                + (", keep_exact=True" if self.keep_exact else ""))

    # ---- geometry --------------------------------------------------------------------
    def channel_axis(self, ndim: int) -> int:
        return 1 if self.kind in ("conv1d", "conv2d") else ndim - 1

    def out_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return _channel_view(t, ndim, self.channel_axis(ndim))

    # ---- integer forward / backward -------------------------------------------------
    def _conv_args(self):
        return self.stride, self.padding, self.dilation, self.groups

    def padded_codes(self, a: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        """A conv's input operand: a's codes (_codes(a, mult)) zero-padded by the op's padding, 4-d (a
        conv1d's input with a unit height); a fresh tensor, read by the forward and the weight gradient."""
        a4 = a.detach().unsqueeze(2) if self.kind == "conv1d" else a.detach()
        (ph, pw), (N, C, H, W) = _pair(self.padding), a4.shape
        xp = torch.empty((N, C, H + 2 * ph, W + 2 * pw), dtype=torch.float32, device=a.device)
        if not _pad_in_one_pass(a4, xp, (ph, ph, pw, pw), mult):
            xp.zero_()
            torch.mul(a4.to(torch.float32), mult.to(torch.float32), out=xp[:, :, ph:ph + H, pw:pw + W]).round_()
        return xp

    def unpadded(self, a_op: torch.Tensor, a_shape) -> torch.Tensor:
        """The input's codes shaped like the input (`a_shape`): padded_codes' interior (other kinds: a_op)."""
        if self.kind not in ("conv2d", "conv1d"):
            return a_op
        ph, pw = _pair(self.padding)
        return a_op[:, :, ph:a_op.shape[-2] - ph, pw:a_op.shape[-1] - pw].reshape(a_shape)

    def forward_int(self, a, b, bias, absmax, b_mult=None, out_scale=None, flags: bool = True) -> AccResult:
        """The tiled accumulator on integer operands; absmax = (max|a_int|, max|b_int|) over their grids.
        Convs: a is `padded_codes` (the padding done), b the weight's real values with b_mult = 1/s_b (its
        codes read by the kernel) or its codes (b_mult None); out_scale (per output channel): the
        accumulator comes back times it (tiled_conv2d's out_scale). flags=False: a conv may leave the
        overflow flags None (only the backward's zero_saturated reads them)."""
        mode = dict(acc_bits=self.acc_bits, tile=self.tile, overflow=self.overflow,
                    absmax=tuple(absmax), exact=self.keep_exact)
        if self.kind in ("conv2d", "conv1d"):
            stride, _, dilation, groups = self._conv_args()
            sq = self.kind == "conv1d"
            res = tiled_conv2d(a, b.unsqueeze(2) if sq else b, bias, stride, 0, dilation, groups, **mode,
                               w_mult=b_mult, out_scale=out_scale, flags=flags)
            return _squeeze2(res) if sq else res
        if self.kind == "linear":
            return tiled_linear(a, b, bias, **mode)
        return tiled_matmul(a, b, None, **mode)

    def backward_int(self, a, b, u, need_a: bool, need_b: bool, absmax, b_mult=None, a_shape=None,
                     out_scales=(None, None)):
        """(G_a, G_b) AccResults of the backward matmuls on integer operands, with grad_acc_bits;
        absmax = (max|a_int|, max|b_int|), a and b_mult as in the forward (forward_int); a_shape: the
        input's shape (a conv's G_a); out_scales (convs): G_a's and G_b's accumulators come back times
        them (0-d; one per output channel)."""
        mode = dict(acc_bits=self.grad_acc_bits, tile=self.tile, overflow=self.overflow, exact=False)
        q = self.grad_output_quant
        umax = grid_absmax(q.qrange, q.zero_point)
        amax, bmax = absmax
        ga = gb = None
        if self.kind in ("conv2d", "conv1d"):
            sq = self.kind == "conv1d"
            b4, u4 = (t.unsqueeze(2) for t in (b, u)) if sq else (b, u)
            stride, padding, dilation, groups = self._conv_args()
            if need_a:
                ga = tiled_conv2d_input_grad(u4, b4, (1, a_shape[-1]) if sq else a_shape[-2:], stride, padding,
                                             dilation, groups, **mode, absmax=(umax, bmax), w_mult=b_mult,
                                             out_scale=out_scales[0], flags=False)
            if need_b:              # a: the input's padded codes
                gb = tiled_conv2d_weight_grad(a, u4, b4.shape, stride, 0, dilation, groups, **mode, absmax=(amax, umax),
                                              out_scale=out_scales[1], flags=False)
            ga, gb = (_squeeze2(r) if sq and r is not None else r for r in (ga, gb))
        elif self.kind == "linear":
            u2, a2 = u.reshape(-1, u.shape[-1]), a.reshape(-1, a.shape[-1])
            if need_a:
                ga = _reshape(tiled_matmul(u2, b, None, **mode, absmax=(umax, bmax)), a.shape)
            if need_b:
                gb = tiled_matmul(u2.t(), a2, None, **mode, absmax=(umax, amax))
        else:
            if need_a:
                ga = tiled_matmul(u, b.transpose(-1, -2), None, **mode, absmax=(umax, bmax))
            if need_b:
                a_t = a.reshape(-1, a.shape[-1]).t() if b.dim() == 2 else a.transpose(-1, -2)
                u_ = u.reshape(-1, u.shape[-1]) if b.dim() == 2 else u
                gb = tiled_matmul(a_t, u_, None, **mode, absmax=(amax, umax))
        for r in (ga, gb):
            if r is not None:
                self.record("grad", r)
        return ga, gb

    def backward_float(self, a, b, g, need_a: bool, need_b: bool):
        """The exact float backward of the op (used when gradients are not quantized)."""
        ga = gb = None
        if self.kind in ("conv2d", "conv1d"):
            sq = self.kind == "conv1d"
            a4, b4, g4 = (t.unsqueeze(2) for t in (a, b, g)) if sq else (a, b, g)
            if need_a:
                ga = torch.nn.grad.conv2d_input(a4.shape, b4, g4, *self._conv_args())
            if need_b:
                gb = torch.nn.grad.conv2d_weight(a4, b4.shape, g4, *self._conv_args())
            ga, gb = (t.squeeze(2) if sq and t is not None else t for t in (ga, gb))
        elif self.kind == "linear":
            if need_a:
                ga = g @ b
            if need_b:
                gb = g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
        else:
            if need_a:
                ga = g @ b.transpose(-1, -2)
            if need_b:
                gb = (a.reshape(-1, a.shape[-1]).t() @ g.reshape(-1, g.shape[-1]) if b.dim() == 2
                      else a.transpose(-1, -2) @ g)
        return ga, gb

    # ---- statistics and bounds ------------------------------------------------------
    @torch.no_grad()
    def record(self, phase: str, res: AccResult) -> None:
        getattr(self, f"events_{phase}").add_(res.events)
        n = res.overflowed_count
        getattr(self, f"overflowed_{phase}").add_(torch.count_nonzero(res.overflowed) if n is None else n)
        getattr(self, f"outputs_{phase}").add_(res.acc.numel())

    def reset_overflow_stats(self) -> None:
        for phase in self.PHASES:
            for what in ("events", "overflowed", "outputs"):
                getattr(self, f"{what}_{phase}").zero_()

    def overflow_stats(self) -> dict:
        """{phase: {"events", "overflowed", "outputs", "rate"}} with rate = overflowed / outputs."""
        out = {}
        for phase in self.PHASES:
            ev, ov, n = (int(getattr(self, f"{w}_{phase}")) for w in ("events", "overflowed", "outputs"))
            out[phase] = {"events": ev, "overflowed": ov, "outputs": n, "rate": ov / n if n else 0.0}
        return out

    def worst_case(self, b_int, bias_int, absmax):
        """(whole-reduction, largest-tile) worst-case |acc| per output channel (module-level
        `worst_case` with this op's kind and tile); absmax = (max|a_int|, max|b_int|)."""
        return worst_case(self.kind, b_int, bias_int, absmax[0], absmax[1], self.tile)

    def describe(self) -> str:
        st = self.overflow_stats()
        parts = [f"acc{self.acc_bits or '∞'}/tile {self.tile or 'all'}/{self.overflow}"]
        for phase in self.PHASES:
            s = st[phase]
            if s["outputs"]:
                parts.append(f"{phase}: {s['events']} events, {100 * s['rate']:.3g}% outputs overflowed")
        if self.acc_bits is not None and self.last_operands is not None:
            b, b_mult, bias_int, absmax = self.last_operands
            with torch.no_grad():
                b_int = b if b_mult is None else _codes(b, b_mult, 0)
                worst = float(self.worst_case(b_int, bias_int, absmax)[0].max())
            hi = acc_range(self.acc_bits)[1]
            parts.append(f"overflow-free margin {hi - worst:+.0f} ({self.acc_bits - min_acc_bits(worst):+d} bits; "
                         f"worst case {worst:.0f} vs {hi})")
        return " | ".join(parts)

    # ---- forward --------------------------------------------------------------------
    @torch.compiler.disable   # native kernels over raw pointers: under torch.compile the op runs eagerly
    def forward(self, a, b, bias=None, *, a_scale: torch.Tensor, a_zero_point: torch.Tensor,
                b_scale: torch.Tensor, b_zero_point: torch.Tensor):
        if not self.enabled:
            y = self.float_op(a, b, bias)
            return (y, None) if self.keep_exact else y
        absmax = (grid_absmax(self.a_qrange, a_zero_point), grid_absmax(self.b_qrange, b_zero_point))
        grid = (a_scale.detach().clone(), b_scale.detach().clone(), absmax)
        y, exact = _NarrowAccFunction.apply(a, b, bias, grid, self)
        return (y, exact) if self.keep_exact else y

    def float_op(self, a, b, bias=None):
        if self.kind == "conv2d":
            return F.conv2d(a, b, bias, *self._conv_args())
        if self.kind == "conv1d":
            return F.conv2d(a.unsqueeze(2), b.unsqueeze(2), bias, *self._conv_args()).squeeze(2)
        if self.kind == "linear":
            return F.linear(a, b, bias)
        return torch.matmul(a, b)


def _pair1(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def _squeeze2(r: AccResult) -> AccResult:
    return _apply(r, lambda t: t.squeeze(2))


def _reshape(r: AccResult, shape) -> AccResult:
    return _apply(r, lambda t: t.reshape(shape))
