"""Small annotated shard datasets for the training tests, written as the data engine writes them
(docs/design.md, contracts): PNG bytes in ``image``, boxes normalised, a manifest with checksums."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from annotate.schema import SHARD_SCHEMA, Manifest, ShardEntry, file_sha256

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


def shapes_image(
    width: int, height: int, instances: list[tuple[tuple[float, ...], str, str]]
) -> bytes:
    """PNG of coloured shapes filling their boxes; instances are (box, colour, shape)."""
    image = Image.new("RGB", (width, height), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    for (x0, y0, x1, y1), colour, shape in instances:
        corners = [x0 * width, y0 * height, x1 * width - 1, y1 * height - 1]
        if shape == "circle":
            draw.ellipse(corners, fill=COLOURS[colour])
        else:
            draw.rectangle(corners, fill=COLOURS[colour])
    return png(image)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_row(image_id: str, data: bytes, width: int, height: int, **annotation) -> dict:
    """A shard row of PNG ``data`` held in the row; ``annotation`` gives the annotated columns
    (caption, tags, instances, annotator)."""
    return {
        "image_id": image_id,
        "sha256": hashlib.sha256(data).hexdigest(),
        "source": "tests",
        "uri": f"memory://{image_id}.png",
        "image": data,
        "width": width,
        "height": height,
        **annotation,
    }


def shapes_row(
    image_id: str,
    instances: list[tuple[tuple[float, ...], str, str]],
    width: int = 64,
    height: int = 64,
) -> dict:
    return image_row(
        image_id,
        shapes_image(width, height, instances),
        width,
        height,
        caption=" and ".join(f"a {colour} {shape}" for _, colour, shape in instances),
        tags=sorted({shape for _, _, shape in instances}),
        instances=[
            {"box": list(box), "label": shape, "score": 0.9, "caption": f"a {colour} {shape}"}
            for box, colour, shape in instances
        ],
        annotator=json.dumps({"oracle": "tests.support.shards"}),
    )


def default_rows(count: int = 4) -> list[dict]:
    layouts = [
        [((0.05, 0.05, 0.5, 0.5), "red", "circle"), ((0.5, 0.4, 0.95, 0.95), "blue", "square")],
        [((0.1, 0.5, 0.6, 0.95), "green", "square")],
        [((0.0, 0.0, 1.0, 0.45), "blue", "square"), ((0.3, 0.5, 0.7, 0.9), "red", "circle")],
        [
            ((0.55, 0.05, 0.95, 0.45), "green", "circle"),
            ((0.05, 0.55, 0.45, 0.95), "red", "square"),
        ],
    ]
    return [shapes_row(f"tests-{i:04d}", layouts[i % len(layouts)]) for i in range(count)]


def write_dataset(
    directory: str | Path, shards: list[list[dict]], schema: pa.Schema = SHARD_SCHEMA
) -> Path:
    """One Parquet shard per list of rows, and the manifest listing them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, rows in enumerate(shards):
        name = f"shard-{index:05d}.parquet"
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, directory / name)
        entries.append(ShardEntry(name, len(rows), file_sha256(directory / name)))
    Manifest(shards=entries, inputs=sum(len(rows) for rows in shards)).write(directory)
    return directory
