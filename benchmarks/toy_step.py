"""Cost of one training step of the toy adapter, by ISM variant, on the shipped toy base.

The demo's step (batch 16 of 64-px layouts from the toy world, forward through the frozen toy
UNet with the adapter, loss, backward into the adapter, AdamW) for:

- ``paper``: the paper's ISM on the decoder's cross-attention (``up_blocks.*attn2``);
- ``box position``: the same with ``box_position_freqs: 8`` (the demo's profile);
- ``every layer``: box position on every ``attn2`` (down, mid and up blocks);
- ``batch 32``: box position at batch 32 (the demo's batch before): what halving the batch
  saves per step, and what it costs in samples/s.

Side by side in one run, interleaved over rounds so that machine noise hits every variant
alike; reported: the median step time, its ratio to the ``paper`` step of the same round and
the samples per second it makes.
One torch thread by default, as the demo's training worker runs.

    python -m benchmarks.toy_step [--rounds 5] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from annotate.toy.world import scenes
from ifadapter import IFAdapter, Instance, Layout, LayoutTensors, encode_instances, tiny

BASE = Path(__file__).resolve().parent.parent / "models" / "toy-base"
DECODER = ["up_blocks.*attn2"]
VARIANTS = {  # name -> (adapter settings, batch size)
    "paper": ({"layer_patterns": DECODER}, 16),
    "box position": ({"layer_patterns": DECODER, "box_position_freqs": 8}, 16),
    "every layer": ({"layer_patterns": ["*attn2"], "box_position_freqs": 8}, 16),
    "batch 32": ({"layer_patterns": DECODER, "box_position_freqs": 8}, 32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pipe = StableDiffusionXLPipeline.from_pretrained(BASE, torch_dtype=torch.float32)
    unet = pipe.unet.requires_grad_(False)
    adapters = {
        name: IFAdapter.for_unet(unet, **tiny.adapter_config("toy"), **config)
        for name, (config, _) in VARIANTS.items()
    }
    layers = next(iter(adapters.values())).config.text_encoder_layers
    inputs = {
        batch: batch_inputs(pipe, batch, layers) for batch in {b for _, b in VARIANTS.values()}
    }

    def step_fn(adapter: IFAdapter, batch: int):
        optimiser = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
        sample, timesteps, context, added, features = inputs[batch]

        def step() -> None:
            with adapter.installed(unet):
                out = adapter(unet, sample, timesteps, context, added, features)
            torch.nn.functional.mse_loss(out, sample).backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

        return step

    steps = {name: step_fn(adapters[name].train(), batch) for name, (_, batch) in VARIANTS.items()}
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    ratios = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            tick = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - tick) / args.steps)
        for name in steps:
            ratios[name].append(times[name][-1] / times["paper"][-1])

    print(
        f"toy base, {args.threads} thread(s); medians of {args.rounds} interleaved rounds of "
        f"{args.steps} steps"
    )
    print(
        f"{'variant':<14}{'batch':>6}{'layers':>8}{'adapter params':>16}{'step s':>9}"
        f"{'ratio':>8}{'samples/s':>11}"
    )
    for name, adapter in adapters.items():
        batch = VARIANTS[name][1]
        params = sum(p.numel() for p in adapter.parameters())
        step_s = statistics.median(times[name])
        print(
            f"{name:<14}{batch:>6}{len(adapter.config.layers):>8}{params:>16,}{step_s:>9.3f}"
            f"{statistics.median(ratios[name]):>8.2f}{batch / step_s:>11.1f}"
        )


def batch_inputs(pipe: StableDiffusionXLPipeline, batch: int, text_encoder_layers: list[int]):
    """A training batch of the toy world's first ``batch`` layouts: noisy latents, timesteps,
    caption embeddings, micro-conditioning and instance features."""
    layouts = [
        Layout(s.caption, [Instance(i.box, i.caption) for i in s.instances])
        for s in scenes(1, batch)
    ]
    with torch.no_grad():
        features = encode_instances(
            [pipe.tokenizer, pipe.tokenizer_2],
            [pipe.text_encoder, pipe.text_encoder_2],
            LayoutTensors.from_layouts(layouts),
            text_encoder_layers,
        )
    context = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim)
    added = {
        "text_embeds": torch.randn(batch, pipe.text_encoder_2.config.projection_dim),
        "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * batch, dtype=torch.float32),
    }
    timesteps = torch.tensor([random.Random(i).randrange(1000) for i in range(batch)])
    return torch.randn(batch, 4, 16, 16), timesteps, context, added, features


if __name__ == "__main__":
    main()
