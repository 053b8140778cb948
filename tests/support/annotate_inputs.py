"""Inputs for the data engine's tests: generated images, and bad files of every kind."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tests.support.paths import REPO

TINY_PROFILE = REPO / "configs" / "tiny.yaml"
COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (240, 200, 20), (150, 40, 170)]


def scene(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A light background with one to three coloured shapes."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (235, 235, 230))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x0, y0 = rng.randint(0, size[0] // 2), rng.randint(0, size[1] // 2)
        x1 = x0 + rng.randint(size[0] // 5, size[0] // 2)
        y1 = y0 + rng.randint(size[1] // 5, size[1] // 2)
        shape = rng.choice([draw.ellipse, draw.rectangle])
        shape((x0, y0, x1, y1), fill=rng.choice(COLOURS))
    return image


def write_scenes(directory: Path, count: int, start: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        size = (64 + 8 * (index % 3), 64 - 8 * (index % 2))
        path = directory / f"scene-{index:03d}.png"
        scene(index, size).save(path)
        paths.append(path)
    return paths


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A small, valid PNG whose header claims ``width`` x ``height`` pixels: opening it is
    cheap, decoding it would not be (a decompression bomb's shape)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    scene(7).convert("CMYK").save(buffer, format="JPEG")
    return buffer.getvalue()


def grey16_png() -> bytes:
    """16-bit greyscale: a ramp over the full 0..65535 range."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    return png_bytes(Image.fromarray(ramp))


def exif_rotated_jpeg() -> bytes:
    """Stored 96 wide x 48 high with EXIF orientation 6: displayed 48 wide x 96 high."""
    image = Image.new("RGB", (96, 48), (200, 40, 40))
    ImageDraw.Draw(image).rectangle((0, 0, 30, 47), fill=(40, 40, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def bad_inputs() -> dict[str, tuple[bytes, str | None]]:
    """File name -> (bytes, the quarantine reason code, or None when it must become a row)."""
    truncated = png_bytes(scene(3))
    return {
        "truncated.png": (truncated[: len(truncated) // 2], "truncated"),
        "not-an-image.jpg": (b"this is a text file, not a picture\n" * 4, "not_an_image"),
        "zero-bytes.png": (b"", "empty"),
        "huge.png": (huge_png(100_000, 100_000), "too_many_pixels"),
        "tiny.png": (png_bytes(scene(4, (8, 8))), "too_small"),
        "cmyk.jpg": (cmyk_jpeg(), None),
        "grey16.png": (grey16_png(), None),
        "exif-rotated.jpg": (exif_rotated_jpeg(), None),
    }


def write_bad_inputs(directory: Path) -> dict[str, tuple[bytes, str | None]]:
    directory.mkdir(parents=True, exist_ok=True)
    cases = bad_inputs()
    for name, (data, _) in cases.items():
        (directory / name).write_bytes(data)
    return cases


# Sizes of camera and phone pictures (landscape, portrait, square), scaled down 4x to keep the
# files small; the engine sees them at its working side either way.
PHOTO_SIZES = [(1008, 756), (756, 1008), (1024, 576), (800, 800), (960, 640)]


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photograph's statistics without a camera: a lit gradient (sky to ground), sensor
    noise, and a few blurred objects in front."""
    rng = np.random.default_rng(seed)
    width, height = size
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = rng.uniform(60, 230, 3), rng.uniform(20, 200, 3)
    pixels = top * (1 - y) + bottom * y + np.zeros((height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        w, h = rng.uniform(0.1, 0.45) * width, rng.uniform(0.1, 0.45) * height
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_photos(directory: Path, count: int, start: int = 0) -> list[Path]:
    """``count`` JPEG photographs (quality 88, as cameras save them) of assorted sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = directory / f"IMG_{index:04d}.jpg"
        photo(index, PHOTO_SIZES[index % len(PHOTO_SIZES)]).save(path, quality=88)
        paths.append(path)
    return paths
