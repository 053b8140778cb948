"""Layout boxes drawn over an image, for inspecting what the adapter was asked to do.

Boxes are drawn in black and white with a numbered tag, never in a hue: the images being
inspected are judged on their colours, and a red outline around a red instance reads as part
of it. Small images (the toy world's 64 px) are enlarged first so that the tags are legible.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from ifadapter.layout import Layout

MIN_SIDE = 384  # images below this are enlarged (nearest neighbour) before drawing


def enlarged(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    """``image`` scaled by the smallest whole factor that brings its shorter side to
    ``min_side`` (pixels stay sharp squares), or itself when it is large enough."""
    scale = max(1, -(-min_side // min(image.size)))
    if scale == 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def draw_layout(
    image: Image.Image, layout: Layout, labels: bool = True, min_side: int = MIN_SIDE
) -> Image.Image:
    """A copy of ``image``, enlarged to ``min_side``, with every instance box outlined and
    tagged with its number (and its description when ``labels``)."""
    canvas = enlarged(image.convert("RGB"), min_side).copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = max(1, round(min(width, height) / 192))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 28)))
    for index, instance in enumerate(layout.instances):
        x0, y0, x1, y1 = instance.box
        rect = (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1)
        draw.rectangle(rect, outline="black", width=line + 2)
        draw.rectangle(rect, outline="white", width=line)
        tag = f"{index + 1}: {instance.caption}" if labels else str(index + 1)
        _label(draw, font, tag, (rect[0] + line + 1, rect[1] + line + 1), width)
    return canvas


def _label(draw: ImageDraw.ImageDraw, font, text: str, at: tuple[float, float], width: int):
    """White text on a black plate at ``at``, shortened with an ellipsis to fit the image."""
    right = width - 2
    while text and draw.textbbox(at, text, font=font)[2] > right and len(text) > 2:
        text = text[:-2] + "…" if not text.endswith("…") else text[:-3] + "…"
    x0, y0, x1, y1 = draw.textbbox(at, text, font=font)
    shift = max(0.0, x1 - right)
    draw.rectangle((x0 - 2 - shift, y0 - 1, x1 + 2 - shift, y1 + 1), fill="black")
    draw.text((at[0] - shift, at[1]), text, fill="white", font=font)
