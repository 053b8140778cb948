"""GLIGEN-style Fourier embedding of an instance box, added to each of its tokens.

The box embedding is the one local condition kept in the unconditional branch of classifier-free
guidance, so guidance pushes towards the appearance while both branches agree on where.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class FourierEmbedder(nn.Module):
    """Sin and cos of coordinates at fixed angular frequencies (``bands``), not trained.

    The bands are plain numbers, not a buffer, and the angles are computed in float32: casting
    an adapter to float16 would round the high bands (pi * 2^15 does not even fit in float16)
    and turn a position's rounding into whole radians.
    """

    def __init__(self, bands: Sequence[float]) -> None:
        super().__init__()
        self.bands = tuple(float(band) for band in bands)

    @classmethod
    def geometric(cls, num_freqs: int, temperature: float) -> FourierEmbedder:
        """GLIGEN's bands ``temperature^(k / num_freqs)``: the released weights expect them."""
        return cls(temperature ** (k / num_freqs) for k in range(num_freqs))

    @classmethod
    def octaves(cls, num_freqs: int) -> FourierEmbedder:
        """Bands ``pi * 2^k``: for coordinates in [0, 1], the first is half a period over it."""
        return cls(math.pi * 2.0**k for k in range(num_freqs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D * 2 * num_freqs) in x's dtype: per band, sin then cos of every
        coordinate."""
        bands = torch.tensor(self.bands, dtype=torch.float32, device=x.device)
        angles = x.float().unsqueeze(-2) * bands[:, None]  # (..., F, D)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2).to(x.dtype)


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
