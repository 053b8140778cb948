"""Writing a partition's records as a shard and a quarantine part, and the manifest at the end.

The order of operations is what makes a crash harmless: a partition's quarantine part is
written first and its shard last, each to a temporary name renamed into place, so the shard's
existence means the whole partition is on disk. A partition without its shard is redone from
scratch (its stale quarantine part removed first), and the manifest, listing every file with
its rows and checksum, is written only once every partition is there. Every input therefore
ends up exactly once in a shard or in quarantine, however often the job is killed.

Records whose bytes were already written under another input (the same sha256) are quarantined
as duplicates, so that ``image_id`` (source + sha256 prefix) names one row of the dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotate.engine.records import Record
from annotate.schema import (
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
    SHARD_SCHEMA,
    Manifest,
    ShardEntry,
    migrate_quarantine,
)
from ifadapter.utils.files import atomic_open, file_sha256, remove_temporaries

SHARD_NAME = "shard-{:05d}.parquet"
QUARANTINE_NAME = "part-{:05d}.parquet"
ID_HEX = 16


def image_id(source: str, sha256: str) -> str:
    return f"{source}-{sha256[:ID_HEX]}"


def shard_schema(extra_schema: pa.Schema) -> pa.Schema:
    """The contract's columns, then the source's caption and extra columns."""
    return pa.schema([*SHARD_SCHEMA, ("source_caption", pa.string()), *extra_schema])


def write_atomic(table: pa.Table, path: Path) -> None:
    """Parquet to a temporary name, synced, then renamed over ``path``. The temporary name is
    hidden (a leading dot), so a reader of the dataset never picks up a half-written file."""
    with atomic_open(path, sync=True) as handle:
        pq.write_table(table, handle)


class ShardWriter:
    def __init__(self, directory: Path, extra_schema: pa.Schema, annotator: dict):
        self.directory = directory
        migrate_quarantine(directory)
        self.quarantine_dir = directory / QUARANTINE_DIR
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        for folder in (directory, self.quarantine_dir):
            remove_temporaries(folder)
        self.schema = shard_schema(extra_schema)
        self.annotator = annotator
        self.annotator_json = json.dumps(annotator, sort_keys=True)
        self.seen: dict[str, str] = {}  # sha256 -> image_id of the row that holds those bytes

    def shard_path(self, index: int) -> Path:
        return self.directory / SHARD_NAME.format(index)

    def quarantine_path(self, index: int) -> Path:
        return self.quarantine_dir / QUARANTINE_NAME.format(index)

    def finished(self, index: int) -> bool:
        return self.shard_path(index).is_file()

    def resume(self, partitions: Iterable[int]) -> list[int]:
        """The partitions still to do; clears their stale quarantine parts and remembers the
        bytes the finished ones hold."""
        pending = []
        for index in partitions:
            if self.finished(index):
                table = pq.read_table(self.shard_path(index), columns=["sha256", "image_id"])
                hashes, ids = table["sha256"].to_pylist(), table["image_id"].to_pylist()
                self.seen.update(zip(hashes, ids, strict=True))
            else:
                self.quarantine_path(index).unlink(missing_ok=True)
                pending.append(index)
        return pending

    def provenance(self, record: Record) -> str:
        """The run's annotator JSON, plus the record's faults (annotations left empty, and
        why) when it has any."""
        if not record.faults:
            return self.annotator_json
        faults = [fault.to_row() for fault in record.faults]
        return json.dumps({**self.annotator, "faults": faults}, sort_keys=True)

    def shard_row(self, record: Record) -> dict:
        return {
            "image_id": image_id(record.source, record.sha256),
            "sha256": record.sha256,
            "source": record.source,
            "uri": record.uri,
            "image": record.image,
            "width": record.width,
            "height": record.height,
            "caption": record.caption or "",
            "tags": record.tags,
            "instances": [d.to_row() for d in record.instances],
            "annotator": self.provenance(record),
            "source_caption": record.source_caption,
            **record.extras,
        }

    def write(self, index: int, records: Sequence[Record]) -> None:
        """One partition, complete: its quarantine part (if any), then its shard."""
        rows, rejected = [], []
        for record in sorted(records, key=lambda r: r.position):
            if not record.rejected:
                earlier = self.seen.get(record.sha256)
                if earlier is None:
                    self.seen[record.sha256] = image_id(record.source, record.sha256)
                    rows.append(self.shard_row(record))
                    continue
                record.reject("dedup", f"duplicate: same bytes as {earlier}")
            rejected.append(
                {
                    "uri": record.uri,
                    "sha256": record.sha256,
                    "stage": record.reject_stage,
                    "reason": record.reject_reason,
                }
            )
        if rejected:
            write_atomic(
                pa.Table.from_pylist(rejected, schema=QUARANTINE_SCHEMA),
                self.quarantine_path(index),
            )
        write_atomic(pa.Table.from_pylist(rows, schema=self.schema), self.shard_path(index))

    def finish(self, partitions: int, inputs: int, annotator: dict) -> Manifest:
        """Lists every shard and quarantine part with rows and checksum, checks that inputs =
        rows + quarantined, and writes the manifest (last)."""
        missing = [i for i in range(partitions) if not self.finished(i)]
        if missing:
            raise RuntimeError(f"partitions {missing} have no shard; rerun to finish them")

        def entry(path: Path) -> ShardEntry:
            return ShardEntry(
                path=str(path.relative_to(self.directory)),
                rows=pq.read_metadata(path).num_rows,
                sha256=file_sha256(path),
            )

        manifest = Manifest(
            shards=[entry(self.shard_path(i)) for i in range(partitions)],
            quarantine=[
                entry(self.quarantine_path(i))
                for i in range(partitions)
                if self.quarantine_path(i).is_file()
            ],
            inputs=inputs,
            annotator=annotator,
        )
        if manifest.rows + manifest.quarantined != inputs:
            raise RuntimeError(
                f"counts do not reconcile: {manifest.rows} rows + {manifest.quarantined} "
                f"quarantined != {inputs} inputs"
            )
        manifest.write(self.directory)
        return manifest
