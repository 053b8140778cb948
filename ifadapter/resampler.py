"""Perceiver resampler that compresses an instance description into appearance tokens.

An instance's EoT token keeps coarse semantics but loses the high-frequency detail of its
description; all 77 tokens per instance cost too much and padding carries nothing. So L learned
queries attend over the description's word tokens (SOT, EoT and padding masked out) and return L
tokens per text-encoder layer read. Keys and values are the word tokens concatenated with the
queries themselves (IP-Adapter's Perceiver attention), so a query always has something to
attend to even when a description has few words.

``variant="released"`` is the resampler of the authors' released weights (``spd_adapter.bin``):
its feed-forward is a GELU(tanh)-gated MLP with an unscaled RMSNorm before the down projection,
a LayerNorm precedes ``proj_out``, and its key mask loses one more word per layer after the
first, because the released code edits the mask in place (see ``released_key_masks``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Variant = Literal["ip_adapter", "released"]


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


class GatedFeedForward(nn.Module):
    """The released resampler's feed-forward (Gemma-style gated MLP)."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        inner = dim * mult
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.norm = nn.RMSNorm(inner, eps=1e-6, elementwise_affine=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        return self.down_proj(self.norm(gated))


def released_key_masks(key_mask: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The word mask each layer of the released resampler sees.

    The released code turns the tokenizer's attention mask into a word mask by clearing the SOT
    position and the position ``sum(mask) - 1`` (the EoT), in place, inside every attention
    layer. From the second layer on the mask it edits is already a word mask, so each further
    layer clears the word at ``sum(mask) - 1`` as well: with words 1..4, the layers see
    {1, 2, 3, 4}, {1, 2, 4}, {1, 4}, {4}.
    """
    masks = [key_mask]
    rows = torch.arange(key_mask.shape[0], device=key_mask.device)
    for _ in range(depth - 1):
        mask = masks[-1].clone()
        mask[rows, mask.sum(-1) - 1] = False  # a row with no word left clears index -1: no-op
        masks.append(mask)
    return masks


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
        variant: Variant = "ip_adapter",
    ) -> None:
        super().__init__()
        self.variant = variant
        self.latents = nn.Parameter(torch.randn(1, num_queries, width) / width**0.5)
        self.proj_in = nn.Linear(input_dim, width)
        feed_forward = GatedFeedForward if variant == "released" else FeedForward
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(width, dim_head, heads), feed_forward(width, ff_mult)]
            )
            for _ in range(depth)
        )
        self.norm_pre_out = nn.LayerNorm(width) if variant == "released" else None
        self.proj_out = nn.Linear(width, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """tokens (M, T, input_dim), key_mask (M, T) bool -> (M, num_queries, output_dim)."""
        x = self.proj_in(tokens)
        latents = self.latents.expand(x.shape[0], -1, -1)
        if self.variant == "released":
            masks = released_key_masks(key_mask, len(self.layers))
        else:
            masks = [key_mask] * len(self.layers)
        for (attention, feed_forward), mask in zip(self.layers, masks, strict=True):
            latents = attention(x, latents, mask) + latents
            latents = feed_forward(latents) + latents
        if self.norm_pre_out is not None:
            latents = self.norm_pre_out(latents)
        return self.norm_out(self.proj_out(latents))
