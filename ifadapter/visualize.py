"""Layout boxes drawn over an image, for inspecting what the adapter was asked to do."""

from __future__ import annotations

from PIL import Image, ImageDraw

from ifadapter.layout import Layout

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def draw_layout(image: Image.Image, layout: Layout, labels: bool = True) -> Image.Image:
    """A copy of ``image`` with every instance box outlined (and captioned when ``labels``)."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = max(1, round(min(width, height) / 128))
    for index, instance in enumerate(layout.instances):
        x0, y0, x1, y1 = instance.box
        colour = PALETTE[index % len(PALETTE)]
        rect = (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1)
        draw.rectangle(rect, outline=colour, width=line)
        if labels:
            draw.text((rect[0] + line + 1, rect[1] + line), instance.caption, fill=colour)
    return canvas
