"""Where inputs come from: an image folder, a COCO instances file, a list of URIs.

A source lists its inputs as ``Item``s, in an order that is the same on every listing (the
engine cuts that list into shard-sized partitions and a rerun relies on getting the same cut),
and reads an item's bytes. Anything a source knows beyond the image (COCO's own boxes and
captions, say) travels as extra columns it declares in ``extra_schema`` and ends up in the
shards beside the annotations. A new source (the toy world's, ``annotate.toy.source``, for one)
subclasses ``Source`` (``annotate.source_base``): ``items``, ``describe`` and, where bytes come
from elsewhere than a path, ``read``.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from annotate.source_base import Item, Source, SourceError
from annotate.source_base import TooLarge as TooLarge  # re-exported: the engine catches it
from annotate.toy.source import ToySource

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)
URI_COLUMNS = ("uri", "url", "URL", "path")
CAPTION_COLUMNS = ("caption", "text", "TEXT")

COCO_BOX_TYPE = pa.struct(
    [
        ("box", pa.list_(pa.float32(), 4)),  # normalised xyxy, like the shard's instances
        ("label", pa.string()),
        ("crowd", pa.bool_()),
    ]
)


class FolderSource(Source):
    """Every file with an image extension under a directory, recursively, sorted by path.

    Files with other extensions (captions and metadata beside the images, as img2dataset writes
    them) are not inputs; a file with an image extension that is not an image is one, and ends
    in quarantine."""

    def __init__(self, root: str | Path, name: str = "folder"):
        self.root = Path(root).resolve()
        self.name = name
        if not self.root.is_dir():
            raise SourceError(f"image folder {root} does not exist")

    def items(self) -> Iterator[Item]:
        paths = (
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            and p.is_file()
        )
        for path in sorted(paths):
            yield Item(uri=str(path))

    def describe(self) -> dict:
        return {"kind": "folder", "name": self.name, "root": str(self.root)}


class CocoSource(Source):
    """A COCO instances JSON and its image folder; COCO's boxes and captions kept as columns.

    ``coco_boxes`` are COCO's ground-truth boxes (normalised xyxy, category name, crowd flag),
    ``coco_captions`` the captions of the matching ``captions_*.json`` when there is one, the
    first of which is also the record's source caption."""

    extra_schema: ClassVar[pa.Schema] = pa.schema(
        [
            ("coco_id", pa.int64()),
            ("coco_boxes", pa.list_(COCO_BOX_TYPE)),
            ("coco_captions", pa.list_(pa.string())),
        ]
    )

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path | None = None,
        captions: str | Path | None = None,
        name: str = "coco",
    ):
        self.annotations = Path(annotations).resolve()
        if not self.annotations.is_file():
            raise SourceError(f"COCO annotations {annotations} do not exist")
        self.images = Path(images).resolve() if images else self._default_images()
        if not self.images.is_dir():
            raise SourceError(f"COCO image folder {self.images} does not exist")
        self.captions = Path(captions).resolve() if captions else self._default_captions()
        self.name = name

    def _split(self) -> str:
        stem = self.annotations.stem
        return stem.split("_", 1)[1] if stem.startswith("instances_") else stem

    def _default_images(self) -> Path:
        """COCO's layout: ``annotations/instances_val2017.json`` beside ``val2017/``."""
        split = self._split()
        for candidate in (self.annotations.parent.parent / split, self.annotations.parent / split):
            if candidate.is_dir():
                return candidate
        raise SourceError(
            f"no image folder {split}/ beside {self.annotations.parent}; name it explicitly"
        )

    def _default_captions(self) -> Path | None:
        candidate = self.annotations.parent / f"captions_{self._split()}.json"
        return candidate if candidate.is_file() else None

    def items(self) -> Iterator[Item]:
        data = json.loads(self.annotations.read_text())
        categories = {c["id"]: c["name"] for c in data.get("categories", [])}
        boxes: dict[int, list[dict]] = {}
        for ann in data.get("annotations", []):
            boxes.setdefault(ann["image_id"], []).append(ann)
        captions: dict[int, list[str]] = {}
        if self.captions is not None:
            for ann in json.loads(self.captions.read_text()).get("annotations", []):
                captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        for image in sorted(data.get("images", []), key=lambda i: i["id"]):
            width, height = image["width"], image["height"]
            coco_boxes = []
            for ann in sorted(boxes.get(image["id"], []), key=lambda a: a["id"]):
                x, y, w, h = ann["bbox"]
                box = [
                    max(0.0, x / width),
                    max(0.0, y / height),
                    min(1.0, (x + w) / width),
                    min(1.0, (y + h) / height),
                ]
                label = categories.get(ann["category_id"], str(ann["category_id"]))
                coco_boxes.append({"box": box, "label": label, "crowd": bool(ann.get("iscrowd"))})
            texts = captions.get(image["id"], [])
            yield Item(
                uri=str(self.images / image["file_name"]),
                caption=texts[0] if texts else None,
                extras={"coco_id": image["id"], "coco_boxes": coco_boxes, "coco_captions": texts},
            )

    def describe(self) -> dict:
        return {
            "kind": "coco",
            "name": self.name,
            "annotations": str(self.annotations),
            "images": str(self.images),
            "captions": str(self.captions) if self.captions else None,
        }


class UriListSource(Source):
    """A Parquet or CSV table of image URIs with optional captions (LAION-style), on any fsspec
    path. The URI column is the first of uri/url/URL/path, the caption column the first of
    caption/text/TEXT; relative URIs are relative to the list's own location."""

    def __init__(self, path: str, name: str = "uris"):
        self.path = path
        self.name = name
        if not self.path.endswith((".parquet", ".csv")):
            raise SourceError(f"URI list {path} is neither .parquet nor .csv")

    def _table(self) -> pa.Table:
        try:
            filesystem, path = fsspec.core.url_to_fs(self.path)
            if not filesystem.exists(path):
                raise SourceError(f"URI list {self.path} does not exist")
            with filesystem.open(path, "rb") as handle:
                if self.path.endswith(".parquet"):
                    return pq.read_table(handle)
                return pacsv.read_csv(handle)
        except (OSError, pa.ArrowInvalid) as error:
            raise SourceError(f"cannot read URI list {self.path}: {error}") from None

    def items(self) -> Iterator[Item]:
        table = self._table()
        uri_column = next((c for c in URI_COLUMNS if c in table.column_names), None)
        if uri_column is None:
            raise SourceError(
                f"URI list {self.path} has none of the columns {', '.join(URI_COLUMNS)}"
            )
        caption_column = next((c for c in CAPTION_COLUMNS if c in table.column_names), None)
        uris = table.column(uri_column).to_pylist()
        captions = (
            table.column(caption_column).to_pylist() if caption_column else [None] * len(uris)
        )
        base = posixpath.dirname(self.path)
        for uri, caption in zip(uris, captions, strict=True):
            uri = str(uri)
            if "://" not in uri and not posixpath.isabs(uri):
                uri = posixpath.join(base, uri)
            yield Item(uri=uri, caption=str(caption) if caption else None)  # CSV: "" is none

    def describe(self) -> dict:
        return {"kind": "uris", "name": self.name, "path": self.path}


def open_source(input_path: str, images: str | None = None, name: str | None = None) -> Source:
    """The source an ``--input`` names: a directory is an image folder, a ``.json`` a COCO
    instances file (``images`` overrides its image folder), a ``.parquet``/``.csv`` a URI list,
    ``toy:seed=N,count=N`` the toy world."""
    named = {"name": name} if name else {}
    if input_path.startswith("toy:"):
        return ToySource.parse(input_path, name)
    if input_path.endswith((".parquet", ".csv")):
        return UriListSource(input_path, **named)
    if input_path.endswith(".json"):
        return CocoSource(input_path, images=images, **named)
    if Path(input_path).is_dir():
        return FolderSource(input_path, **named)
    raise SourceError(
        f"input {input_path} is not an image folder, a COCO .json, a .parquet/.csv URI list "
        "or toy:seed=N,count=N"
    )
