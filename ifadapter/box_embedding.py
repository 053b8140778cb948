"""GLIGEN-style Fourier embedding of an instance box, added to each of its tokens.

The box embedding is the one local condition kept in the unconditional branch of classifier-free
guidance, so guidance pushes towards the appearance while both branches agree on where.
"""

from __future__ import annotations

import torch
from torch import nn


class FourierEmbedder(nn.Module):
    def __init__(self, num_freqs: int, temperature: float) -> None:
        super().__init__()
        bands = temperature ** (torch.arange(num_freqs, dtype=torch.float32) / num_freqs)
        self.register_buffer("bands", bands, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., 4) -> (..., 4 * 2 * num_freqs): sin and cos of each coordinate per band."""
        angles = x.unsqueeze(-2) * self.bands.to(x.dtype)[:, None]  # (..., F, 4)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class BoxEmbedding(nn.Module):
    def __init__(
        self, output_dim: int, num_freqs: int, temperature: float, hidden_dim: int
    ) -> None:
        super().__init__()
        self.fourier = FourierEmbedder(num_freqs, temperature)
        self.mlp = nn.Sequential(
            nn.Linear(4 * 2 * num_freqs, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes (..., 4) normalised xyxy -> (..., output_dim)."""
        return self.mlp(self.fourier(boxes))
