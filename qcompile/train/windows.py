"""Swin's shifted-window attention and patch merging written in the ops the passes see, standing in
for torchvision's `ShiftedWindowAttention` and `PatchMerging` (whose bodies are torch.fx.wrap'd
functions) while `trace` runs, with the same numbers in float.

Shapes are concrete: `own_windows` runs the example inputs once and builds each stand-in for the
(H, W) its module sees there, since the padding to whole windows, whether to shift and the
shifted-window mask follow from them. The batch stays the leading axis (windows are (B, nW, N, C),
not torchvision's (B·nW, N, C)), so samples stay independent, and heads come before windows in the
scores (B, heads, nW, N, N), so a per-head factor (v2's logit scale) is one value per channel. Padding is F.pad with zeros, the cyclic
shift slices + cat, window partition and patch merging reshapes/permutes, the relative-position bias
the bias table indexed by the module's `relative_position_index` (v2: 16·sigmoid of the continuous
position-bias MLP on the coordinate table, a function of parameters), v2's cosine attention
F.normalize of q and k times exp(min(logit_scale, ln 100)) with the key bias zeroed (as torchvision
does), and the shifted-window mask the `visible` argument of `attention_softmax` (a hidden entry has probability 0; torchvision adds −100
before its softmax, exp(−100) ≈ 4e-44). The stand-ins hold the original parameters and buffers under
the same names, so `state_dict()` keys do not change.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qcompile.train.attention import attention_softmax

torch.fx.wrap("attention_softmax")     # one traced node here too (fx.wrap patches this module's global)


def roll(x: torch.Tensor, shift: int, dim: int, n: int) -> torch.Tensor:
    """torch.roll(x, shift, dim) of an axis of length n as two slices and a cat."""
    cut = (-shift) % n
    if cut == 0:
        return x
    index = (slice(None),) * dim
    return torch.cat((x[index + (slice(cut, None),)], x[index + (slice(None, cut),)]), dim=dim)


def window_visible(pad_h: int, pad_w: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(nW, N, N) bool: token j is visible to token i of a window when both come from the same region
    of the shifted map (torchvision's shifted-window mask, where a hidden pair gets −100)."""
    region = torch.zeros(pad_h, pad_w)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    return region.unsqueeze(1) == region.unsqueeze(2)


class WindowAttention(nn.Module):
    """torchvision's `ShiftedWindowAttention` on an input of (B, H, W, C) with this H and W."""

    def __init__(self, mod: nn.Module, height: int, width: int, dim: int):
        super().__init__()
        self.qkv, self.proj = mod.qkv, mod.proj
        if hasattr(mod, "relative_position_bias_table"):        # v1 (v2 has a continuous position bias)
            self.relative_position_bias_table = mod.relative_position_bias_table
        self.register_buffer("relative_position_index", mod.relative_position_index)
        self.heads, self.dim, self.size = mod.num_heads, dim, (height, width)
        self.window = tuple(mod.window_size)
        self.pad = tuple((w - s % w) % w for s, w in zip(self.size, self.window))
        self.padded = tuple(s + p for s, p in zip(self.size, self.pad))
        self.shift = tuple(0 if w >= p else s for w, p, s in zip(self.window, self.padded, mod.shift_size))
        self.grid = (self.padded[0] // self.window[0], self.padded[1] // self.window[1])
        visible = window_visible(*self.padded, self.window, self.shift) if any(self.shift) else None
        self.register_buffer("visible", visible, persistent=False)
        self.attention_dropout = nn.Dropout(mod.attention_dropout) if mod.attention_dropout > 0 else nn.Identity()
        self.dropout = nn.Dropout(mod.dropout) if mod.dropout > 0 else nn.Identity()

    def relative_position_bias(self) -> torch.Tensor:
        """(1, heads, 1, N, N): the bias every window's scores get."""
        return self.gathered(self.relative_position_bias_table)

    def gathered(self, table: torch.Tensor) -> torch.Tensor:
        """(1, heads, 1, N, N) from a (relative positions, heads) table, by `relative_position_index`."""
        n = self.window[0] * self.window[1]
        return table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).unsqueeze(1).unsqueeze(0)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """(B, pH, pW, C) → (B, nW, N, C)."""
        (gh, gw), (wh, ww) = self.grid, self.window
        x = x.view(-1, gh, wh, gw, ww, self.dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, gh * gw, wh * ww, self.dim)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nW, N, C) → (B, pH, pW, C)."""
        (gh, gw), (wh, ww) = self.grid, self.window
        x = x.view(-1, gh, gw, wh, ww, self.dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, self.padded[0], self.padded[1], self.dim)

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nW, N, C) → (B, heads, nW, N, d)."""
        return x.unflatten(-1, (self.heads, self.dim // self.heads)).permute(0, 3, 1, 2, 4)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = q * (self.dim // self.heads) ** -0.5
        return torch.matmul(q, k.transpose(-2, -1)) + self.relative_position_bias()

    def roll(self, x: torch.Tensor, sign: int) -> torch.Tensor:
        """The cyclic shift of (B, pH, pW, C) by sign·shift on H and W."""
        x = roll(x, sign * self.shift[0], 1, self.padded[0])
        return roll(x, sign * self.shift[1], 2, self.padded[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, (0, 0, 0, self.pad[1], 0, self.pad[0]))
        x = self.roll(x, -1)
        q, k, v = torch.chunk(self.project(self.partition(x)), 3, dim=-1)
        scores = self.scores(self.heads_of(q), self.heads_of(k))
        probs = self.attention_dropout(attention_softmax(scores, 1.0, False, self.visible))
        x = self.dropout(self.proj(torch.matmul(probs, self.heads_of(v)).permute(0, 2, 3, 1, 4).flatten(-2)))
        x = self.roll(self.merge(x), 1)
        if any(self.pad):
            x = x[:, :self.size[0], :self.size[1], :]
        return x


class WindowAttentionV2(WindowAttention):
    """torchvision's `ShiftedWindowAttentionV2`: cosine attention with a per-head logit scale, the
    continuous position bias, the key bias zeroed."""

    def __init__(self, mod: nn.Module, height: int, width: int, dim: int):
        super().__init__(mod, height, width, dim)
        self.logit_scale, self.cpb_mlp = mod.logit_scale, mod.cpb_mlp
        self.register_buffer("relative_coords_table", mod.relative_coords_table)
        keep = torch.ones(3 * dim)
        keep[dim:2 * dim] = 0
        self.register_buffer("key_bias_zeroed", keep, persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        return 16 * torch.sigmoid(self.gathered(self.cpb_mlp(self.relative_coords_table).view(-1, self.heads)))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.qkv.bias is None else self.qkv.bias * self.key_bias_zeroed
        return F.linear(x, self.qkv.weight, bias)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        cosine = torch.matmul(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp().view(-1, 1, 1, 1)
        return cosine * scale + self.relative_position_bias()


class PatchMerge(nn.Module):
    """torchvision's `PatchMerging` / `PatchMergingV2` on an input of (B, H, W, C) with this H and W:
    the 2×2 neighbours of each output position concatenated on channels, in torchvision's order
    (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]), then LayerNorm and the reduction
    (v2: the reduction, then LayerNorm)."""

    def __init__(self, mod: nn.Module, height: int, width: int, dim: int):
        super().__init__()
        self.reduction, self.norm = mod.reduction, mod.norm
        self.norm_first = type(mod).__name__ != "PatchMergingV2"
        self.pad, self.dim = (height % 2, width % 2), dim
        self.half = ((height + 1) // 2, (width + 1) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, (0, 0, 0, self.pad[1], 0, self.pad[0]))
        x = x.view(-1, self.half[0], 2, self.half[1], 2, self.dim).permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(-1, self.half[0], self.half[1], 4 * self.dim)
        return self.reduction(self.norm(x)) if self.norm_first else self.norm(self.reduction(x))


@torch.no_grad()
def own_windows(model: nn.Module, example_inputs: tuple, leaves=()) -> None:
    """Replace (in place) every torchvision ShiftedWindowAttention / PatchMerging(V2) of `model` by its
    stand-in for the input shape it sees on `example_inputs`, except those named in `leaves` (a model
    can hold them only once torchvision's swin_transformer module is loaded: nothing is imported here)."""
    tv_swin = sys.modules.get("torchvision.models.swin_transformer")
    if tv_swin is None:
        return
    stand_ins = {tv_swin.ShiftedWindowAttention: WindowAttention, tv_swin.ShiftedWindowAttentionV2: WindowAttentionV2,
                 tv_swin.PatchMerging: PatchMerge, tv_swin.PatchMergingV2: PatchMerge}
    targets = {path: mod for path, mod in model.named_modules()
               if type(mod) in stand_ins and not {path, type(mod).__name__} & set(leaves)}
    if not targets:
        return
    shapes = {}

    def record(path):
        def hook(mod, args):
            shapes.setdefault(path, tuple(args[0].shape))
        return hook
    hooks = [mod.register_forward_pre_hook(record(path)) for path, mod in targets.items()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    for path, mod in targets.items():
        parent, _, name = path.rpartition(".")
        _, height, width, dim = shapes[path]
        setattr(model.get_submodule(parent), name, stand_ins[type(mod)](mod, height, width, dim))
