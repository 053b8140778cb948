"""Gated semantic fusion of per-instance semantic maps (paper Eq. 6-7).

Where boxes overlap, which instance should own a cell depends on what each instance's map looks
like there, so a small network scores every map (CBAM channel and spatial attention, then a 1x1
convolution to one channel), and a softmax over the instances that cover the cell turns the
scores into weights. Instances that do not cover a cell, and padding slots, get weight 0; cells
no box covers get no contribution at all. Each map is also scaled by
``sigmoid(|union of boxes| / |box_i|)`` so that a small box inside a large one is not drowned.

``fuse_instances_released`` is the fusion of the authors' released code, kept for their weights:
the scorer pools over the whole map, the area term scales the scores before the softmax, and the
softmax runs over a fixed number of slots, padding included, everywhere (an instance that does
not cover a cell, and every empty slot, still takes a share of its weight).
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

    def forward(self, maps: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """maps (M, C, h, w), masks (M, 1, h, w) bool -> scores (M, h, w).

        The channel statistics pool over the box only: outside it the map is zero by
        construction and would dilute the average by the box's size. ``masks=None`` pools over
        the whole map, as the released code does.
        """
        if masks is None:
            average, peak = maps.mean((2, 3)), maps.amax((2, 3))
        else:
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


def fuse_instances_released(
    maps: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor,
    area_weight: torch.Tensor,
    scorer: FusionScorer,
    height: int,
    width: int,
    slots: int,
) -> torch.Tensor:
    """The released fusion over ``slots`` instance slots: maps (B, N, HW, C) -> D (B, HW, C).

    ``valid`` (B, N) is False on padding and every layout has at most ``slots`` instances.
    ``area_weight`` is ``sigmoid(|union| / |box_i|)``. An empty slot's map is zero, so its score
    is the scorer's output on zero, the bias of ``to_score``, times the area term of an empty
    slot, ``sigmoid(0)``; the ``slots - count`` empty slots of a layout enter the softmax as one
    column holding that score plus ``log(slots - count)``, whatever N the batch is padded to.
    """
    batch, instances, cells, channels = maps.shape
    maps = maps * masks.unsqueeze(-1).to(maps.dtype)
    spatial = maps.transpose(2, 3).reshape(batch * instances, channels, height, width)
    scores = scorer(spatial, None).view(batch, instances, cells) * area_weight.unsqueeze(-1)
    scores = scores.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    empty = (scorer.to_score.bias * 0.5).to(scores.dtype)
    empties = (slots - valid.sum(1, keepdim=True)).to(scores.dtype).log() + empty  # (B, 1)
    scores = torch.cat([scores, empties.unsqueeze(-1).expand(-1, -1, cells)], dim=1)
    weights = torch.softmax(scores, dim=1)[:, :instances]
    return torch.einsum("bnl,bnlc->blc", weights, maps)
