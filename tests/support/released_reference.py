"""What the released-weights comparison shares with the script that ran the authors' code.

The fixture ``tests/fixtures/released_ifadapter.*`` was made by running the released inference
code (github WUyinwei-hah/IFAdapter, ``if_adapter/`` and ``infer.py`` at f88c95d) outside this
project on the tiny SDXL-architecture pipeline of ``ifadapter.tiny`` with the weights that
``random_weights`` makes from the key layout and seed stored in the fixture. The fixture holds
that layout and the reference's outputs, not the weights, so it stays a few dozen KB.
"""

from __future__ import annotations

import math

import torch

from ifadapter import Instance, Layout

LAYOUTS = [
    Layout(
        "a living room",
        [
            Instance((0.0, 0.0, 0.6, 0.7), "a green velvet armchair with brass legs"),
            Instance((0.4, 0.3, 1.0, 1.0), "lamp"),
            Instance((0.1, 0.5, 0.5, 0.9), "a sleeping red cat"),
        ],
    ),
    Layout("a beach", [Instance((0.2, 0.1, 0.8, 0.6), "a striped umbrella")]),
]
STEPS, CONTROL_RATIO, GUIDANCE = 4, 0.5, 7.5
UNET_TIMESTEP = 500


def random_weights(shapes: dict[str, dict[str, list[int]]], seed: int) -> dict:
    """Released-layout state dicts filled from ``seed``: N(0, 1/fan_in) for matrices and
    convolutions, N(0, 1) for vectors and scalars (biases, norm weights, the gates)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for group in sorted(shapes):
        state[group] = {}
        for key in sorted(shapes[group]):
            shape = shapes[group][key]
            std = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 1.0
            state[group][key] = torch.randn(shape, generator=generator) * std
    return state


def unet_inputs(seed: int, batch: int, hidden: int, pooled: int) -> dict:
    """Inputs of the single UNet call compared against the reference."""
    generator = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=generator),
        timestep=torch.tensor(UNET_TIMESTEP),
        encoder_hidden_states=torch.randn(batch, 77, hidden, generator=generator),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator),
        },
    )


def initial_latents(seed: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
