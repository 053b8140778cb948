"""The training objective: SDXL's denoising loss with the instance conditions.

``training/`` calls this per batch; it holds no data loading, no optimiser and no distribution
logic. Classifier-free guidance is learned by dropping conditions per sample: the local ones
(appearance and EoT tokens, box embedding kept, as at inference) with probability 0.15 and the
global caption (zero prompt embeddings, as SDXL's ``force_zeros_for_empty_prompt``) with 0.30.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from ifadapter.text import InstanceFeatures


@dataclass
class DiffusionBatch:
    latents: torch.Tensor  # (B, 4, h, w), already multiplied by the VAE's scaling factor
    prompt_embeds: torch.Tensor  # (B, 77, D)
    pooled_prompt_embeds: torch.Tensor  # (B, D_pooled)
    time_ids: torch.Tensor  # (B, 6): original size, crop top-left, target size
    instances: InstanceFeatures


def freeze_base(adapter: nn.Module, *base: nn.Module) -> list[nn.Parameter]:
    """Freezes the base model's modules (no grad, eval mode) and returns the adapter's parameters,
    the only ones an optimiser should see."""
    for module in base:
        module.requires_grad_(False).eval()
    adapter.requires_grad_(True).train()
    return list(adapter.parameters())


def condition_dropout(
    batch_size: int,
    drop_local: float,
    drop_global: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample keep flags (1.0 keep, 0.0 drop) for the local and the global conditions."""
    draws = torch.rand(
        2, batch_size, generator=generator, device=generator.device if generator else "cpu"
    )
    keep_local = (draws[0] >= drop_local).float().to(device)
    keep_global = (draws[1] >= drop_global).float().to(device)
    return keep_local, keep_global


TimestepSampling = Literal["uniform", "cubic"]


def _draws(
    shape: torch.Size,
    num_timesteps: int,
    drop_local: float,
    drop_global: float,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
    sampling: TimestepSampling = "uniform",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise, timesteps and keep flags of a batch, in this order from ``generator``.

    ``cubic`` draws t = (1 - u^3) T (T2I-Adapter, Mou et al. 2023): layout is decided in the
    noisy early steps of sampling, where the epsilon loss is small and a uniform draw spends
    most of a short run's updates elsewhere."""
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.randn(shape, generator=generator, device=gen_device).to(device, dtype)
    if sampling == "cubic":
        u = torch.rand(shape[0], generator=generator, device=gen_device)
        timesteps = ((1 - u**3) * num_timesteps).long().clamp(0, num_timesteps - 1).to(device)
    else:
        timesteps = torch.randint(
            0, num_timesteps, (shape[0],), generator=generator, device=gen_device
        ).to(device)
    keep_local, keep_global = condition_dropout(
        shape[0], drop_local, drop_global, generator, device
    )
    return noise, timesteps, keep_local, keep_global


def diffusion_loss(
    adapter: nn.Module,
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    batch: DiffusionBatch,
    drop_local: float = 0.15,
    drop_global: float = 0.30,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    timestep_sampling: TimestepSampling = "uniform",
) -> torch.Tensor:
    """Mean squared error of the adapted UNet's prediction (epsilon or v, as the scheduler says).

    ``adapter`` is an ``IFAdapter`` or a data-parallel wrapper of one: its forward runs the UNet.
    ``generator`` may be a list with one generator per sample (diffusers' convention): each
    sample's noise, timestep and dropout then come from its own generator only, so a batch split
    across data-parallel workers or accumulation steps draws exactly what the whole batch draws.
    """
    latents = batch.latents
    size, device = latents.shape[0], latents.device
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def draws(shape, g):
        return _draws(
            shape,
            num_timesteps,
            drop_local,
            drop_global,
            g,
            device,
            latents.dtype,
            timestep_sampling,
        )

    if isinstance(generator, Sequence):
        if len(generator) != size:
            raise ValueError(f"{len(generator)} generators for a batch of {size} samples")
        per_sample = [draws((1, *latents.shape[1:]), g) for g in generator]
        noise, timesteps, keep_local, keep_global = (
            torch.cat(p) for p in zip(*per_sample, strict=True)
        )
    else:
        noise, timesteps, keep_local, keep_global = draws(latents.shape, generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    keep = keep_global.to(batch.prompt_embeds.dtype)
    prompt_embeds = batch.prompt_embeds * keep[:, None, None]
    pooled = batch.pooled_prompt_embeds * keep[:, None]
    prediction = adapter(
        unet,
        noisy,
        timesteps,
        prompt_embeds,
        {"text_embeds": pooled, "time_ids": batch.time_ids},
        batch.instances,
        keep_local,
    )
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())
