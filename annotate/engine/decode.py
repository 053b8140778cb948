"""Reading and decoding one input, or saying precisely why it cannot be used.

``decode_image`` never lets a bad file take the job down: every way an input can fail is a
``Rejected`` with a reason code (``empty``, ``not_an_image``, ``too_many_pixels``,
``truncated``, ``too_small``, ...) and a detail, which the engine writes to the quarantine
table. What passes is an RGB image with EXIF orientation applied, whatever the file's mode
(CMYK, 16-bit grey, palette with transparency...), scaled down to the working size the models
need, so that no later stage touches the original again.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from annotate.config import DecodeConfig
from annotate.engine.records import Record
from annotate.sources import Source, TooLarge


class Rejected(Exception):
    """An input the engine cannot use; ``reason`` is ``"<code>: <detail>"``."""

    def __init__(self, stage: str, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.stage, self.reason = stage, f"{code}: {detail}"


@dataclass
class Decoded:
    width: int  # after EXIF orientation
    height: int
    working: Image.Image  # RGB, longest side at most the working side


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency over white, high bit depths scaled down
    (Pillow's own ``convert`` clips 16-bit grey to white), CMYK and palettes converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low or 1.0) * 255.0
        else:
            array = array / (65535.0 if array.max() > 255 else 255.0) * 255.0
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, limits: DecodeConfig) -> Decoded:
    """Decodes ``data`` within ``limits``; raises ``Rejected`` with the reason otherwise."""
    if not data:
        raise Rejected("decode", "empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise Rejected("decode", "too_many_pixels", str(error)) from None
    except UnidentifiedImageError:
        raise Rejected("decode", "not_an_image", "no image format recognises the bytes") from None
    except Exception as error:  # Pillow plugins raise a zoo of types on broken headers
        raise Rejected("decode", "not_an_image", f"{type(error).__name__}: {error}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise Rejected(
            "decode",
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels > {limits.max_pixels}",
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
    except Exception as error:
        raise Rejected("decode", "truncated", f"{type(error).__name__}: {error}") from None
    if min(rgb.size) < limits.min_side:
        raise Rejected(
            "decode", "too_small", f"{rgb.width}x{rgb.height}, shorter side < {limits.min_side}"
        )
    working = rgb.copy()
    working.thumbnail((limits.working_side, limits.working_side), Image.Resampling.BICUBIC)
    return Decoded(width=rgb.width, height=rgb.height, working=working)


def decode_record(record: Record, source: Source, limits: DecodeConfig, embed: bool) -> None:
    """Reads, hashes and decodes one record in place; a failure rejects it with its reason."""
    try:
        data = source.read(record.uri, limits.max_bytes)
    except TooLarge as error:
        record.reject("read", f"too_many_bytes: {error}")
        return
    except Exception as error:
        record.reject("read", f"unreadable: {type(error).__name__}: {error}")
        return
    record.sha256 = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode_image(data, limits)
    except Rejected as rejected:
        record.reject(rejected.stage, rejected.reason)
        return
    record.width, record.height = decoded.width, decoded.height
    record.pixels = decoded.working.tobytes()
    record.pixels_size = decoded.working.size
    record.image = data if embed else None
