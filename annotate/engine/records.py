"""What travels through the engine: one ``Record`` per input, and its Arrow form between stages.

Every input becomes exactly one record and stays one until it is written, either as a shard row
or, once a stage has rejected it (``reject_stage``/``reject_reason`` set), as a quarantine row;
later stages pass rejected records through untouched. Between Ray Data stages records travel as
Arrow tables of ``work_schema``: the decoded image as raw RGB bytes at working size (so no stage
decodes the original again), plus whatever extra columns the source declares.

An annotation a backend could not make (a caption the VLM would not give, or gave unusably)
does not reject its record: the annotation stays empty and a ``Fault`` with the reason travels
with the record into its row's ``annotator`` provenance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import pyarrow as pa
from PIL import Image

from annotate.schema import INSTANCE_TYPE

FAULT_TYPE = pa.struct([("stage", pa.string()), ("instance", pa.int32()), ("reason", pa.string())])

# Bookkeeping and intermediate columns; the shard's own columns are derived from them on write.
BASE_WORK_SCHEMA = pa.schema(
    [
        ("partition", pa.int64()),
        ("position", pa.int64()),  # index in the source's listing: shards keep input order
        ("uri", pa.string()),
        ("source", pa.string()),
        ("source_caption", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
        ("pixels", pa.binary()),
        ("pixels_width", pa.int32()),
        ("pixels_height", pa.int32()),
        ("tags", pa.list_(pa.string())),
        ("instances", pa.list_(INSTANCE_TYPE)),
        ("caption", pa.string()),
        ("faults", pa.list_(FAULT_TYPE)),
        ("reject_stage", pa.string()),
        ("reject_reason", pa.string()),
    ]
)
PIXEL_COLUMNS = ["pixels", "pixels_width", "pixels_height"]


def work_schema(extra_schema: pa.Schema) -> pa.Schema:
    """The engine's working columns followed by a source's extra columns."""
    clash = set(extra_schema.names) & set(BASE_WORK_SCHEMA.names)
    if clash:
        raise ValueError(f"source extra columns clash with the engine's: {sorted(clash)}")
    return pa.schema([*BASE_WORK_SCHEMA, *extra_schema])


@dataclass
class Detection:
    """One instance: a normalised xyxy box, the tag it was found for, its score, a description."""

    box: tuple[float, float, float, float]
    label: str
    score: float
    caption: str = ""

    def to_row(self) -> dict:
        return {
            "box": list(self.box),
            "label": self.label,
            "score": self.score,
            "caption": self.caption,
        }

    @classmethod
    def from_row(cls, row: dict) -> Detection:
        return cls(tuple(row["box"]), row["label"], row["score"], row["caption"] or "")


@dataclass
class Fault:
    """An annotation that could not be made, and why ("code: detail"). ``instance`` indexes the
    record's instances; ``None`` means the image's own annotation (its global caption)."""

    stage: str
    reason: str
    instance: int | None = None

    def to_row(self) -> dict:
        return asdict(self)


@dataclass
class Captions:
    """A captioner's answer for one image: the global caption and one per instance, in order;
    an empty caption has its reason in ``faults``."""

    caption: str
    instances: list[str]
    faults: list[Fault] = field(default_factory=list)


@dataclass
class Record:
    """One input on its way through decode, tag, detect and caption."""

    uri: str
    source: str
    partition: int
    position: int
    source_caption: str | None = None
    extras: dict = field(default_factory=dict)
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    image: bytes | None = None  # the original bytes, when the output embeds them
    pixels: bytes | None = None  # RGB at working size
    pixels_size: tuple[int, int] | None = None
    tags: list[str] = field(default_factory=list)
    instances: list[Detection] = field(default_factory=list)
    caption: str | None = None
    faults: list[Fault] = field(default_factory=list)
    reject_stage: str | None = None
    reject_reason: str | None = None

    @property
    def rejected(self) -> bool:
        return self.reject_stage is not None

    def reject(self, stage: str, reason: str) -> None:
        self.reject_stage, self.reject_reason = stage, reason
        self.pixels = self.pixels_size = None

    def rgb(self) -> Image.Image:
        """The decoded image at working size (only for records that passed decoding)."""
        if self.pixels is None or self.pixels_size is None:
            raise ValueError(f"{self.uri} has no decoded pixels")
        return Image.frombytes("RGB", self.pixels_size, self.pixels)

    def to_row(self) -> dict:
        width, height = self.pixels_size or (None, None)
        return {
            "partition": self.partition,
            "position": self.position,
            "uri": self.uri,
            "source": self.source,
            "source_caption": self.source_caption,
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "image": self.image,
            "pixels": self.pixels,
            "pixels_width": width,
            "pixels_height": height,
            "tags": self.tags,
            "instances": [d.to_row() for d in self.instances],
            "caption": self.caption,
            "faults": [f.to_row() for f in self.faults],
            "reject_stage": self.reject_stage,
            "reject_reason": self.reject_reason,
            **self.extras,
        }

    @classmethod
    def from_row(cls, row: dict) -> Record:
        row = dict(row)
        width, height = row.pop("pixels_width", None), row.pop("pixels_height", None)
        known = {name: row.pop(name, None) for name in BASE_WORK_SCHEMA.names if name in row}
        return cls(
            uri=known["uri"],
            source=known["source"],
            partition=known["partition"],
            position=known["position"],
            source_caption=known.get("source_caption"),
            extras=row,
            sha256=known.get("sha256"),
            width=known.get("width"),
            height=known.get("height"),
            image=known.get("image"),
            pixels=known.get("pixels"),
            pixels_size=(width, height) if width is not None else None,
            tags=list(known.get("tags") or []),
            instances=[Detection.from_row(d) for d in known.get("instances") or []],
            caption=known.get("caption"),
            faults=[Fault(**f) for f in known.get("faults") or []],
            reject_stage=known.get("reject_stage"),
            reject_reason=known.get("reject_reason"),
        )


def records_from_table(table: pa.Table) -> list[Record]:
    return [Record.from_row(row) for row in table.to_pylist()]


def records_to_table(records: Sequence[Record], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=schema)
