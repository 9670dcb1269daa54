"""Attention written in the ops the passes see (linear, chunk, reshapes, matmul, softmax, matmul,
linear), standing in for `nn.MultiheadAttention` and `F.scaled_dot_product_attention` while
`trace` runs, with the same numbers in float.

`attention_softmax(x, scale, causal, visible)` is softmax(scale·x) over the last axis, with the entries
above the diagonal (j > i + cols − rows of the last two axes) hidden when `causal`, and those where the
bool tensor `visible` (broadcast against x's trailing axes, e.g. Swin's shifted-window mask) is False:
one traced node (torch.fx.wrap), so the 1/√d scale and the masks are part of the op (their integer form
is one `softmax` IR op), not float ops before it. A row keeps at least one visible entry.

`Attention.from_module(mha)` holds the module's own parameters under the same names
(`in_proj_weight`, `in_proj_bias`, `out_proj`), so `state_dict()` keys do not change. Self-attention
(query, key and value the same tensor) is one linear to q|k|v, chunked; otherwise q, k and v are
linears on slices of the packed weight. An attention mask (SDPA's `attn_mask`, the module's
`attn_mask`: bool, or float of 0 and −inf) becomes `visible` through `mask_visible` (one traced
node); deployed, it must be a constant (a buffer, or made without the input). key_padding_mask,
bias_k/bias_v, add_zero_attn and separate k/v dimensions are refused with an error naming the module.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qcompile.errors import UnsupportedOpError


def attention_softmax(x: torch.Tensor, scale: float, causal: bool,
                      visible: torch.Tensor | None = None) -> torch.Tensor:
    x = x * scale
    if causal:
        rows, cols = x.shape[-2], x.shape[-1]
        hidden = torch.ones(rows, cols, dtype=torch.bool, device=x.device).triu(cols - rows + 1)
        x = x.masked_fill(hidden, float("-inf"))
    if visible is not None:
        x = x.masked_fill(~visible, float("-inf"))
    return torch.softmax(x, dim=-1)


torch.fx.wrap("attention_softmax")


def mask_visible(mask: torch.Tensor, true_is_visible: bool) -> torch.Tensor:
    """The bool `visible` of an attention mask: a bool mask (SDPA: True takes part, `true_is_visible`;
    nn.MultiheadAttention: True is hidden) or an additive float mask of 0 (visible) and −inf (hidden).
    Other float values are a bias, not a mask: refused."""
    if mask.dtype == torch.bool:
        return mask if true_is_visible else ~mask
    hidden = torch.isneginf(mask)
    if bool(((mask != 0) & ~hidden).any()):
        raise UnsupportedOpError("a float attention mask with values other than 0 and -inf is an additive bias, not a "
                                 "mask; pass a bool mask (or add the bias to the scores in the model)")
    return ~hidden


torch.fx.wrap("mask_visible")


def head_scale(head_dim: int) -> float:
    """1/√d: one traced node on the (traced) head dimension, a constant at lowering."""
    return 1.0 / math.sqrt(head_dim)


torch.fx.wrap("head_scale")


def attend(q, k, v, scale: float, causal: bool, dropout: nn.Module | None = None, visible=None):
    """softmax(q·kᵀ·scale)·v over (..., L, d) heads, entries where `visible` is False hidden; `dropout`
    on the probabilities (training)."""
    probs = attention_softmax(torch.matmul(q, k.transpose(-2, -1)), scale, causal, visible)
    if dropout is not None:
        probs = dropout(probs)
    return torch.matmul(probs, v), probs


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """F.scaled_dot_product_attention in traceable ops (what `trace` calls in its place)."""
    if enable_gqa:
        raise UnsupportedOpError("scaled_dot_product_attention with enable_gqa has no quantized form")
    scale = head_scale(query.size(-1)) if scale is None else scale
    visible = None if attn_mask is None else mask_visible(attn_mask, True)
    probs = attention_softmax(torch.matmul(query, key.transpose(-2, -1)), scale, is_causal, visible)
    if dropout_p:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, value)


class Attention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention, path: str):
        super().__init__()
        refused = [name for name, bad in (("bias_k/bias_v", mha.bias_k is not None), ("add_zero_attn", mha.add_zero_attn),
                                          ("kdim/vdim != embed_dim", not mha._qkv_same_embed_dim)) if bad]
        if refused:
            raise UnsupportedOpError(f"nn.MultiheadAttention {path!r}: {', '.join(refused)} has no quantized form")
        self.path, self.embed_dim, self.num_heads = path, mha.embed_dim, mha.num_heads
        self.head_dim, self.batch_first = mha.head_dim, mha.batch_first
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.attention_dropout = nn.Dropout(mha.dropout) if mha.dropout > 0 else None

    def heads(self, x):
        """(B, L, E) → (B, H, L, d)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None:
            raise UnsupportedOpError(f"nn.MultiheadAttention {self.path!r}: key_padding_mask (a mask that follows the "
                                     "input) has no quantized form; a constant attn_mask or is_causal=True has")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e = self.embed_dim
        b = self.in_proj_bias
        if query is key and key is value:
            q, k, v = torch.chunk(F.linear(query, self.in_proj_weight, b), 3, dim=-1)
        else:
            w = self.in_proj_weight
            q, k, v = (F.linear(t, w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e])
                       for i, t in enumerate((query, key, value)))
        visible = None if attn_mask is None else mask_visible(attn_mask, False)
        ctx, probs = attend(self.heads(q), self.heads(k), self.heads(v), 1.0 / math.sqrt(self.head_dim), is_causal,
                            self.attention_dropout, visible)
        out = self.out_proj(ctx.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, probs.mean(1) if average_attn_weights else probs


def own_attention(model: nn.Module, leaves=()) -> None:
    """Replace every nn.MultiheadAttention of `model` (in place) by an `Attention` on its parameters,
    except those named in `leaves` (module paths or "MultiheadAttention": kept as opaque calls)."""
    for path, mod in list(model.named_modules()):
        for name, child in list(mod.named_children()):
            full = f"{path}.{name}" if path else name
            if isinstance(child, nn.MultiheadAttention) and not {full, type(child).__name__} & set(leaves):
                setattr(mod, name, Attention(child, full))
