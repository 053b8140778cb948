"""Exact verifiers of the toy world, standing in for the benchmark's VLM judges and detector.

In the IFG benchmark a VLM judges whether an instance looks as described and Grounding-DINO says
where things are. In the toy world both questions have exact answers computed from pixels:

- colour: the hue of the coloured pixels in the box (texture tints keep their colour's hue);
- shape: the best template IoU of the expected colour's pixels inside the box;
- texture: the share of fully saturated pixels among that colour's pixels (solid ~1, striped
  ~1/2, dotted ~1/4);
- location: connected components of each colour are the detections.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from annotate.toy.world import COLOURS, SHAPES, TEXTURES, ToyInstance, box_pixels, shape_mask

COLOURED = 0.12  # saturation above which a pixel belongs to some instance (tints included)
STRONG = 0.45  # saturation of an instance's full colour
TEXTURE_SHARE = {"solid": 1.0, "striped": 0.5, "dotted": 0.25}
HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class AttributeCheck:
    """What the pixels in an instance's box show against its description: whether the colour,
    shape and texture hold, and the shape and texture seen there."""

    colour: bool
    shape: bool
    texture: bool
    predicted_shape: str | None
    predicted_texture: str | None

    @property
    def success(self) -> bool:
        return self.colour and self.shape and self.texture


@dataclass(frozen=True)
class ColourRegion:
    """A connected region of one colour: its normalised xyxy box, the colour, and how much of
    the box the region fills (the score a detector would give)."""

    box: tuple[float, float, float, float]
    colour: str
    score: float


def _hsv(image: Image.Image | np.ndarray) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    rgb = rgb.astype(np.float32) / 255
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = (
        np.select(
            [high == r, high == g],
            [((g - b) / safe) % 6, (b - r) / safe + 2],
            (r - g) / safe + 4,
        )
        / 6
    )
    return np.stack([hue, saturation, high], -1)


def colour_labels(image: Image.Image | np.ndarray) -> np.ndarray:
    """Per pixel: index into ``COLOURS`` of the nearest hue, or -1 for background."""
    hsv = _hsv(image)
    names = list(HUES)
    hues = np.array([HUES[n] for n in names])
    distance = np.abs(hsv[..., :1] - hues)
    distance = np.minimum(distance, 1 - distance)
    labels = distance.argmin(-1)
    return np.where(hsv[..., 1] > COLOURED, labels, -1)


def _tight(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, fitted to the mask's own extent, overlaps it best. Fitting to
    the extent (not to the box) makes the answer the same for a layout box and for a tight
    detection crop: the judge sees the latter."""
    region = _tight(mask)
    height, width = region.shape
    ious = {}
    for shape in SHAPES:
        template = shape_mask(shape, width, height)
        if not template.any():  # a region a pixel or two across has no shape
            continue
        template = _tight(template)
        if template.shape != region.shape:
            image = Image.fromarray(template).resize((width, height), Image.NEAREST)
            template = np.asarray(image, dtype=bool)
        ious[shape] = (template & region).sum() / max((template | region).sum(), 1)
    return max(ious, key=ious.get, default=SHAPES[0])


def verify(image: Image.Image | np.ndarray, instance: ToyInstance) -> AttributeCheck:
    """Does the box of ``instance`` show its colour, shape and texture?"""
    hsv = _hsv(image)
    x0, y0, x1, y1 = box_pixels(instance.box, hsv.shape[1], hsv.shape[0])
    labels = colour_labels(image)[y0:y1, x0:x1]
    wanted = list(COLOURS).index(instance.colour)
    mine = labels == wanted
    coloured = labels >= 0
    colour_ok = bool(  # a Python bool: verdicts are written as JSON
        coloured.any() and mine.sum() >= 0.4 * coloured.sum() and mine.mean() > 0.05
    )
    if not mine.any():
        return AttributeCheck(colour_ok, False, False, None, None)
    predicted_shape = classify_shape(mine)
    strong = (hsv[y0:y1, x0:x1, 1] > STRONG) & mine
    share = strong.sum() / mine.sum()
    predicted_texture = min(TEXTURES, key=lambda t: abs(TEXTURE_SHARE[t] - share))
    return AttributeCheck(
        colour_ok,
        predicted_shape == instance.shape,
        predicted_texture == instance.texture,
        predicted_shape,
        predicted_texture,
    )


def detect(image: Image.Image | np.ndarray, min_pixels: int = 12) -> list[ColourRegion]:
    """Connected regions of one colour, as boxes; score = how much of its box the region fills."""
    labels = colour_labels(image)
    size_y, size_x = labels.shape
    detections = []
    for index, colour in enumerate(COLOURS):
        # Close small gaps so that a striped or dotted instance is one region, not many.
        region = ndimage.binary_closing(labels == index, structure=np.ones((3, 3)), iterations=2)
        components, _ = ndimage.label(region)
        for found in ndimage.find_objects(components):
            rows, cols = found
            pixels = (labels[found] == index).sum()
            if pixels < min_pixels:
                continue
            area = (rows.stop - rows.start) * (cols.stop - cols.start)
            box = (cols.start / size_x, rows.start / size_y, cols.stop / size_x, rows.stop / size_y)
            detections.append(ColourRegion(box, colour, float(pixels / area)))
    return detections


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_iou(detections: list[ColourRegion], instance: ToyInstance) -> float:
    """IoU of the best detection of the instance's colour with its box (the IFS match rule)."""
    return max(
        (iou(d.box, instance.box) for d in detections if d.colour == instance.colour), default=0.0
    )
