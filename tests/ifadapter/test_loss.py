"""The training objective on the frozen tiny base: only the adapter learns."""

from dataclasses import fields

import pytest
import torch
from diffusers import DDPMScheduler

from ifadapter import DiffusionBatch, IFAdapter, InstanceFeatures, diffusion_loss, tiny
from ifadapter.loss import condition_dropout, freeze_base
from tests.ifadapter.test_attention import TWO, features_for

INSTANCE_FIELDS = [f.name for f in fields(InstanceFeatures)]


def batch_for(components, adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = features_for(components, adapter, [TWO, TWO])
    return DiffusionBatch(
        latents=torch.randn(2, 4, 16, 16, generator=g),
        prompt_embeds=torch.randn(2, 77, 64, generator=g),
        pooled_prompt_embeds=torch.randn(2, 32, generator=g),
        time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        instances=features,
    )


def test_training_step_moves_only_adapter_weights(components):
    unet = components["unet"]
    adapter = IFAdapter.for_unet(unet, **tiny.adapter_config())
    adapter.install(unet)
    params = freeze_base(
        adapter, unet, components["text_encoder"], components["text_encoder_2"], components["vae"]
    )
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in unet.parameters())
    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    batch = batch_for(components, adapter)
    for step in range(3):
        optimizer.zero_grad()
        loss = diffusion_loss(
            adapter, unet, scheduler, batch, generator=torch.Generator().manual_seed(step)
        )
        loss.backward()
        assert all(p.grad is None for p in unet.parameters())
        optimizer.step()
    assert torch.isfinite(loss)
    for key, value in unet.state_dict().items():
        assert torch.equal(value, base_before[key]), key
    gates = [k for k in adapter_before if k.endswith(".gate")]
    assert all(not torch.equal(adapter.state_dict()[k], adapter_before[k]) for k in gates)
    # After the gates opened, the rest of the adapter receives gradient and moves as well.
    moved = [k for k, v in adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert any("to_k_ap" in k for k in moved) and any("resampler" in k for k in moved)


def test_condition_dropout_rates():
    keep_local, keep_global = condition_dropout(20000, 0.15, 0.30, torch.Generator().manual_seed(0))
    assert abs(1 - keep_local.mean().item() - 0.15) < 0.01
    assert abs(1 - keep_global.mean().item() - 0.30) < 0.01


def test_loss_is_deterministic_for_a_seeded_generator(components):
    unet = components["unet"]
    adapter = IFAdapter.for_unet(unet, **tiny.adapter_config())
    adapter.install(unet)
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    batch = batch_for(components, adapter)
    with torch.no_grad():
        first = diffusion_loss(
            adapter, unet, scheduler, batch, generator=torch.Generator().manual_seed(5)
        )
        second = diffusion_loss(
            adapter, unet, scheduler, batch, generator=torch.Generator().manual_seed(5)
        )
    assert torch.equal(first, second)


def test_per_sample_generators_make_the_loss_independent_of_the_split(components):
    """One generator per sample: the loss of a batch is the mean of the losses of its halves."""
    unet = components["unet"]
    adapter = IFAdapter.for_unet(unet, **tiny.adapter_config())
    adapter.install(unet)
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    whole = batch_for(components, adapter)
    halves = [
        DiffusionBatch(
            latents=whole.latents[i : i + 1],
            prompt_embeds=whole.prompt_embeds[i : i + 1],
            pooled_prompt_embeds=whole.pooled_prompt_embeds[i : i + 1],
            time_ids=whole.time_ids[i : i + 1],
            instances=InstanceFeatures(
                **{f: getattr(whole.instances, f)[i : i + 1] for f in INSTANCE_FIELDS}
            ),
        )
        for i in range(2)
    ]

    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    with torch.no_grad():
        together = diffusion_loss(adapter, unet, scheduler, whole, generator=generators([3, 4]))
        apart = [
            diffusion_loss(adapter, unet, scheduler, half, generator=generators([seed]))
            for half, seed in zip(halves, [3, 4], strict=True)
        ]
    torch.testing.assert_close(together, sum(apart) / 2)
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        diffusion_loss(adapter, unet, scheduler, whole, generator=generators([3]))
