"""GLIGEN-style Fourier embedding of an instance box, added to each of its tokens.

The box embedding is the one local condition kept in the unconditional branch of classifier-free
guidance, so guidance pushes towards the appearance while both branches agree on where.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierEmbedder(nn.Module):
    """Sin and cos of coordinates at fixed angular frequencies (``bands``), not trained."""

    def __init__(self, bands: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bands", bands.float(), persistent=False)

    @classmethod
    def geometric(cls, num_freqs: int, temperature: float) -> FourierEmbedder:
        """GLIGEN's bands ``temperature^(k / num_freqs)``: the released weights expect them."""
        return cls(temperature ** (torch.arange(num_freqs, dtype=torch.float32) / num_freqs))

    @classmethod
    def octaves(cls, num_freqs: int) -> FourierEmbedder:
        """Bands ``pi * 2^k``: for coordinates in [0, 1], the first is half a period over it."""
        return cls(math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D * 2 * num_freqs): per band, sin then cos of every coordinate."""
        angles = x.unsqueeze(-2) * self.bands.to(x.dtype)[:, None]  # (..., F, D)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class BoxEmbedding(nn.Module):
    def __init__(
        self, output_dim: int, num_freqs: int, temperature: float, hidden_dim: int
    ) -> None:
        super().__init__()
        self.fourier = FourierEmbedder.geometric(num_freqs, temperature)
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
