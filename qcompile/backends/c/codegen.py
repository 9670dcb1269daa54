"""C code generation: integer IR → pure-integer C99 sources (jinja2 templates in `templates/`).

`emit(graph, out_dir, name)` writes
  <name>.h     the entry point `int <name>_run(const in_t *input, out_t *output, uint8_t *arena)`
               and sizes as macros (<NAME>_ARENA_BYTES, <NAME>_INPUT0_SIZE, ...)
  <name>.c     one static function per op, weights / bias / requantization parameters as
               static const arrays, and `<name>_run` calling the ops in order
  main.c       a harness: raw input files in, raw output files out (see its header)
  Makefile     gcc -std=c99 -Wall -Wextra -Werror -pedantic
  <name>.json  the tensors at the boundary (shape, dtype, scale, zero point) and the sizes

Invariants of the generated code: it computes exactly what `backends.reference` computes
(the IR semantics in `qcompile.ir`), every output byte; it contains no float, no math.h
and no allocation; every intermediate lives in the caller's arena at an offset chosen by
`memory_plan` (reshape outputs alias their input). Accumulator lane widths are chosen from
static bounds on the integer weights and input ranges, so no lane can overflow except
where the IR asks for wrap-around, which is done in unsigned arithmetic.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from qcompile import ir
from qcompile.core.accumulator import OVERFLOW_MODES, acc_range, max_l1_bounds, pairs_saturation_free, tile_plan
from qcompile.core.grids import code_range, storage_bits
from qcompile.core.requant import MAX_RIGHT_SHIFT, fits_int64, requantized_bound
from qcompile.core.rowwise import layer_norm_bounds, layer_norm_span
from qcompile.errors import QCompileError, UnsupportedOpError

from qcompile.backends.c import memory_plan

TEMPLATES = Path(__file__).parent / "templates"
PIXEL_BLOCK = 8          # output pixels (rows for linear) sharing each weight load; remainders in 4, 2, 1


def _blocks(pixels: int) -> list[int]:
    """The pixel-block sizes the kernels' loop meets over `pixels` outputs: blocks of 8 while at least
    8 remain, then 4, 2, 1 (the C loop picks q the same way)."""
    seen, p = set(), 0
    while p < pixels:
        rem = pixels - p
        q = PIXEL_BLOCK if rem >= PIXEL_BLOCK else (4 if rem >= 4 else (2 if rem >= 2 else 1))
        seen.add(q)
        p += q
    return sorted(seen, reverse=True)


SUPPORTED = ("conv2d", "linear", "matmul", "add", "mul", "concat", "requantize", "max_pool2d", "avg_pool2d",
             "adaptive_avg_pool2d", "lut", "softmax", "layer_norm", "embedding", "constant", "reshape", "transpose",
             "slice")
C_KEYWORDS = {"auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else",
              "enum", "extern", "float", "for", "goto", "if", "inline", "int", "long", "register",
              "restrict", "return", "short", "signed", "sizeof", "static", "struct", "switch",
              "typedef", "union", "unsigned", "void", "volatile", "while", "main"}

_env = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined,
                   keep_trailing_newline=True)


@dataclass
class CModule:
    """What `emit` wrote: file paths, boundary tensors and the memory figures (bytes)."""
    out_dir: Path
    name: str
    inputs: list[ir.Tensor]
    outputs: list[ir.Tensor]
    arena_bytes: int
    naive_bytes: int
    activation_bytes: int
    weight_bytes: int
    macs: int
    files: list[Path] = field(default_factory=list)

    def build(self, **kwargs) -> Path:
        from qcompile.backends.c.build import build
        return build(self.out_dir, **kwargs)

    def run(self, *inputs: np.ndarray, exe: Path | None = None) -> list[np.ndarray]:
        from qcompile.backends.c.build import run
        return run(self.out_dir, *inputs, exe=exe)

    def summary(self) -> str:
        return summary(vars(self))


def summary(figures: dict) -> str:
    """One line of a runtime's memory figures (a CModule's fields, or the <name>.json `emit` writes)."""
    return (f"{figures['name']}: arena {figures['arena_bytes']} B (naive sum of buffers {figures['naive_bytes']} B, "
            f"activations alone {figures['activation_bytes']} B), weights {figures['weight_bytes']} B, "
            f"{figures['macs'] / 1e6:.2f} M MAC/sample")


# ---- small helpers ------------------------------------------------------------------------
ARRAY_SUFFIXES = ("", "_w", "_wq", "_b", "_m", "_s", "_table", "_value")   # names derived from an op's identifier
HELPERS = {"qc_floor_shift", "qc_from_u64", "qc_requantize", "qc_requantize_wide", "qc_i128", "qc_u128", "qc_clamp",
           "qc_saturate", "qc_wrap", "qc_div_round", "qc_isqrt"}


def c_identifier(text: str, taken: set[str], prefix: str) -> str:
    """`prefix_<text>` with every non-identifier character replaced by '_', such that neither it
    nor its derived array names (`_w`, `_b`, ...) collide with anything in `taken` (updated)."""
    body = re.sub(r"[^0-9A-Za-z_]", "_", text).strip("_") or "op"
    ident = f"{prefix}_{body}"
    base, n = ident, 2
    while any(ident + sfx in taken or ident + sfx in C_KEYWORDS or ident + sfx in HELPERS
              for sfx in ARRAY_SUFFIXES):
        ident, n = f"{base}_{n}", n + 1
    taken.update(ident + sfx for sfx in ARRAY_SUFFIXES)
    return ident


def ctype(t: ir.Tensor) -> str:
    """Storage type of a tensor: (u)int8 up to 8 bits, (u)int16 up to 16, (u)int32 up to 32."""
    for width in (8, 16, 32):
        if t.bits <= width:
            return f"{'' if t.signed else 'u'}int{width}_t"
    raise UnsupportedOpError(f"tensor {t.name!r}: {t.bits}-bit storage is not supported by the C backend (max 32)")


NUMPY_DTYPES = {"int8_t": np.int8, "uint8_t": np.uint8, "int16_t": np.int16, "uint16_t": np.uint16,
                "int32_t": np.int32, "uint32_t": np.uint32}


def _int_type(lo: int, hi: int) -> str:
    return f"int{storage_bits(lo, hi)}_t"


INT64_MIN = code_range(64, signed=True)[0]
INT62 = 1 << 62          # the bound every int64 intermediate stays below (as lowering checks)


def _c_array(values: np.ndarray) -> str:
    """Comma-separated C literals, 24 per line (the most negative int64 spelled without overflow)."""
    flat = np.asarray(values).astype(np.int64).ravel().tolist()
    text = [str(v) if v != INT64_MIN else "(-9223372036854775807 - 1)" for v in flat]
    return ",\n    ".join(", ".join(text[i:i + 24]) for i in range(0, len(text), 24))


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _per_channel(v, n: int, what: str, op: ir.Op) -> np.ndarray:
    a = np.asarray(v, dtype=np.int64).ravel()
    if a.size == 1:
        a = np.repeat(a, n)
    if a.size != n:
        raise QCompileError(f"op {op.name!r} ({op.kind}): {what} has {a.size} entries, expected 1 or {n}")
    return a


def _scalar(v, what: str, op: ir.Op) -> int:
    a = np.asarray(v, dtype=np.int64).ravel()
    if a.size != 1:
        raise UnsupportedOpError(f"op {op.name!r} ({op.kind}): the C backend needs a single {what}, got {a.size} "
                                 f"values")
    return int(a[0])


def _check_shift(s: np.ndarray | int, op: ir.Op) -> None:
    s = np.asarray(s)
    if s.size and (31 - s.max() < 0 or 31 - s.min() > MAX_RIGHT_SHIFT):
        raise QCompileError(f"op {op.name!r} ({op.kind}): requantization right shift 31 − s outside "
                            f"0..{MAX_RIGHT_SHIFT}: shifts {int(s.min())}..{int(s.max())}")


def _rq(bound: int, m, s) -> str:
    """The C requantization helper for values |v| <= bound: 64-bit products where they are exact
    (`core.requant.fits_int64`), else the 128-bit qc_requantize_wide."""
    return "qc_requantize" if fits_int64(bound, m, s) else "qc_requantize_wide"


def _broadcast_strides(in_shape, out_shape) -> list[int]:
    """Element strides of `in_shape` read at each index of `out_shape` (numpy broadcasting)."""
    in_shape = (1,) * (len(out_shape) - len(in_shape)) + tuple(in_shape)
    strides, acc = [], 1
    for d in reversed(in_shape):
        strides.append(acc)
        acc *= d
    strides = strides[::-1]
    return [0 if d == 1 and o != 1 else s for d, o, s in zip(in_shape, out_shape, strides)]



def _act_range(op: ir.Op, y: ir.Tensor) -> tuple[int, int]:
    if isinstance(op.attrs, ir.Clamp):
        return int(op.attrs.act_min), int(op.attrs.act_max)
    return y.qmin, y.qmax


# ---- per-op layer descriptions ------------------------------------------------------------
class _Layer(dict):
    """Template context of one op; attribute access for the templates."""
    __getattr__ = dict.__getitem__


def _fits(bound: int, bits: int) -> bool:
    """Every integer of magnitude <= `bound` fits a signed `bits`-bit lane."""
    return bound <= acc_range(bits)[1]


def _accumulator(op: ir.Op, w: np.ndarray, bias: np.ndarray, x: ir.Tensor) -> dict[str, Any]:
    """Lane and accumulator types, and the tile plan, of the reduction of `w` (O, K) against x − zx
    (the template macro `tile_loop` in common.c.j2 runs it). Static bounds from core:
    `max_l1_bounds` (|bias| + Σ|w|·max|x − zx|, and one tile's Σ|w|·max|x − zx|).

    exact: lanes hold the whole bound, one tile; wrap: one tile (modular), the exact sum in int32
    lanes where the bound allows, else unsigned lanes of the accumulator width; saturate: tiles of
    `tile`, lanes hold one tile's bound; pairwise: tiles of 2, each saturated before it is added. A
    narrow accumulator whose whole bound fits its range never overflows for any input: compiled as exact.
    """
    a = op.attrs
    K = w.shape[1]
    maxx = x.magnitude
    if not _fits(maxx, 32):
        raise UnsupportedOpError(f"op {op.name!r}: input range too wide for the C backend")
    acc_bits = a.acc_bits
    overflow = a.overflow
    tile = a.tile
    if acc_bits is not None and overflow not in OVERFLOW_MODES:
        raise UnsupportedOpError(f"op {op.name!r} ({op.kind}): overflow={overflow!r}; expected one of {OVERFLOW_MODES}")
    if acc_bits is not None and not 2 <= int(acc_bits) <= 64:
        raise QCompileError(f"op {op.name!r} ({op.kind}): acc_bits={acc_bits} outside 2..64")
    if tile is not None and int(tile) < 1:
        raise QCompileError(f"op {op.name!r} ({op.kind}): tile={tile} must be positive")
    if K < 1:
        raise QCompileError(f"op {op.name!r} ({op.kind}): empty reduction (K = {K})")
    try:
        total_bound, tile_bound = max_l1_bounds(w, maxx, bias, None if tile is None else int(tile))
    except OverflowError as e:
        raise UnsupportedOpError(f"op {op.name!r} ({op.kind}): {e}; the C backend sums in int64") from None
    if acc_bits is None or _fits(total_bound, int(acc_bits)):
        mode, bits = "exact", 64
    else:
        mode, bits = overflow, int(acc_bits)
    tile, ntiles = tile_plan(K, int(tile) if mode in ("saturate", "pairwise") and tile is not None else None)
    dacc = "int32_t" if bits <= 32 else "int64_t"
    if mode == "saturate":
        lane = "int16_t" if _fits(tile_bound, 16) else ("int32_t" if _fits(tile_bound, 32) else "int64_t")
        lane_op = lane
        desc = f"{bits}-bit, saturating after each tile of {tile} products"
    elif mode == "pairwise":
        lane = lane_op = "int32_t" if _fits(tile_bound, 32) else "int64_t"
        desc = (f"{bits}-bit pairwise: each pair of products summed and saturated, then added with saturation"
                + (" (no pair can saturate here: saturating tiles of 2)" if pairs_saturation_free(w, maxx, bits) else ""))
    elif mode == "wrap" and _fits(total_bound, 32):
        # modular: the exact sum in int32 lanes (no lane can overflow), wrapped once at the end.
        # Measured faster than 16-bit lanes even for acc_bits <= 16 (pmaddwd / VNNI dot products
        # do 16 multiply-adds per instruction into int32; 16-bit lanes need a multiply and an add).
        lane = lane_op = "int32_t"
        desc = f"{bits}-bit, wrap-around, as an exact int32 sum wrapped once (wrap is modular)"
    elif mode == "wrap":
        lane = "uint16_t" if bits <= 16 else ("uint32_t" if bits <= 32 else "uint64_t")
        lane_op = "unsigned int" if lane == "uint16_t" else lane
        desc = f"{bits}-bit, wrap-around in {lane} lanes (modular: tiles do not matter)"
    else:
        lane = lane_op = dacc = "int32_t" if _fits(total_bound, 32) else "int64_t"
        desc = "exact" if acc_bits is None else (f"{acc_bits}-bit {overflow}, statically never overflows "
                                                 f"(|bias| + Σ|w|·max|x − zx| < 2^{int(acc_bits) - 1}): exact")
    col_t = "int16_t" if _fits(maxx, 16) else "int32_t"
    acc_bound = total_bound if mode == "exact" else acc_range(bits)[1] + 1
    return dict(acc_bound=acc_bound, mode=mode, acc_bits=bits, tile=tile, tiles=[(t * tile, min((t + 1) * tile, K)) for t in range(ntiles)],
                lane_t=lane, lane_op_t=lane_op, dacc_t=dacc, col_t=col_t, acc_desc=desc)


GEMM_PIXELS = 16         # output pixels per block of the blocked GEMM (QC_PX in gemm.c.j2)
GEMM_BLOCKS = 2          # pixel blocks per exact-kernel call (QC_BLOCKS)
GEMM_CHUNK_BYTES = 1 << 18   # column blocks laid out together: each weight panel is reused over them
GEMM_PANEL_BYTES = 1 << 15   # weights of one panel of output channels: stays in L1 over a chunk
AMX_GROUPS = 16          # groups of 4 reduction bytes in one AMX tile row (64 bytes)
AMX_MIN_GROUPS = 4       # fewer groups per tile: the VNNI kernel (an AMX step would be mostly padding)
AMX_ROWS = 32            # output channels per AMX kernel step (two tiles of 16)


def _gemm_plan(L: dict, w: np.ndarray, bias: np.ndarray, x: ir.Tensor, x_range: tuple[int, int]) -> dict[str, Any] | None:
    """The blocked-GEMM form of a conv2d (conv2d_gemm.c.j2) with weights `w` (O, I/g, kh, kw), or None
    where it does not apply and the tile_loop kernels run. Applies to 8-bit inputs and int8 weights, for
    exact (and wrap where its exact sum fits int32 lanes: `wrap_bits`, the sum with its bias wrapped
    once before the requantization): every sum 255·Σ|w| and the real accumulator
    |bias| + Σ|w|·max|x − zx| fit int32 (the kernel sums u = x − x_lo, 0..255, and the bias absorbs the
    offset: b' = bias − (zx − x_lo)·Σw; any reduction order is exact, so weight rows run
    (c / 4r, ky, kx, c % 4r), r the most quads of channels (≤ 16) that divide the input's, and the padded
    input is read in place from one plane per 4 channels and stride phase; `amx` where r ≥ 4: AMX tiles
    take r quads a step, 32 rows of weights at a time; the AVX2 kernel widens a column block's rows to
    int16 pairs (w0, w2), (w1, w3) of each quad after the planes in its scratch; `portable` is the
    tile_loop form of the same rows, for targets without AVX2);
    pairwise (16 bits): the operands are x − zx themselves, uint8 where the input's codes `x_range`
    (its producer's clamp) keep them in 0..255 (vpmaddubsw), int8 where they keep them in −128..127
    (or, both operands and weights negated, in −127..128; weights in −127..127), else int16; the bias
    must be an int16, the accumulator's first value; im2col blocks in the IR's reduction order."""
    wrap = L["mode"] == "wrap" and L["lane_t"] == "int32_t"     # the exact int32 sum, wrapped once
    kernel = "exact" if wrap else L["mode"]
    if kernel not in ("exact", "pairwise") or x.bits > 8 or w.size == 0 or w.min() < -128 or w.max() > 127:
        return None
    if kernel == "pairwise" and (L["acc_bits"] != 16 or not _fits(np.abs(bias).max(), 16)):
        return None
    O, cig, kh, kw = w.shape
    w2 = w.reshape(O, -1)
    plan = dict(kernel=kernel, col_t="uint8_t", xlo=int(x.qmin), col_bytes=1, wrap_bits=L["acc_bits"] if wrap else None)
    sym = L["sym"]
    if kernel == "exact":
        pad_u = int(x.zero_point) - plan["xlo"]
        b = bias - pad_u * w2.sum(1)
        wsum = int(np.abs(w2).sum(1).max())
        if not (_fits(255 * wsum, 32) and _fits(L["acc_bound"], 32) and _fits(int(np.abs(b).max()) + 255 * wsum, 32)):
            return None
        n4, kk = -(-cig // 4), kh * kw
        r = max(d for d in range(1, AMX_GROUPS + 1) if n4 % d == 0)     # groups of 4 channels per AMX tile
        amx = r >= AMX_MIN_GROUPS
        panel = AMX_ROWS if amx else 4                      # the kernels read whole panels of rows: zero rows past
        rows = O - L["cog"] + -(-L["cog"] // panel) * panel   # the last group's (earlier groups read the next's)
        wp = np.zeros((rows, n4 * 4, kh, kw), np.int64)     # rows in (c / 4r, ky, kx, c / 4 % r, c % 4) order,
        wp[:O, :cig] = w                                    # channels past cig 0
        wp = wp.reshape(rows, n4 // r, r, 4, kh, kw).transpose(0, 1, 4, 5, 2, 3).reshape(rows, -1)
        (sh, sw), (dh, dw) = (L["sh"], L["sw"]), (L["dh"], L["dw"])
        hq, wq = -(-L["hp"] // sh), -(-L["wp"] // sw)       # one stride phase of the padded input
        reach = ((kh - 1) * dh // sh) * wq + (kw - 1) * dw // sw
        step = GEMM_BLOCKS * GEMM_PIXELS                    # pixels per kernel call (qc_gemm_exact)
        plane = -(-max(hq * wq, -(-L["oh"] * wq // step) * step + reach) * 4 // 64) * 64
        taps = [(((ky * dh) % sh) * sw + (kx * dw) % sw) * plane + 4 * ((ky * dh // sh) * wq + kx * dw // sw)
                for ky in range(kh) for kx in range(kw)]
        plan.update(b_t="int32_t", n4=n4, r=r, amx=amx, panel=panel, hq=hq, wq=wq, plane=plane, taps=", ".join(map(str, taps)))
        plan["portable"] = _Layer(L, K=n4 * kk * 4, tile=n4 * kk * 4, tiles=[(0, n4 * kk * 4)], c4=True, n4=n4, r=r,
                                  xoff=plan["xlo"], padv=pad_u, col_t="int16_t", lane_t="int32_t", lane_op_t="int32_t",
                                  dacc_t="int32_t", w_t="int8_t")
    else:
        pad_u, b = 0, bias
        lo, hi = x_range[0] - x.zero_point, x_range[1] - x.zero_point       # x - zx
        u8 = 0 <= lo and hi <= 255
        sign = -1 if hi > 127 else 1             # int8 operands: s (x - zx) and s w, s = -1 where x - zx reaches 128
        s8 = not u8 and -128 <= sign * hi and sign * lo <= 127 and w.min() >= -127
        kind = "pairwise" if u8 else ("pairwise_s8" if s8 else "pairwise_i16")
        plan.update(kernel=kind, col_bytes=2 if kind == "pairwise_i16" else 1, xlo=int(x.zero_point),
                    col_t={"pairwise": "uint8_t", "pairwise_s8": "int8_t", "pairwise_i16": "int16_t"}[kind],
                    xsign="-" if s8 and sign < 0 else "")
        kp = -(-w2.shape[1] // 2) * 2
        if u8 and (L["sh"], L["sw"]) == (1, 1):      # columns copied from padded planes (conv2d_gemm.c.j2)
            plane = L["hp"] * L["wp"] + GEMM_PIXELS + (kw - 1) * L["dw"]
            koff = [c * plane + ky * L["dh"] * L["wp"] + kx * L["dw"] for c in range(cig) for ky in range(kh)
                    for kx in range(kw)]
            plan.update(implicit=True, plane=plane, koff=", ".join(map(str, koff + [cig * plane] * (kp - len(koff)))))
        wp = np.zeros((O, kp), np.int64)
        wp[:, :w2.shape[1]] = -w2 if plan["xsign"] else w2
        plan.update(b_t="int16_t", rq_expr=f"{L['rq']}(ab[c * QC_PX + i], {sym}_m[co_abs], {sym}_s[co_abs])")
    kp = wp.shape[1]
    if plan["kernel"] == "pairwise_i16":       # one int32 word per pair: w_2j + 2^16 w_2j+1
        pairs = wp.reshape(wp.shape[0], -1, 2)
        w32 = ((pairs[..., 0] & 0xFFFF) | ((pairs[..., 1] & 0xFFFF) << 16)).astype(np.uint32).view(np.int32)
        words, n = _c_array(w32), w32.size
    else:
        words, n = _packed_bytes(wp)
    weight_bytes = wp.size * (2 if plan["kernel"] == "pairwise_i16" else 1) + b.size * (4 if kernel == "exact" else 2)
    plan.update(pad_u=pad_u, kp=kp, b_data=_c_array(b), w_data=words, w_words=n, weight_bytes=weight_bytes,
                nb=max(2, min(8, GEMM_CHUNK_BYTES // (GEMM_PIXELS * kp * plan["col_bytes"])) // 2 * 2),  # even: pairs of blocks
                cb=min(L["cog"], max(12, min(96, GEMM_PANEL_BYTES // kp // 12 * 12))))
    if kernel == "exact":                      # AMX: panels of whole 32-row steps; acc holds a panel's last step
        if plan["amx"]:
            plan["cb"] = min(L["cog"], max(AMX_ROWS, min(96, GEMM_PANEL_BYTES // kp // AMX_ROWS * AMX_ROWS)))
        plan["acc_rows"] = -(-plan["cb"] // plan["panel"]) * plan["panel"]
    return plan


def _requant_params(op: ir.Op, n: int) -> tuple[np.ndarray, np.ndarray]:
    m = _per_channel(op.attrs.multiplier, n, "multiplier", op)
    s = _per_channel(op.attrs.shift, n, "shift", op)
    _check_shift(s, op)
    return m, s


def _packed_bytes(values: np.ndarray) -> tuple[str, int]:
    """int8 codes packed little-endian into uint64 hex literals (gcc parses these ~5x faster than
    one decimal literal per byte; the kernels read them back through an int8_t pointer)."""
    b = np.asarray(values, dtype=np.int8).ravel()
    words = np.zeros(-(-b.size // 8) * 8, np.int8)
    words[:b.size] = b
    words = words.view("<u8").tolist()
    text = [f"0x{w:016x}u" for w in words]
    return ",\n    ".join(", ".join(text[i:i + 6]) for i in range(0, len(text), 6)), len(words)


def _weight_arrays(op: ir.Op, L: dict, w: np.ndarray, bias: np.ndarray, m, s) -> int:
    """Fill the template's weight / bias / requantization arrays; returns their bytes."""
    L["w_t"] = _int_type(int(w.min(initial=0)), int(w.max(initial=0)))
    if L["w_t"] == "int8_t":
        L["w_data"], L["w_words"] = _packed_bytes(w)
    else:
        L["w_data"], L["w_words"] = _c_array(w), 0
    L["b_data"] = _c_array(bias)
    L["m_data"], L["s_data"] = _c_array(m), _c_array(s)
    return w.size * np.dtype(L["w_t"].replace("_t", "")).itemsize + 8 * bias.size + 4 * m.size + 4 * s.size


class _Emitter:
    def __init__(self, graph: ir.Graph, name: str):
        self.g = graph
        self.producer = {op.output: op for op in graph.ops}
        self.name = name
        self.taken: set[str] = set()
        self.functions: list[str] = []
        self.weight_bytes = 0
        self.macs = 0
        self.gemm: set[str] = set()           # parts of gemm.c.j2 some layer uses (kernels, requantize16: the vector requantization)
        self.intrinsics = False               # some layer has an intrinsic path outside gemm.c.j2 (depthwise, lut)

    RANGE_KEEPING = ("max_pool2d", "reshape", "transpose", "slice")   # outputs hold some of the input's codes

    def value_range(self, name: str) -> tuple[int, int]:
        """The codes tensor `name` can hold: its producer's clamp (a fused ReLU raises act_min to the
        zero point) within what range-keeping ops pass on; the storage's qmin..qmax otherwise."""
        t = self.t(name)
        op = self.producer.get(name)
        if op is None:
            return t.qmin, t.qmax
        lo, hi = self.value_range(op.inputs[0]) if op.kind in self.RANGE_KEEPING else (t.qmin, t.qmax)
        if isinstance(op.attrs, ir.Clamp):
            lo, hi = max(lo, int(op.attrs.act_min)), min(hi, int(op.attrs.act_max))
        return lo, hi

    def t(self, name: str) -> ir.Tensor:
        try:
            return self.g.tensors[name]
        except KeyError:
            raise QCompileError(f"integer graph: tensor {name!r} is used but not declared") from None

    # Each `op_*` returns (template name, layer context, scratch buffer sizes in bytes).
    def op_conv2d(self, op, sym):
        a = op.attrs
        x, y = self.t(op.inputs[0]), self.t(op.output)
        w = np.asarray(a.weight, dtype=np.int64)
        if w.ndim != 4 or len(x.shape) != 3 or len(y.shape) != 3:
            raise QCompileError(f"op {op.name!r} (conv2d): expected (O, I/g, kh, kw) weights and (C, H, W) tensors, "
                                f"got weight {w.shape}, input {x.shape}, output {y.shape}")
        O, cig, kh, kw = w.shape
        groups = int(a.groups)
        (sh, sw), (ph, pw), (dh, dw) = _pair(a.stride), _pair(a.padding), _pair(a.dilation)
        C, H, W = x.shape
        _, OH, OW = y.shape
        if C != cig * groups or O % groups or y.shape[0] != O:
            raise QCompileError(f"op {op.name!r} (conv2d): channels do not match: input {C}, weight {w.shape}, "
                                f"groups {groups}, output {y.shape[0]}")
        K = cig * kh * kw
        bias = _per_channel(a.bias, O, "bias", op)
        m, s = _requant_params(op, O)
        w2 = w.reshape(O, K)
        L = _Layer(kind="conv2d", op_name=op.name, sym=sym, ci=C, h=H, w=W, co=O, oh=OH, ow=OW, kh=kh, kw=kw,
                   sh=sh, sw=sw, ph=ph, pw=pw, dh=dh, dw=dw, groups=groups, cig=cig, cog=O // groups, K=K,
                   P=OH * OW, pb=PIXEL_BLOCK, hp=H + 2 * ph, wp=W + 2 * pw, zx=x.zero_point, zy=y.zero_point,
                   x_t=ctype(x), y_t=ctype(y))
        L["lo"], L["hi"] = _act_range(op, y)
        L.update(_accumulator(op, w2, bias, x))
        L["rq"] = _rq(L["acc_bound"], m, s)
        self.macs += O * K * OH * OW
        col_bytes = np.dtype(L["col_t"].replace("_t", "")).itemsize
        depthwise = cig == 1 and O == groups
        gemm = None if depthwise else _gemm_plan(L, w, bias, x, self.value_range(op.inputs[0]))
        if gemm is None:
            self.weight_bytes += _weight_arrays(op, L, w2, bias, m, s)
        if depthwise:
            return self._depthwise(L, y, col_bytes)
        if gemm is not None:
            L.update(gemm)
            L["m_data"], L["s_data"] = _c_array(m), _c_array(s)
            self.weight_bytes += gemm["weight_bytes"] + 8 * O
            self.gemm.add(L["kernel"])
            if L["kernel"] != "exact":
                L["rq8"] = L["rq"] == "qc_requantize" and y.bits <= 8       # AVX2: 16 codes requantized at once
                if L["rq8"]:
                    self.gemm.add("requantize16")
                chunk = L["nb"] * GEMM_PIXELS * L["kp"] * L["col_bytes"]                  # a chunk of columns
                padded = (cig + 1) * L["plane"] if L.get("implicit") else cig * L["hp"] * L["wp"] * L["col_bytes"]
                return "conv2d_gemm.c.j2", L, [chunk + padded]          # and the padded input
            L["portable"]["blocks"] = _blocks(OH * OW)
            L["planes_bytes"] = L["n4"] * sh * sw * L["plane"]
            L["plane_scratch"] = [L["planes_bytes"] + 2 * L["cb"] * L["kp"]]    # the phase planes, AVX2's int16 rows
            return "conv2d_gemm.c.j2", L, [L["portable"]["blocks"][0] * L["kp"] * 2]  # int16 columns elsewhere
        L["blocks"] = _blocks(OH * OW)
        return "conv2d.c.j2", L, [L["blocks"][0] * K * col_bytes]             # one block of columns

    def _depthwise(self, L: _Layer, y: ir.Tensor, col_bytes: int):
        """conv2d_dw.c.j2: exact int32 sums go 16 output pixels of a row at a time (`lanes`; with
        intrinsics for 16-bit operands and strides 1-2, `simd`: stored as int32 at stride 1, int16 at
        stride 2, where (x, next) pairs are the lanes) over one padded channel whose rows are
        `wpp` wide, requantized 16 at once with AVX-512 or AVX2 when the codes are bytes and the 64-bit
        helper is exact (`rq16`); other accumulators run the tile loop over one padded channel."""
        L["lanes"] = L["mode"] == "exact" and L["dacc_t"] == "int32_t"
        L["rq16"] = L["lanes"] and L["rq"] == "qc_requantize" and y.bits <= 8
        if L["rq16"]:
            self.gemm.add("requantize16")
        L["simd"] = L["lanes"] and L["col_t"] == "int16_t" and L["sw"] <= 2   # the intrinsic forms
        if L["simd"]:
            self.intrinsics = True
            if L["sw"] == 1:       # operands sign-extended once: a stride-1 tap loads its 16 lanes as they are
                L["col_t"], col_bytes = "int32_t", 4
        if not L["lanes"]:
            return "conv2d_dw.c.j2", L, [L["hp"] * L["wp"] * col_bytes]       # one padded channel
        L["taps"] = [(ky, kx) for ky in range(L["kh"]) for kx in range(L["kw"])]
        # rows wide enough for the last 16-pixel step from the deepest tap (AVX-512 stride 2: 32 values)
        L["wpp"] = max(L["wp"], L["sw"] * -(-L["ow"] // 16) * 16 + (L["kw"] - 1) * L["dw"] + 16)
        return "conv2d_dw.c.j2", L, [L["hp"] * L["wpp"] * col_bytes]         # one padded channel

    def op_linear(self, op, sym):
        a = op.attrs
        x, y = self.t(op.inputs[0]), self.t(op.output)
        w = np.asarray(a.weight, dtype=np.int64)
        O, K = w.shape
        if x.shape[-1] != K or y.shape[-1] != O:
            raise QCompileError(f"op {op.name!r} (linear): weight {w.shape} does not match input {x.shape} / output {y.shape}")
        rows = int(np.prod(x.shape[:-1], dtype=np.int64))
        bias = _per_channel(a.bias, O, "bias", op)
        m, s = _requant_params(op, O)
        L = _Layer(kind="linear", op_name=op.name, sym=sym, co=O, cog=O, K=K, P=rows, pb=PIXEL_BLOCK,
                   zx=x.zero_point, zy=y.zero_point, x_t=ctype(x), y_t=ctype(y))
        L["lo"], L["hi"] = _act_range(op, y)
        L.update(_accumulator(op, w, bias, x))
        L["rq"] = _rq(L["acc_bound"], m, s)
        self.weight_bytes += _weight_arrays(op, L, w, bias, m, s)
        self.macs += O * K * rows
        L["blocks"] = _blocks(rows)
        return "linear.c.j2", L, [L["blocks"][0] * K * np.dtype(L["col_t"].replace("_t", "")).itemsize]

    def op_matmul(self, op, sym):
        a_t, b_t, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.output)
        if len(a_t.shape) < 2 or len(b_t.shape) < 2 or a_t.shape[-1] != b_t.shape[-2]:
            raise QCompileError(f"op {op.name!r} (matmul): shapes {a_t.shape} @ {b_t.shape} do not multiply")
        M, K, N = a_t.shape[-2], a_t.shape[-1], b_t.shape[-1]
        batch = int(np.prod(a_t.shape[:-2], dtype=np.int64))
        b_batch = int(np.prod(b_t.shape[:-2], dtype=np.int64))
        if b_batch not in (1, batch) or tuple(y.shape) != tuple(a_t.shape[:-2]) + (M, N):
            raise UnsupportedOpError(f"op {op.name!r} (matmul): {a_t.shape} @ {b_t.shape} -> {y.shape}: only equal "
                                     f"leading dimensions (or a 2-D right operand) are supported")
        maxb = b_t.magnitude
        L = _Layer(kind="matmul", op_name=op.name, sym=sym, batch=batch, m_rows=M, co=N, cog=N, K=K,
                   b_stride=0 if b_batch == 1 else K * N, za=a_t.zero_point, zb=b_t.zero_point, zy=y.zero_point,
                   a_t=ctype(a_t), b_t=ctype(b_t), y_t=ctype(y), w_base="bt", bias_expr="0",
                   mult=_scalar(op.attrs.multiplier, "multiplier", op), shift=_scalar(op.attrs.shift, "shift", op))
        _check_shift(L["shift"], op)
        L["lo"], L["hi"] = _act_range(op, y)
        L.update(_accumulator(op, np.full((1, K), maxb, np.int64), np.zeros(1, np.int64), a_t))
        L["rq"] = _rq(L["acc_bound"], L["mult"], L["shift"])
        if not _fits(maxb, 16):
            L["col_t"] = "int32_t"
        L["w_t"] = L["col_t"]
        self.macs += batch * M * N * K
        size = np.dtype(L["col_t"].replace("_t", "")).itemsize
        return "matmul.c.j2", L, [K * size, K * N * size]

    def _binary(self, op, sym):
        a_t, b_t, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.output)
        dims = list(y.shape) or [1]
        try:
            np.broadcast_shapes(a_t.shape, b_t.shape, y.shape)
        except ValueError:
            raise QCompileError(f"op {op.name!r} ({op.kind}): shapes {a_t.shape} and {b_t.shape} do not broadcast to "
                                f"{y.shape}") from None
        L = _Layer(op_name=op.name, sym=sym, dims=dims, sa=_broadcast_strides(a_t.shape, dims),
                   sb=_broadcast_strides(b_t.shape, dims), za=a_t.zero_point, zb=b_t.zero_point, zy=y.zero_point,
                   a_t=ctype(a_t), b_t=ctype(b_t), y_t=ctype(y))
        L["lo"], L["hi"] = _act_range(op, y)
        L["m"], L["s"] = _scalar(op.attrs.multiplier, "multiplier", op), _scalar(op.attrs.shift, "shift", op)
        _check_shift(L["s"], op)
        return L

    def op_add(self, op, sym):
        L = self._binary(op, sym)
        at = op.attrs
        L["ma"], L["ssa"] = _scalar(at.multiplier_a, "multiplier_a", op), _scalar(at.shift_a, "shift_a", op)
        L["mb"], L["ssb"] = _scalar(at.multiplier_b, "multiplier_b", op), _scalar(at.shift_b, "shift_b", op)
        _check_shift([L["ssa"], L["ssb"]], op)
        left = int(at.left_shift)
        if not 0 <= left <= 30:
            raise QCompileError(f"op {op.name!r} (add): left_shift={left} outside 0..30")
        L["scale_up"] = 1 << left
        a_t, b_t = self.t(op.inputs[0]), self.t(op.inputs[1])
        bound_a = a_t.magnitude << left
        bound_b = b_t.magnitude << left
        sum_bound = requantized_bound(bound_a, L["ma"], L["ssa"]) + requantized_bound(bound_b, L["mb"], L["ssb"])
        wide = not (fits_int64(bound_a, L["ma"], L["ssa"]) and fits_int64(bound_b, L["mb"], L["ssb"])
                    and fits_int64(sum_bound, L["m"], L["s"]))
        L["rq"] = "qc_requantize_wide" if wide else "qc_requantize"
        # 8-bit inputs: each input's requantized value is looked up in a table of its 256 codes,
        # filled by the same helper at the start of the call (two requantizations per code, not per element)
        L["tables"] = [(t.qmin, t.qmax - t.qmin + 1) if t.bits <= 8 else None for t in (a_t, b_t)]
        # ... as int32 where their sum fits; then, with no broadcast and byte outputs, AVX-512 gathers 16
        # of each and requantizes the 16 sums at once
        L["table_t"] = "int32_t" if _fits(sum_bound, 32) else "int64_t"
        y = self.t(op.output)
        L["simd16"] = (all(L["tables"]) and L["table_t"] == "int32_t" and not wide and y.bits <= 8
                       and tuple(a_t.shape) == tuple(b_t.shape) == tuple(y.shape))
        if L["simd16"]:
            L["size"] = int(np.prod(y.shape, dtype=np.int64))
            self.gemm.add("requantize16")
            self.intrinsics = True
        return "add.c.j2", L, []

    def op_mul(self, op, sym):
        L = self._binary(op, sym)
        L["rq"] = _rq(self.t(op.inputs[0]).magnitude * self.t(op.inputs[1]).magnitude, L["m"], L["s"])
        return "mul.c.j2", L, []

    def op_requantize(self, op, sym):
        x, y = self.t(op.inputs[0]), self.t(op.output)
        L = _Layer(op_name=op.name, sym=sym, n=int(np.prod(y.shape, dtype=np.int64)), zx=x.zero_point,
                   zy=y.zero_point, x_t=ctype(x), y_t=ctype(y),
                   m=_scalar(op.attrs.multiplier, "multiplier", op), s=_scalar(op.attrs.shift, "shift", op))
        _check_shift(L["s"], op)
        L["lo"], L["hi"] = _act_range(op, y)
        L["rq"] = _rq(x.magnitude, L["m"], L["s"])
        return "requantize.c.j2", L, []

    def op_concat(self, op, sym):
        y = self.t(op.output)
        axis = int(op.attrs.axis)
        axis = axis + len(y.shape) if axis < 0 else axis
        ms = _per_channel(op.attrs.multipliers, len(op.inputs), "multipliers", op)
        ss = _per_channel(op.attrs.shifts, len(op.inputs), "shifts", op)
        _check_shift(ss, op)
        outer = int(np.prod(y.shape[:axis], dtype=np.int64))
        parts, offset = [], 0
        for name, m, s in zip(op.inputs, ms, ss):
            x = self.t(name)
            inner = int(np.prod(x.shape[axis:], dtype=np.int64))
            parts.append(dict(t=ctype(x), inner=inner, offset=offset, z=x.zero_point, m=int(m), s=int(s),
                              rq=_rq(x.magnitude, m, s)))
            offset += inner
        L = _Layer(op_name=op.name, sym=sym, axis=axis, outer=outer, inner=offset, parts=parts, zy=y.zero_point,
                   y_t=ctype(y))
        if offset != int(np.prod(y.shape[axis:], dtype=np.int64)):
            raise QCompileError(f"op {op.name!r} (concat): inputs do not add up to the output shape {y.shape}")
        L["lo"], L["hi"] = _act_range(op, y)
        return "concat.c.j2", L, []

    def _pool(self, op, sym):
        x, y = self.t(op.inputs[0]), self.t(op.output)
        a = op.attrs
        C, H, W = x.shape
        _, OH, OW = y.shape
        if isinstance(a, ir.AvgPool2d) and a.global_pool:
            k, st, pad = (H, W), (1, 1), (0, 0)
        else:
            k, st, pad = _pair(a.kernel), _pair(a.stride), _pair(a.padding)
        d = (1, 1)   # the IR's pools have no dilation
        L = _Layer(op_name=op.name, sym=sym, c=C, h=H, w=W, oh=OH, ow=OW, kh=k[0], kw=k[1], sh=st[0], sw=st[1],
                   ph=pad[0], pw=pad[1], dh=d[0], dw=d[1], zx=x.zero_point, zy=y.zero_point, x_t=ctype(x),
                   y_t=ctype(y))
        L["lo"], L["hi"] = _act_range(op, y)
        return L

    def op_max_pool2d(self, op, sym):
        L = self._pool(op, sym)
        if 2 * L["ph"] > L["kh"] or 2 * L["pw"] > L["kw"]:
            raise QCompileError(f"op {op.name!r} (max_pool2d): padding {L['ph']}x{L['pw']} is more than half the kernel "
                                f"{L['kh']}x{L['kw']} (as torch requires), so a window could hold padding only")
        L["xmin"] = self.t(op.inputs[0]).qmin       # the padding: no code is below it, so it never wins
        L["rw"] = L["w"] + 2 * L["pw"] + L["sw"] + (L["kw"] - 1) * L["dw"]      # the padded row, with room
        return "max_pool2d.c.j2", L, []

    def op_avg_pool2d(self, op, sym):
        L = self._pool(op, sym)
        L["m"], L["s"] = _scalar(op.attrs.multiplier, "multiplier", op), _scalar(op.attrs.shift, "shift", op)
        _check_shift(L["s"], op)
        x = self.t(op.inputs[0])
        L["rq"] = _rq(x.magnitude * L["kh"] * L["kw"], L["m"], L["s"])
        return "avg_pool2d.c.j2", L, []

    def op_adaptive_avg_pool2d(self, op, sym):
        x, y, a = self.t(op.inputs[0]), self.t(op.output), op.attrs
        (C, H, W), (_, OH, OW) = x.shape, y.shape
        _check_shift(a.shift, op)
        L = _Layer(op_name=op.name, sym=sym, c=C, h=H, w=W, oh=OH, ow=OW, zx=x.zero_point, zy=y.zero_point,
                   x_t=ctype(x), y_t=ctype(y), hs=_c_array(a.h_start), he=_c_array(a.h_end), ws=_c_array(a.w_start),
                   we=_c_array(a.w_end), m_data=_c_array(a.multiplier), s_data=_c_array(a.shift))
        L["lo"], L["hi"] = _act_range(op, y)
        window = max((he - hs) * (we - ws) for hs, he in zip(a.h_start, a.h_end) for ws, we in zip(a.w_start, a.w_end))
        L["rq"] = _rq(x.magnitude * window, a.multiplier, a.shift)
        return "adaptive_avg_pool2d.c.j2", L, []

    def op_lut(self, op, sym):
        x, y = self.t(op.inputs[0]), self.t(op.output)
        table = np.asarray(op.attrs.table, dtype=np.int64)
        codes = x.qmax - x.qmin + 1
        if table.shape != (codes,):
            raise QCompileError(f"op {op.name!r} (lut): table of shape {table.shape} does not fit input {x.name!r} "
                                f"({codes} codes, shape {x.shape})")
        if table.min() < y.qmin or table.max() > y.qmax:
            raise QCompileError(f"op {op.name!r} (lut): table values {table.min()}..{table.max()} leave the output "
                                f"range {y.qmin}..{y.qmax}")
        n = int(np.prod(y.shape, dtype=np.int64))
        L = _Layer(op_name=op.name, sym=sym, n=n, qmin=x.qmin, size=table.size, table=_c_array(table), x_t=ctype(x),
                   y_t=ctype(y), bytes=None)
        self.weight_bytes += table.size * np.dtype(ctype(y).replace("_t", "")).itemsize
        if x.bits <= 8 and y.bits <= 8:        # bytes in, bytes out: the AVX-512 VBMI lookup (lut.c.j2)
            padded = np.concatenate([table, np.full(256 - table.size, table[-1])])
            L["bytes"] = _c_array(padded & 0xFF)
            self.intrinsics = True
        return "lut.c.j2", L, []

    # ---- row-wise ops over the last axis (qcompile/core/rowwise.py; the C helpers are in common.c.j2) ----
    def _rowwise(self, op, sym):
        """Shared context of softmax / layer_norm: one input of the output's shape, rows of the last axis."""
        x, y = self.t(op.inputs[0]), self.t(op.output)
        if len(op.inputs) != 1 or not x.shape or tuple(x.shape) != tuple(y.shape) or x.shape[-1] < 1:
            raise QCompileError(f"op {op.name!r} ({op.kind}): expects one input of the output's shape with a non-empty "
                                f"last axis, got {[self.t(i).shape for i in op.inputs]} -> {y.shape}")
        L = _Layer(op_name=op.name, sym=sym, shape=tuple(y.shape), zy=y.zero_point, x_t=ctype(x), y_t=ctype(y))
        L["lo"], L["hi"] = _act_range(op, y)
        return x, y, L

    def op_softmax(self, op, sym):
        """Rows of the last axis, grouped as (outer, rows, cols) for the causal mask of the last two axes.
        The table is cut at qmax − qmin + 1 entries (no row reaches past mx − x = qmax − qmin; entries past
        the end are 0 either way). Static bound: e·R + Σe·2^16 < 2^62, so qc_div_round's int64 is exact."""
        x, y, L = self._rowwise(op, sym)
        a = op.attrs
        table = np.asarray(a.table, dtype=np.int64).ravel()[:x.qmax - x.qmin + 1]
        mult = int(a.out_multiplier)
        if table.size == 0 or table.min() < 0 or mult < 0:
            raise QCompileError(f"op {op.name!r} (softmax): needs a non-empty table of non-negative entries and a "
                                f"non-negative out_multiplier (got {table.size} entries, R = {mult})")
        cols = x.shape[-1]
        rows = x.shape[-2] if len(x.shape) > 1 else 1
        emax = int(table.max())
        if emax * mult + cols * emax * (1 << 16) >= INT62:
            raise UnsupportedOpError(f"op {op.name!r} (softmax): e·R + Σe·2^16 may reach 2^62 (max e {emax}, "
                                     f"R = {mult}, {cols} columns); the C backend divides in int64")
        outer = int(np.prod(x.shape[:-2], dtype=np.int64))
        L.update(outer=outer, rows=rows, cols=cols, causal=bool(a.causal), mask=None,
                 mult=mult, size=table.size, table=_c_array(table),
                 table_t="int32_t" if _fits(emax, 32) else "int64_t")
        self.weight_bytes += table.size * (4 if L["table_t"] == "int32_t" else 8)
        if a.visible is not None:
            # the mask's (rows, cols) blocks, and which block each of the `outer` groups of rows reads
            mask = np.broadcast_to(np.asarray(a.visible) != 0, (*a.visible.shape[:-2], rows, cols)
                                   if a.visible.ndim >= 2 else (rows, cols))
            blocks = mask.reshape(-1, rows * cols)
            lead = mask.shape[:-2]
            which = np.broadcast_to(np.arange(blocks.shape[0]).reshape(lead), tuple(x.shape[:-2])).ravel()
            L.update(mask=_c_array(blocks.ravel().astype(np.uint8)), mask_size=blocks.size,
                     block=_c_array(which * rows * cols), block_t="int32_t")
            self.weight_bytes += blocks.size + 4 * outer
        return "softmax.c.j2", L, []

    def op_layer_norm(self, op, sym):
        """Static bounds (`core.rowwise.layer_norm_bounds`): Σd² + E < 2^62; |acc| < 2^62 picks the requantize
        helper."""
        x, y, L = self._rowwise(op, sym)
        a = op.attrs
        n = x.shape[-1]
        w = _per_channel(a.weight, n, "weight", op)
        b = _per_channel(a.bias, n, "bias", op)
        eps = int(a.eps)
        m, s = _scalar(a.multiplier, "multiplier", op), _scalar(a.shift, "shift", op)
        _check_shift(s, op)
        sq_bound, acc_bound = layer_norm_bounds(n, layer_norm_span(x.qmin, x.qmax, x.zero_point, a.centered), eps, w, b)
        if eps < 0 or sq_bound >= INT62 or acc_bound >= INT62:
            raise UnsupportedOpError(f"op {op.name!r} (layer_norm): Σd² + E <= {sq_bound} and |acc| <= {acc_bound} "
                                     f"must stay below 2^62 with E = {eps} >= 0; the C backend sums in int64")
        w_t = _int_type(int(w.min()), int(w.max()))
        L.update(rows=int(np.prod(x.shape[:-1], dtype=np.int64)), n=n, eps=eps, m=m, s=s, rq=_rq(acc_bound, m, s),
                 centre=None if a.centered else n * x.zero_point,
                 w_t=w_t, w_data=_c_array(w), b_data=_c_array(b))
        self.weight_bytes += n * (np.dtype(w_t.replace("_t", "")).itemsize + 8)
        return "layer_norm.c.j2", L, []

    def op_embedding(self, op, sym):
        """Rows of a static const (V, E) table of output codes gathered by unsigned token ids (zero point 0,
        typically the graph input: the harness reads their codes); an id past the table reads row V − 1.
        Where the ids' storage cannot pass V − 1 the clamp is left out (gcc -Wtype-limits would flag it)."""
        x, y = self.t(op.inputs[0]), self.t(op.output)
        table = np.asarray(op.attrs.table, dtype=np.int64)
        if len(op.inputs) != 1 or table.ndim != 2 or 0 in table.shape or x.signed or x.zero_point != 0 or \
                tuple(y.shape) != tuple(x.shape) + (table.shape[1],):
            raise QCompileError(f"op {op.name!r} (embedding): expects unsigned ids (zero point 0) of shape {x.shape} "
                                f"and a non-empty (V, E) table into ids' shape + (E,), got table {table.shape} and "
                                f"output {y.shape}")
        if table.min() < y.qmin or table.max() > y.qmax:
            raise QCompileError(f"op {op.name!r} (embedding): table values {table.min()}..{table.max()} leave the "
                                f"output range {y.qmin}..{y.qmax}")
        v, e = table.shape
        L = _Layer(op_name=op.name, sym=sym, rows=int(np.prod(x.shape, dtype=np.int64)), v=v, e=e,
                   clamp=v - 1 < x.qmax, id_max=x.qmax, x_t=ctype(x), y_t=ctype(y))
        if L["y_t"] == "int8_t":
            L["table"], L["words"] = _packed_bytes(table)
        else:
            L["table"], L["words"] = _c_array(table), 0
        self.weight_bytes += table.size * np.dtype(ctype(y).replace("_t", "")).itemsize
        return "embedding.c.j2", L, []

    def op_constant(self, op, sym):
        """No inputs: the codes are a static const array copied into the output for every sample."""
        y = self.t(op.output)
        value = np.asarray(op.attrs.value, dtype=np.int64)
        if op.inputs or tuple(value.shape) != tuple(y.shape) or value.size == 0:
            raise QCompileError(f"op {op.name!r} (constant): expects no inputs and a non-empty value of the output's "
                                f"shape {y.shape}, got inputs {op.inputs} and value of shape {value.shape}")
        if value.min() < y.qmin or value.max() > y.qmax:
            raise QCompileError(f"op {op.name!r} (constant): values {value.min()}..{value.max()} leave the output "
                                f"range {y.qmin}..{y.qmax}")
        L = _Layer(op_name=op.name, sym=sym, shape=tuple(y.shape), n=value.size, value=_c_array(value), y_t=ctype(y))
        self.weight_bytes += value.size * np.dtype(ctype(y).replace("_t", "")).itemsize
        return "constant.c.j2", L, []

    def op_transpose(self, op, sym):
        x, y = self.t(op.inputs[0]), self.t(op.output)
        perm = [int(p) for p in op.attrs.perm]
        in_strides = _broadcast_strides(x.shape, x.shape)
        L = _Layer(op_name=op.name, sym=sym, perm=perm, dims=list(y.shape) or [1],
                   sx=[in_strides[p] for p in perm] or [0], x_t=ctype(x), y_t=ctype(y))
        return "transpose.c.j2", L, []

    def op_slice(self, op, sym):
        x, y = self.t(op.inputs[0]), self.t(op.output)
        a = op.attrs
        axis = int(a.axis)
        axis = axis + len(x.shape) if axis < 0 else axis
        start, stop = slice(a.start, a.stop).indices(x.shape[axis])[:2]
        rest = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
        L = _Layer(op_name=op.name, sym=sym, axis=axis, start=start, stop=stop,
                   outer=int(np.prod(x.shape[:axis], dtype=np.int64)), in_inner=x.shape[axis] * rest,
                   out_inner=(stop - start) * rest, offset=start * rest, x_t=ctype(x), y_t=ctype(y))
        return "slice.c.j2", L, []

    def op_reshape_copy(self, op, sym):
        x, y = self.t(op.inputs[0]), self.t(op.output)
        L = _Layer(kind=op.kind, op_name=op.name, sym=sym, n=int(np.prod(y.shape, dtype=np.int64)),
                   x_t=ctype(x), y_t=ctype(y))
        return "copy.c.j2", L, []


def _same_storage(a: ir.Tensor, b: ir.Tensor) -> bool:
    return ctype(a) == ctype(b) and a.zero_point == b.zero_point


def generate(graph: ir.Graph, name: str = "model") -> tuple[dict[str, str], dict[str, Any]]:
    """The generated files {filename: text} and the figures (bytes, MACs) of `graph`."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or name in C_KEYWORDS:
        raise ValueError(f"name={name!r}: must be a C identifier (letters, digits, '_', starting with a letter), "
                         f"and is used for the file names and the `<name>_run` entry point")
    bad = [op for op in graph.ops if op.kind not in SUPPORTED]
    if bad:
        raise UnsupportedOpError(
            f"the C backend does not support op kind {bad[0].kind!r} (op {bad[0].name!r}); supported kinds: "
            f"{', '.join(SUPPORTED)}")
    ir.verify(graph)
    em = _Emitter(graph, name)
    em.taken.update({f"{name}_run", "input", "output", "arena"})
    inputs, outputs = list(graph.inputs), list(graph.outputs)
    if set(inputs) & set(outputs):
        raise QCompileError(f"integer graph: tensor(s) {sorted(set(inputs) & set(outputs))} are both input and output")

    # reshape outputs alias their input's bytes, except when the output leaves the graph
    root: dict[str, str] = {}
    def find(t: str) -> str:
        while t in root:
            t = root[t]
        return t
    copies = set()
    for op in graph.ops:
        if op.kind == "reshape":
            if op.output in outputs or not _same_storage(em.t(op.inputs[0]), em.t(op.output)):
                copies.add(op.output)
            else:
                root[op.output] = op.inputs[0]

    # liveness of every arena buffer (roots of alias sets) and the per-op scratch buffers
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    rendered: list[tuple[str, _Layer, list[int], ir.Op]] = []
    for i, op in enumerate(graph.ops):
        for t in op.inputs:
            r = find(t)
            if r not in inputs and r not in first:
                raise QCompileError(f"integer graph: op {op.name!r} reads {t!r} before any op writes it")
            last[r] = max(last.get(r, i), i)
        if op.kind == "reshape" and op.output not in copies:
            continue
        first[op.output] = i
        last.setdefault(op.output, i)
    for o in outputs:
        if o not in first and find(o) == o:
            raise QCompileError(f"integer graph: output {o!r} is written by no op")

    for i, op in enumerate(graph.ops):
        if op.kind == "reshape" and op.output not in copies:
            continue
        sym = c_identifier(op.name, em.taken, name)
        handler = getattr(em, "op_reshape_copy" if op.kind == "reshape" else f"op_{op.kind}")
        template, L, scratch = handler(op, sym)
        rendered.append((template, L, scratch, op))

    buffers = []
    activation_bytes = 0
    for t, f in first.items():
        if t in outputs:
            continue
        ten = em.t(t)
        size = int(np.prod(ten.shape, dtype=np.int64)) * np.dtype(ctype(ten).replace("_t", "")).itemsize
        activation_bytes += size
        buffers.append(memory_plan.Buffer(t, size, f, last[t]))
    op_index = {id(op): i for i, op in enumerate(graph.ops)}

    def arena_plan(planes: bool) -> memory_plan.Plan:
        """Buffers and scratch of the build without (portable) or with the AVX2 / AVX-512 kernels that read
        the exact convs' phase planes (gemm.c.j2)."""
        scratch_buffers = [memory_plan.Buffer(f"{L.sym}#scratch{j}", int(size), op_index[id(op)], op_index[id(op)])
                           for template, L, scratch, op in rendered
                           for j, size in enumerate(L.get("plane_scratch", scratch) if planes else scratch)]
        plan = memory_plan.plan([memory_plan.Buffer(b.name, b.size, b.first, b.last) for b in buffers] + scratch_buffers)
        memory_plan.check(plan)
        return plan

    def call_lines(plan: memory_plan.Plan) -> list[str]:
        def ptr(tname: str) -> str:
            r = find(tname)
            if r in inputs:
                return "input" if len(inputs) == 1 else f"input{inputs.index(r)}"
            if r in outputs:
                return "output" if len(outputs) == 1 else f"output{outputs.index(r)}"
            return f"({ctype(em.t(tname))} *)(arena + {plan.offsets[r]})"
        lines = []
        for template, L, scratch, op in rendered:
            args = [ptr(t) for t in op.inputs] + [ptr(op.output)]
            args += [f"({L.col_t} *)(arena + {plan.offsets[f'{L.sym}#scratch{j}']})" for j in range(len(scratch))]
            lines.append(f"{L.sym}({', '.join(args)});")
        return lines

    plan = arena_plan(planes=False)
    calls = call_lines(plan)
    planes_plan = arena_plan(planes=True) if any("plane_scratch" in L for _, L, _, _ in rendered) else None
    plane_calls = call_lines(planes_plan) if planes_plan is not None else None
    functions = [_env.get_template(template).render(L=L) for template, L, scratch, op in rendered]

    def describe(names):
        out = []
        for n in names:
            t = em.t(n)
            size = int(np.prod(t.shape, dtype=np.int64))
            ct = ctype(t)
            out.append(dict(name=n, shape=list(t.shape), ctype=ct, dtype=np.dtype(NUMPY_DTYPES[ct]).name,
                            size=size, nbytes=size * np.dtype(NUMPY_DTYPES[ct]).itemsize, scale=float(t.scale),
                            zero_point=int(t.zero_point)))
        return out

    ins, outs = describe(inputs), describe(outputs)
    params = [f"const {t['ctype']} *{'input' if len(ins) == 1 else f'input{k}'}" for k, t in enumerate(ins)]
    params += [f"{t['ctype']} *{'output' if len(outs) == 1 else f'output{k}'}" for k, t in enumerate(outs)]
    params.append("uint8_t *arena")
    ctx = dict(name=name, NAME=name.upper(), version=graph.meta.get("qcompile_version", "unknown"), inputs=ins, outputs=outs,
               arena_bytes=plan.arena_bytes, weight_bytes=em.weight_bytes, signature=", ".join(params),
               functions=functions, calls=calls, gemm=sorted(em.gemm), intrinsics=em.intrinsics or bool(em.gemm),
               amx=any(L.get("amx") for _, L, _, _ in rendered),
               gemm_blocks=GEMM_BLOCKS, plane_calls=plane_calls,
               plane_arena_bytes=None if planes_plan is None else planes_plan.arena_bytes)
    files = {f"{name}.h": _env.get_template("model.h.j2").render(**ctx),
             f"{name}.c": _env.get_template("model.c.j2").render(**ctx),
             "main.c": _env.get_template("main.c.j2").render(**ctx),
             "Makefile": _env.get_template("Makefile.j2").render(**ctx)}
    figures = dict(name=name, inputs=ins, outputs=outs, arena_bytes=plan.arena_bytes, naive_bytes=plan.naive_bytes,
                   plane_arena_bytes=ctx["plane_arena_bytes"],
                   activation_bytes=activation_bytes, weight_bytes=em.weight_bytes, macs=em.macs,
                   ops=len(graph.ops))
    files = {k: re.sub(r"\n{3,}", "\n\n", v) for k, v in files.items()}    # template blocks leave blank runs
    files[f"{name}.json"] = json.dumps(figures, indent=1) + "\n"
    return files, figures


def emit(graph: ir.Graph, out_dir, name: str = "model") -> CModule:
    """Write the C runtime of the integer graph `graph` into `out_dir`; returns the files and memory
    figures (`qcompile.emit_c` lowers a trained graph first)."""
    if not isinstance(graph, ir.Graph):
        raise TypeError(f"the C backend takes an ir.Graph, not {type(graph).__name__}: lower a trained graph "
                        "with qcompile.lower(qm) or use qcompile.emit_c(qm, ...)")
    files, fig = generate(graph, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, text in files.items():
        p = out / fname
        p.write_text(text)
        paths.append(p)
    return CModule(out, name, [graph.tensors[n] for n in graph.inputs], [graph.tensors[n] for n in graph.outputs],
                   fig["arena_bytes"], fig["naive_bytes"], fig["activation_bytes"], fig["weight_bytes"], fig["macs"],
                   paths)
