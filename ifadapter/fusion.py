"""Gated semantic fusion of per-instance semantic maps (paper Eq. 6-7).

Where boxes overlap, which instance should own a cell depends on what each instance's map looks
like there, so a small network scores every map (CBAM channel and spatial attention, then a 1x1
convolution to one channel), and a softmax over the instances that cover the cell turns the
scores into weights. Instances that do not cover a cell, and padding slots, get weight 0; cells
no box covers get no contribution at all. Each map is also scaled by
``sigmoid(|union of boxes| / |box_i|)`` so that a small box inside a large one is not drowned.
"""

from __future__ import annotations

import torch
from torch import nn


class FusionScorer(nn.Module):
    """f in Eq. 6: per-cell score of one instance's semantic map."""

    def __init__(self, channels: int, reduction: int, kernel_size: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        self.to_score = nn.Conv2d(channels, 1, 1)

    def forward(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """maps (M, C, h, w), masks (M, 1, h, w) bool -> scores (M, h, w).

        The channel statistics pool over the box only: outside it the map is zero by
        construction and would dilute the average by the box's size.
        """
        inside = masks.to(maps.dtype)
        average = (maps * inside).sum((2, 3)) / inside.sum((2, 3)).clamp(min=1)
        peak = maps.masked_fill(~masks, torch.finfo(maps.dtype).min).amax((2, 3))
        peak = torch.where(masks.flatten(1).any(1, keepdim=True), peak, torch.zeros_like(peak))
        channel = torch.sigmoid(self.channel_mlp(average) + self.channel_mlp(peak))
        maps = maps * channel[:, :, None, None]
        pooled = torch.cat([maps.mean(1, keepdim=True), maps.amax(1, keepdim=True)], dim=1)
        maps = maps * torch.sigmoid(self.spatial_conv(pooled))
        return self.to_score(maps).squeeze(1)


def fusion_weights(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """scores (B, N, HW), masks (B, N, HW) bool -> w (B, N, HW).

    Softmax over the instances covering each cell; exactly 0 for the others and in cells that
    no instance covers (no NaN from an all-masked softmax).
    """
    masked = scores.masked_fill(~masks, torch.finfo(scores.dtype).min)
    weights = torch.softmax(masked, dim=1)
    return torch.where(masks, weights, torch.zeros_like(weights))


def fuse_instances(
    maps: torch.Tensor,
    masks: torch.Tensor,
    area_weight: torch.Tensor,
    scorer: FusionScorer,
    height: int,
    width: int,
) -> torch.Tensor:
    """maps (B, N, HW, C) -> D (B, HW, C); ``masks`` (B, N, HW) restricts each map to its box."""
    batch, instances, cells, channels = maps.shape
    maps = maps * masks.unsqueeze(-1).to(maps.dtype)
    spatial = maps.transpose(2, 3).reshape(batch * instances, channels, height, width)
    scores = scorer(spatial, masks.reshape(batch * instances, 1, height, width))
    weights = fusion_weights(scores.view(batch, instances, cells), masks)
    weights = weights * area_weight.unsqueeze(-1).to(weights.dtype)
    return torch.einsum("bnl,bnlc->blc", weights, maps)
