"""The shard contract between the data engine, training and evaluation (docs/design.md, contracts).

One Parquet row per image. A dataset directory holds the shards, a ``_manifest.json`` listing
them with row counts and checksums, and a ``_quarantine/`` table of inputs that could not be
used, so that inputs = rows + quarantined can always be checked. The leading underscore (like
the manifest's) is what pyarrow, pandas, DuckDB's hive reader, Ray Data and Spark skip, so the
directory reads as the dataset alone with any standard reader. Writers may add columns (COCO's
own boxes, for instance); readers rely on the required ones below only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from ifadapter.utils.files import file_sha256, write_json_atomic

MANIFEST_NAME = "_manifest.json"
QUARANTINE_DIR = "_quarantine"
LEGACY_QUARANTINE_DIR = "quarantine"  # before 2026-11-26; moved by migrate_quarantine
SCHEMA_VERSION = 1

INSTANCE_TYPE = pa.struct(
    [
        ("box", pa.list_(pa.float32(), 4)),  # normalised xyxy
        ("label", pa.string()),
        ("score", pa.float32()),
        ("caption", pa.string()),
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("sha256", pa.string()),
        ("source", pa.string()),
        ("uri", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("instances", pa.list_(INSTANCE_TYPE)),
        ("annotator", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)


class SchemaError(ValueError):
    """A table or dataset that does not follow the shard contract."""


def check_schema(
    schema: pa.Schema, required: pa.Schema = SHARD_SCHEMA, what: str = "shard"
) -> None:
    """Raises ``SchemaError`` naming every required column that is missing or of another type."""
    faults = []
    for expected in required:
        index = schema.get_field_index(expected.name)
        if index < 0:
            faults.append(f"missing column {expected.name!r}")
        elif not schema.field(index).type.equals(expected.type):
            faults.append(
                f"column {expected.name!r} is {schema.field(index).type}, expected {expected.type}"
            )
    if faults:
        raise SchemaError(f"{what} does not follow the shard schema: " + "; ".join(faults))


@dataclass
class ShardEntry:
    path: str  # relative to the dataset directory
    rows: int
    sha256: str


@dataclass
class Manifest:
    """What a dataset directory holds; written last, so a listed shard is a finished shard."""

    shards: list[ShardEntry] = field(default_factory=list)
    quarantine: list[ShardEntry] = field(default_factory=list)
    inputs: int = 0
    annotator: dict = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    @property
    def rows(self) -> int:
        return sum(entry.rows for entry in self.shards)

    @property
    def quarantined(self) -> int:
        return sum(entry.rows for entry in self.quarantine)

    def write(self, directory: str | os.PathLike) -> Path:
        """Atomic: a temporary file renamed over the manifest."""
        target = Path(directory) / MANIFEST_NAME
        return write_json_atomic(target, asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise SchemaError(f"{directory} is not a shard dataset (no {MANIFEST_NAME})")
        data = json.loads(path.read_text())
        if data.get("version") != SCHEMA_VERSION:
            raise SchemaError(
                f"{path}: manifest version {data.get('version')} is not {SCHEMA_VERSION}"
            )
        return cls(
            shards=[ShardEntry(**entry) for entry in data["shards"]],
            quarantine=[ShardEntry(**entry) for entry in data.get("quarantine", [])],
            inputs=data.get("inputs", 0),
            annotator=data.get("annotator", {}),
        )

    def shard_paths(self, directory: str | os.PathLike) -> list[str]:
        return [str(Path(directory) / entry.path) for entry in self.shards]

    def verify(self, directory: str | os.PathLike) -> None:
        """Checksums of every listed file; raises ``SchemaError`` on the first mismatch."""
        for entry in [*self.shards, *self.quarantine]:
            path = Path(directory) / entry.path
            if not path.is_file():
                raise SchemaError(f"{path} is listed in the manifest but missing")
            if file_sha256(path) != entry.sha256:
                raise SchemaError(f"{path} does not match its manifest checksum")


def migrate_quarantine(directory: str | os.PathLike) -> bool:
    """Moves a dataset written before the rename (``quarantine/``, which every reader took for
    part of the dataset) to ``_quarantine/``, its manifest's paths with it; True if it moved."""
    directory = Path(directory)
    old, new = directory / LEGACY_QUARANTINE_DIR, directory / QUARANTINE_DIR
    if not old.is_dir() or new.exists():
        return False
    os.replace(old, new)
    if (directory / MANIFEST_NAME).is_file():
        manifest = Manifest.read(directory)
        prefix = LEGACY_QUARANTINE_DIR + "/"
        for entry in manifest.quarantine:
            if entry.path.startswith(prefix):
                entry.path = QUARANTINE_DIR + "/" + entry.path[len(prefix) :]
        manifest.write(directory)
    return True
