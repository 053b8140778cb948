"""The toy world: small procedural images whose ground truth is known exactly.

Each image holds 1-4 instances; an instance is a shape of a colour with a texture, inside a
square box. Colour tests coarse semantics, texture tests high-frequency detail (what the EoT
token alone loses), and the shape tests both. Everything is deterministic by seed, so a world is
named by its seed and size alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {  # name -> RGB, hues 0/30/55/120/220/280 degrees: far apart after a small VAE
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (230, 210, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (150, 40, 200),
}
TEXTURES = ("solid", "striped", "dotted")
BACKGROUND = (240, 240, 235)
# Pixels at 64 px: half on, half off. A period of 8 px is two cells of the factor-4 latent, so a
# pattern is something the 16x16 latent can hold (at 6 px it fell between cells).
STRIPE_PERIOD = 8
DOT_PERIOD = 8


@dataclass(frozen=True)
class ToyInstance:
    shape: str
    colour: str
    texture: str
    box: tuple[float, float, float, float]  # normalised xyxy

    @property
    def size(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.texture} {self.shape}"


def parse_description(text: str) -> tuple[str, str, str]:
    """(shape, colour, texture) of an instance description as ``ToyInstance.caption`` writes it
    ("a red striped circle"); ``ValueError`` for anything else."""
    words = text.strip().lower().split()
    if len(words) == 4 and words[0] in ("a", "an"):
        _, colour, texture, shape = words
        if colour in COLOURS and texture in TEXTURES and shape in SHAPES:
            return shape, colour, texture
    raise ValueError(f"{text!r} is not a toy-world description (a COLOUR TEXTURE SHAPE)")


@dataclass(frozen=True)
class ToyScene:
    instances: tuple[ToyInstance, ...]

    @property
    def caption(self) -> str:
        """Names every instance, left to right, as a global caption would."""
        names = [i.caption for i in sorted(self.instances, key=lambda i: (i.box[0], i.box[1]))]
        if len(names) == 1:
            return names[0]
        return ", ".join(names[:-1]) + " and " + names[-1]


def sample_scene(
    rng: random.Random,
    min_instances: int = 1,
    max_instances: int = 4,
    min_size: float = 0.25,
    max_size: float = 0.55,
    max_overlap: float = 0.3,
) -> ToyScene:
    """Random instances of distinct colours (so a caption names each one unambiguously); two
    boxes overlap by at most ``max_overlap`` of the smaller one, so that every instance stays
    recognisable while overlaps still occur."""
    count = rng.randint(min_instances, max_instances)
    colours = rng.sample(list(COLOURS), count)
    placed: list[ToyInstance] = []
    attempts = 0
    while len(placed) < count and attempts < 200:
        attempts += 1
        size = rng.uniform(min_size, max_size)
        x0, y0 = rng.uniform(0, 1 - size), rng.uniform(0, 1 - size)
        box = (x0, y0, x0 + size, y0 + size)
        if any(_overlap(box, o.box) > max_overlap * min(size, o.size) ** 2 for o in placed):
            continue
        colour = colours[len(placed)]
        placed.append(ToyInstance(rng.choice(SHAPES), colour, rng.choice(TEXTURES), box))
    return ToyScene(tuple(placed))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean mask of ``shape`` filling a ``width`` x ``height`` box."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    w, h = width - 1, height - 1
    if shape == "circle":
        draw.ellipse((0, 0, w, h), fill=1)
    elif shape == "square":
        inset_x, inset_y = round(0.1 * w), round(0.1 * h)
        draw.rectangle((inset_x, inset_y, w - inset_x, h - inset_y), fill=1)
    elif shape == "triangle":
        draw.polygon([(w / 2, 0), (w, h), (0, h)], fill=1)
    elif shape == "diamond":
        draw.polygon([(w / 2, 0), (w, h / 2), (w / 2, h), (0, h / 2)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; the world has {SHAPES}")
    return np.asarray(canvas, dtype=bool)


def texture_mask(texture: str, width: int, height: int, offset: tuple[int, int]) -> np.ndarray:
    """Where a textured instance shows its colour (the rest shows a pale tint of it).

    ``offset`` is the box's pixel origin: the pattern is anchored to the image, not the box.
    """
    ys, xs = np.mgrid[0:height, 0:width]
    ys, xs = ys + offset[1], xs + offset[0]
    if texture == "solid":
        return np.ones((height, width), dtype=bool)
    if texture == "striped":
        return (ys % STRIPE_PERIOD) < STRIPE_PERIOD // 2
    if texture == "dotted":
        return ((ys % DOT_PERIOD) < DOT_PERIOD // 2) & ((xs % DOT_PERIOD) < DOT_PERIOD // 2)
    raise ValueError(f"unknown texture {texture!r}; the world has {TEXTURES}")


def pale(colour: tuple[int, int, int], amount: float = 0.75) -> tuple[int, int, int]:
    return tuple(round(c + (255 - c) * amount) for c in colour)


def box_pixels(
    box: tuple[float, ...], width: int, height: int | None = None
) -> tuple[int, int, int, int]:
    """Pixel bounds of a normalised box; never empty."""
    height = width if height is None else height
    x0, x1 = round(box[0] * width), round(box[2] * width)
    y0, y1 = round(box[1] * height), round(box[3] * height)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def render(scene: ToyScene, size: int = 64) -> Image.Image:
    """Instances drawn in order on a light background; later ones cover earlier ones."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for instance in scene.instances:
        x0, y0, x1, y1 = box_pixels(instance.box, size)
        shape = shape_mask(instance.shape, x1 - x0, y1 - y0)
        texture = texture_mask(instance.texture, x1 - x0, y1 - y0, (x0, y0))
        colour = np.array(COLOURS[instance.colour], dtype=np.uint8)
        tint = np.array(pale(COLOURS[instance.colour]), dtype=np.uint8)
        region = image[y0:y1, x0:x1]
        region[shape & texture] = colour
        region[shape & ~texture] = tint
    return Image.fromarray(image)


def scene(seed: int, index: int, **sampling: float) -> ToyScene:
    """Scene ``index`` of the world named by ``seed``, on its own (a source reads one at a time)."""
    return sample_scene(random.Random(f"{seed}-{index}"), **sampling)


def scenes(seed: int, count: int, **sampling: float) -> list[ToyScene]:
    """``count`` scenes of the world named by ``seed``; scene i is the same for any count."""
    return [scene(seed, index, **sampling) for index in range(count)]
