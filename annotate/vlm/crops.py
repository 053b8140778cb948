"""Instance crops with context: what a VLM sees when it describes (or judges) one instance."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image


def crop_box(image: Image.Image, box: Sequence[float], padding: float) -> Image.Image:
    """The normalised xyxy ``box`` grown by ``padding`` times its width and height on each side,
    clipped to the image: a margin of context helps the model tell what the object is and how
    it sits, while the object stays at the centre of the crop."""
    x0, y0, x1, y1 = box
    grow_x, grow_y = (x1 - x0) * padding, (y1 - y0) * padding
    width, height = image.size

    def pixel(value: float, side: int) -> float:  # rounded: 0.15 * 200 must not become 31
        return round(value * side, 6)

    left = max(0, math.floor(pixel(x0 - grow_x, width)))
    top = max(0, math.floor(pixel(y0 - grow_y, height)))
    right = min(width, max(left + 1, math.ceil(pixel(x1 + grow_x, width))))
    bottom = min(height, max(top + 1, math.ceil(pixel(y1 + grow_y, height))))
    return image.crop((left, top, right, bottom))
