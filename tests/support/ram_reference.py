"""What the RAM / RAM++ comparison shares with the script that ran the reference code.

The fixtures ``tests/fixtures/ram_plus.*`` and ``tests/fixtures/ram.*`` were made by running
xinyu1205/recognize-anything (``ram/models/ram_plus.py``, ``ram.py``, ``bert.py``,
``swin_transformer.py`` at 7cb804a) outside this project, in an environment with
transformers 4.40, on tiny sizes: its own configuration files shrunk (Swin-L 224 entry: embed 8,
depths 2-2-2-2, heads 1-1-2-2, window 7; tagging head: hidden 32, 4 heads, 2 layers) and its
tag list and per-class thresholds cut to their first ``NUM_TAGS`` lines. The model code ran
unchanged. Its checkpoint held the weights ``random_checkpoint`` makes from the layout stored in
the fixture, in the official file's layout (``{"model": state_dict}``, buffers included); the
fixture holds that layout and the reference's logits and English tags, not the weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 224
NUM_TAGS = 48


def random_checkpoint(layout: dict, seed: int) -> dict:
    """``{"model": state_dict}`` with the layout's keys: parameters N(0, 1/fan_in) for matrices,
    N(1, 0.5) for norm scales (1-D weights), N(0, 0.5) for biases and N(0, 1) for the tag
    embeddings (so that tags differ clearly at random weights); buffers zero (every loader drops
    them); tied keys share values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(layout["keys"]):
        shape, dtype, kind = layout["keys"][key]
        if key in layout["ties"]:
            continue
        if kind == "buffer":
            state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
            continue
        std = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 0.5
        if key == "label_embed":
            std = 1.0
        mean = 1.0 if len(shape) == 1 and key.endswith(".weight") else 0.0
        state[key] = torch.randn(shape, generator=generator) * std + mean
    for alias, canonical in layout["ties"].items():
        state[alias] = state[canonical]
    return {"model": state}


def sample_images() -> list[Image.Image]:
    """Two smooth random RGB images of different sizes (resizing is part of what is compared)."""
    rng = np.random.default_rng(0)
    images = []
    for width, height in ((96, 80), (150, 200)):
        coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    return images
