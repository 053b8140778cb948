"""Perceiver resampler that compresses an instance description into appearance tokens.

An instance's EoT token keeps coarse semantics but loses the high-frequency detail of its
description; all 77 tokens per instance cost too much and padding carries nothing. So L learned
queries attend over the description's word tokens (SOT, EoT and padding masked out) and return L
tokens per text-encoder layer read. Keys and values are the word tokens concatenated with the
queries themselves (IP-Adapter's Perceiver attention), so a query always has something to
attend to even when a description has few words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # RMSNorm on queries and keys keeps the logits bounded at width 2560 (released design).
        self.norm_q = nn.RMSNorm(dim_head, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim_head, eps=1e-6)

    def forward(
        self, tokens: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """tokens (M, T, dim), latents (M, L, dim), key_mask (M, T) True where a word is."""
        tokens = self.norm_tokens(tokens)
        latents = self.norm_latents(latents)
        m, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([tokens, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (x.view(m, -1, self.heads, self.dim_head).transpose(1, 2) for x in (q, k, v))
        q, k = self.norm_q(q), self.norm_k(k)
        mask = torch.cat([key_mask, key_mask.new_ones(m, length)], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(m, length, -1))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )


class Resampler(nn.Module):
    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        width: int,
        depth: int,
        heads: int,
        dim_head: int,
        num_queries: int,
        ff_mult: int,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, width) / width**0.5)
        self.proj_in = nn.Linear(input_dim, width)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, dim_head, heads), FeedForward(width, ff_mult)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(width, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """tokens (M, T, input_dim), key_mask (M, T) bool -> (M, num_queries, output_dim)."""
        x = self.proj_in(tokens)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents, key_mask) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))
