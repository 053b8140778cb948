"""Reading annotated shards (docs/design.md, contracts) for training.

Whole-shard faults (no manifest, a listed shard missing, a column missing or of another type)
stop the run with an error that names the shard and every fault. Row faults (bytes that do not
decode or do not match their checksum, a box outside [0, 1], an empty description) send that
image to the quarantine table with the reason; nothing is skipped silently.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import pyarrow.parquet as pq
from PIL import Image

from annotate.schema import Manifest, SchemaError, check_schema
from ifadapter import Instance, Layout

READ_COLUMNS = ["image_id", "sha256", "uri", "image", "width", "height", "caption", "instances"]


@dataclass
class ShardDataset:
    directory: Path
    manifest: Manifest
    paths: list[str]


def open_dataset(directory: str | Path) -> ShardDataset:
    """The dataset's manifest and shard paths, every shard's schema checked."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    paths = manifest.shard_paths(directory)
    if not paths:
        raise SchemaError(f"{directory}: the manifest lists no shards")
    for path in paths:
        if not Path(path).is_file():
            raise SchemaError(f"{path} is listed in the manifest but missing")
        check_schema(pq.read_schema(path), what=f"shard {path}")
    return ShardDataset(directory, manifest, paths)


class RowError(Exception):
    """A row that cannot be trained on; ``stage`` and the message go to the quarantine table."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage


def image_bytes(row: dict) -> bytes:
    """The encoded image: the ``image`` column, else what ``uri`` points to (a local path or any
    URI pyarrow's filesystems read); checked against ``sha256`` when the row gives one."""
    data = row["image"]
    if data is None:
        uri = row["uri"]
        if not uri:
            raise RowError("read", "no image bytes and no uri")
        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        except (pyarrow.ArrowInvalid, ValueError):
            filesystem, path = pyarrow.fs.LocalFileSystem(), uri
        try:
            with filesystem.open_input_file(path) as handle:
                data = handle.read()
        except OSError as error:
            raise RowError("read", f"cannot read {uri}: {error}") from None
    if row["sha256"] and hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise RowError("read", "image bytes do not match the row's sha256")
    return data


def decode_image(row: dict) -> Image.Image:
    """RGB pixels of the row's image, with the size the row declares."""
    try:
        image = Image.open(io.BytesIO(image_bytes(row)))
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as error:
        raise RowError("decode", f"image does not decode: {error}") from None
    if (image.width, image.height) != (row["width"], row["height"]):
        raise RowError(
            "decode",
            f"image is {image.width}x{image.height} but the row declares "
            f"{row['width']}x{row['height']}",
        )
    return image.convert("RGB")


def row_layout(row: dict) -> Layout:
    """The row's caption and instances, validated as any layout is. An instance's description is
    its caption, or its detector label when the captioner gave none."""
    instances = []
    for index, item in enumerate(row["instances"] or []):
        description = item.get("caption") or item.get("label")
        try:
            instances.append(Instance(box=item.get("box"), caption=description))
        except ValueError as error:
            raise RowError("layout", f"instance {index}: {error}") from None
    try:
        return Layout(caption=row["caption"], instances=instances)
    except ValueError as error:
        raise RowError("layout", str(error)) from None
