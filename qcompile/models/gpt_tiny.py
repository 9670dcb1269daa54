"""A small character-level decoder: byte embedding + learned positions, pre-norm blocks of causal
self-attention (F.scaled_dot_product_attention, is_causal=True) and a GELU MLP, a final LayerNorm and
an untied output head. Input: (B, T) byte ids with T = context; output: (B, T, vocab) next-byte logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def split(self, t):
        """(B, T, E) → (B, heads, T, E / heads)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln_2(x))


class GPTTiny(nn.Module):
    def __init__(self, vocab: int = 256, context: int = 64, dim: int = 64, heads: int = 4, layers: int = 2,
                 mlp_dim: int = 256):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, ids):
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos)))
