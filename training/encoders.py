"""The frozen parts of SDXL that the cache stage runs once per view: the VAE's encoder and the two
text encoders. Training then runs only the UNet and the adapter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline

from ifadapter.text import encode_descriptions


class FrozenEncoders:
    """Loads the base pipeline without its UNet; every output is what inference computes.

    Always in float32, whatever dtype the base was saved in: the cache is computed once, SDXL's
    VAE overflows in float16, and float16 on a CPU is both slow and emulated."""

    def __init__(self, base: str, text_encoder_layers: Sequence[int], device: str) -> None:
        pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=None, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False).eval()
        self.pipe = pipe.to(device)
        self.device = torch.device(device)
        self.layers = tuple(text_encoder_layers)

    @torch.no_grad()
    def latents(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, C, H/f, W/f): the VAE posterior's mean times the scaling
        factor. The mean, not a sample: the cache is computed once, and a sample would freeze one
        draw of the posterior's noise into every epoch."""
        images = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior = self.pipe.vae.encode(images).latent_dist
        return posterior.mean * self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def prompts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock pipeline's prompt embeddings (penultimate layers of both encoders) and pooled
        embeddings (text_encoder_2), (B, 77, D) and (B, D_pooled)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(captions), device=self.device, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def descriptions(
        self, captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Instance descriptions as the adapter reads them: words (M, k, T, D), word_mask (M, T),
        eot (M, D)."""
        pipe = self.pipe
        return encode_descriptions(
            [pipe.tokenizer, pipe.tokenizer_2],
            [pipe.text_encoder, pipe.text_encoder_2],
            captions,
            self.layers,
        )
