"""Quantization grids, written once: ranges of codes, grid parameters, rounding rules.

  signed range (b bits, storage):   [-2^(b-1), 2^(b-1)-1]                 (`code_range(b, True)`)
  asymmetric grid (b bits):         codes [0, 2^b-1], scale = (hi'-lo')/(2^b-1) with lo' = min(lo, 0),
                                    hi' = max(hi, 0), z = clamp(round(-lo'/scale), 0, 2^b-1);
  symmetric grid (b bits):          codes [-(2^(b-1)-1), 2^(b-1)-1] (narrow, so -x is representable),
                                    scale = max(|lo|, |hi|)/(2^(b-1)-1), z = 0;
  code(x) = clamp(round_half_even(x * (1/scale)) + z, qmin, qmax); x̂ = (code - z)·scale.
With `pow2`, the scale is rounded up to the next power of two (the range still fits).
Gradients round stochastically: floor(g/scale + u), u uniform on 2^16 levels (unbiased to
within 2^-17 of a step). Biases: round(b / (S_x·S_w)) on the accumulator's grid, never saturated (int32 or int64 in the IR).
Invariant: every other layer rounds floats to codes through these functions only.
"""
from __future__ import annotations

import weakref

import torch

SCALE_EPS = 1e-12


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, qr: tuple[int, int], symmetric: bool,
            pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of the grid covering [lo, hi]; zero_point is an integer-valued float tensor."""
    qmin, qmax = qr
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
    else:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.clamp(scale, min=SCALE_EPS)
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    if symmetric:
        zp = torch.zeros_like(scale)
    else:
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


def broadcast_along(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def any_nonzero(zp: torch.Tensor) -> bool:
    """Whether adding the zero point `zp` can change a code: False lets eager code skip a pass over
    the tensor. Always True under torch.compile, where the test would be a data-dependent branch
    (adding a zero point of 0 changes nothing)."""
    return torch.compiler.is_compiling() or bool(zp.any())


def unclamped_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """round_half_even(x · (1/scale)) + z, before the clamp: the grid's one rounding rule
    (the same as torch's fused fake-quantize kernels). `scale`, `zp` broadcast against x."""
    v = torch.mul(x, 1.0 / scale).round_()
    return v.add_(zp) if any_nonzero(zp) else v


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qr: tuple[int, int],
                   axis: int | None = None) -> torch.Tensor:
    """Integer codes of `x` (as a float tensor), with exactly the fused kernels' rounding."""
    return unclamped_codes(x, broadcast_along(scale, x, axis), broadcast_along(zp, x, axis)).clamp_(*qr)


def _draw_words(words: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.empty(words, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1, generator=generator)


_GENERATORS: dict[int, weakref.ref] = {}   # the generators compiled graphs may draw from, by id


def _forget(ref: weakref.ref, key: int) -> None:
    if _GENERATORS.get(key) is ref:
        del _GENERATORS[key]


def _registered(generator: torch.Generator) -> bool:
    ref = _GENERATORS.get(id(generator))
    return ref is not None and ref() is generator


def register_generator(generator: torch.Generator | None) -> None:
    """Let compiled graphs draw from `generator` (see `random_words`); its owner registers it when it
    is created or copied (compiled code cannot add it: a side effect inside a traced backward)."""
    if generator is not None and not _registered(generator):
        _GENERATORS[id(generator)] = weakref.ref(generator, lambda ref, key=id(generator): _forget(ref, key))


@torch.library.custom_op("qcompile::random_words", mutates_args=(), tags=torch.Tag.nondeterministic_seeded)
def _random_words(like: torch.Tensor, words: int, generator_id: int) -> torch.Tensor:
    return _draw_words(words, _GENERATORS[generator_id]() if generator_id else None, like.device)


@_random_words.register_fake
def _(like, words, generator_id):
    return like.new_empty(words, dtype=torch.int64)


def random_words(words: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """`words` uniform int64 from `generator` (torch's default one when None), on `like`'s device.
    Under torch.compile, which cannot trace a torch.Generator: the same draw from the same generator,
    as an opaque op the compiled graph calls at run time (`like` orders it after its producer)."""
    if not torch.compiler.is_compiling():
        return _draw_words(words, generator, like.device)
    if generator is not None and not _registered(generator):
        raise RuntimeError("random_words: the generator was not registered (register_generator) before compiling")
    return _random_words(like, words, 0 if generator is None else id(generator))


def _int64(c: int) -> int:
    """The int64 with the bits of the unsigned 64-bit constant `c`."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """z >> s as unsigned 64-bit words (torch's >> on int64 is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix_words(key: torch.Tensor, words: int) -> torch.Tensor:
    """The first `words` outputs of SplitMix64 (Steele, Lea & Flood 2014) seeded with the int64 `key`:
    word j = mix(key + (j + 1)·γ), on key's device, in int64 arithmetic (wrapping, as the unsigned
    C arithmetic of csrc/fake_quant.c, which computes the same words)."""
    z = torch.arange(1, words + 1, dtype=torch.int64, device=key.device).mul_(_int64(0x9E3779B97F4A7C15)).add_(key)
    z = (z ^ _shift_right(z, 30)).mul_(_int64(0xBF58476D1CE4E5B9))
    z = (z ^ _shift_right(z, 27)).mul_(_int64(0x94D049BB133111EB))
    return z ^ _shift_right(z, 31)


def dither_key(generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """One int64 drawn from `generator`: the key of a call's dither (`dither_words`)."""
    return random_words(1, generator, like)


def dither_words(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """k: one int16 per element of `like` (flat), uniform on [−2^15, 2^15): 16 random bits per element,
    four per word of the SplitMix64 stream keyed by one draw from `generator` (`dither_key`), so a call
    advances the generator by one draw whatever its size."""
    n = like.numel()
    return splitmix_words(dither_key(generator, like), -(-n // 4)).view(torch.int16)[:n]


def dither(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """u = k·2^-16 + ½ + 2^-17, uniform on the 2^16 levels (k + ½)/2^16 of [0, 1), shaped like `like`."""
    k = dither_words(like, generator).to(like.dtype)
    return k.mul_(2.0 ** -16).add_(0.5 + 2.0 ** -17).view(like.shape)


def stochastic_codes(g: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qr: tuple[int, int],
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """clamp(floor(g/scale + u) + z) − z with u the dither (uniform on 2^16 levels): stochastically
    rounded codes minus the zero point (integer-valued floats), unbiased inside the range to within
    2^-17 of a step."""
    u = dither(g, generator)
    # clamp(floor(·) + z, qmin, qmax) − z, with z folded into the bounds: numbers in eager (a clamp to
    # scalars is the faster kernel), a tensor under torch.compile (reading it out would break the graph)
    z = zp.to(g.dtype) if torch.compiler.is_compiling() else float(zp)
    return u.addcdiv_(g, scale.to(g.dtype)).floor_().clamp_(qr[0] - z, qr[1] - z)


def bias_codes(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor):
    """(codes, scale): the integer bias a layer adds to its accumulator, at scale S_x·S_w (a
    float32 product, per output channel), round_half_even(b / scale) computed in float64 and
    returned as float64 (every integer below 2^53 exact). Never saturated: wide grids (W16A16,
    16x8) need 10^7–10^10 codes for an ordinary bias; the IR stores them in int32 where they fit,
    else int64, and lowering rejects a layer whose codes reach 2^53 (a collapsed range). The one
    rule for training (BiasQuant), lowering and the accumulator ops."""
    scale = input_scale.float() * weight_scale.float()
    return torch.round(bias.double() / scale.double()), scale


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-wide signed or unsigned integer (storage; the full signed range)."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def storage_bits(lo: int, hi: int, narrowest: int = 8) -> int:
    """The narrowest signed width of 8, 16, 32, 64 (at least `narrowest`) holding every integer in
    [lo, hi]; ValueError past 64 bits."""
    for bits in (8, 16, 32, 64):
        qmin, qmax = code_range(bits, True)
        if bits >= narrowest and qmin <= lo and hi <= qmax:
            return bits
    raise ValueError(f"integer values in [{lo}, {hi}] do not fit 64 bits")


def max_code_magnitude(qr: tuple[int, int], zero_point):
    """max |code − z| over a grid's codes [qmin, qmax] (elementwise in z, a number or a tensor): the
    largest integer operand a matmul meets on that grid."""
    qmin, qmax = qr
    if isinstance(zero_point, torch.Tensor):
        return torch.maximum((qmin - zero_point).abs(), (qmax - zero_point).abs())
    return max(abs(qmin - zero_point), abs(qmax - zero_point))
