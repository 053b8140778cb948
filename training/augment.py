"""SDXL-style aspect-ratio buckets, random crop and flip, and what they do to boxes.

An image goes to the bucket nearest its aspect ratio, is resized to cover it and cropped to it,
then maybe flipped. Boxes follow the same geometry: they move with the crop, are clipped to it,
and an instance that keeps less than ``min_visible`` of its box area is dropped (its described
object is mostly outside the view). SDXL's micro-conditioning records the original size, the
crop's top-left corner in the resized image and the bucket size (``time_ids``).

All randomness of a view comes from ``view_rng(seed, image_id, view)``, so the same
configuration always produces the same views, whichever worker computes them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ifadapter import Instance, Layout
from training.config import AugmentConfig


def aspect_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(height, width) pairs with sides multiple of ``step``, area at most ``resolution**2`` and
    as close to it as the step allows, aspect ratio at most ``max_aspect`` either way."""
    area = resolution * resolution
    buckets = []
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            buckets.append((height, width))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of closest log aspect ratio; among equals, the largest."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - aspect), -b[0] * b[1]))


def view_rng(seed: int, image_id: str, view: int) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, view, digest])


@dataclass(frozen=True)
class ViewGeometry:
    """Where a view comes from: resize to ``resized``, crop ``bucket`` at (top, left), flip."""

    original: tuple[int, int]  # (height, width) of the source image
    resized: tuple[int, int]
    bucket: tuple[int, int]
    top: int
    left: int
    flip: bool

    @classmethod
    def plan(
        cls,
        width: int,
        height: int,
        buckets: Sequence[tuple[int, int]],
        augment: AugmentConfig,
        rng: np.random.Generator,
    ) -> ViewGeometry:
        bucket_h, bucket_w = nearest_bucket(width, height, buckets)
        scale = max(bucket_w / width, bucket_h / height)
        resized_w = max(bucket_w, round(width * scale))
        resized_h = max(bucket_h, round(height * scale))
        if augment.random_crop:
            top = int(rng.integers(0, resized_h - bucket_h + 1))
            left = int(rng.integers(0, resized_w - bucket_w + 1))
        else:
            top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
        flip = bool(rng.random() < augment.flip)
        return cls((height, width), (resized_h, resized_w), (bucket_h, bucket_w), top, left, flip)

    def time_ids(self) -> tuple[float, ...]:
        """SDXL's (original h, w, crop top, crop left, target h, w). After a flip the crop's left
        edge is measured in the flipped image, where the view actually came from."""
        left = self.resized[1] - self.left - self.bucket[1] if self.flip else self.left
        return (*map(float, self.original), float(self.top), float(left), *map(float, self.bucket))

    def apply(self, image: Image.Image) -> np.ndarray:
        """The view's pixels, (height, width, 3) uint8."""
        resized = image.resize((self.resized[1], self.resized[0]), Image.Resampling.LANCZOS)
        box = (self.left, self.top, self.left + self.bucket[1], self.top + self.bucket[0])
        view = resized.crop(box)
        if self.flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(view, dtype=np.uint8)

    def move_boxes(self, boxes: np.ndarray, min_visible: float) -> tuple[np.ndarray, np.ndarray]:
        """Normalised source boxes (n, 4) -> (indices kept, their normalised boxes in the view)."""
        resized_h, resized_w = self.resized
        bucket_h, bucket_w = self.bucket
        pixels = boxes.astype(np.float64) * [resized_w, resized_h, resized_w, resized_h]
        pixels -= [self.left, self.top, self.left, self.top]
        clipped = np.clip(pixels, 0.0, [bucket_w, bucket_h, bucket_w, bucket_h])
        full = (pixels[:, 2] - pixels[:, 0]) * (pixels[:, 3] - pixels[:, 1])
        visible = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(
            clipped[:, 3] - clipped[:, 1], 0, None
        )
        kept = np.flatnonzero((visible > 0) & (visible >= min_visible * full))
        moved = clipped[kept] / [bucket_w, bucket_h, bucket_w, bucket_h]
        if self.flip:
            moved = np.stack([1 - moved[:, 2], moved[:, 1], 1 - moved[:, 0], moved[:, 3]], -1)
        return kept, np.clip(moved, 0.0, 1.0).reshape(-1, 4)


def largest_instances(boxes: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the ``limit`` largest boxes, in their original order.

    When a view holds more instances than the cap, the largest visible boxes are the ones that
    shape the image; the smallest are the likeliest detector noise and cover at most a cell or
    two of the ISM's coarse grid. Ties keep the earlier instance.
    """
    if len(boxes) <= limit:
        return np.arange(len(boxes))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-areas, kind="stable")[:limit]
    return np.sort(order)


@dataclass
class View:
    """One augmented training view of an image, ready for the encoders."""

    pixels: np.ndarray  # (height, width, 3) uint8
    time_ids: tuple[float, ...]
    caption: str
    boxes: np.ndarray  # (n, 4) float32, normalised to the view
    captions: list[str]


def make_view(
    image: Image.Image,
    layout: Layout,
    buckets: Sequence[tuple[int, int]],
    augment: AugmentConfig,
    rng: np.random.Generator,
) -> View:
    geometry = ViewGeometry.plan(image.width, image.height, buckets, augment, rng)
    instances: list[Instance] = layout.instances
    source = np.array([i.box for i in instances], dtype=np.float64).reshape(-1, 4)
    kept, boxes = geometry.move_boxes(source, augment.min_visible)
    chosen = largest_instances(boxes, augment.max_instances)
    return View(
        pixels=geometry.apply(image),
        time_ids=geometry.time_ids(),
        caption=layout.caption,
        boxes=boxes[chosen].astype(np.float32),
        captions=[instances[i].caption for i in kept[chosen]],
    )
