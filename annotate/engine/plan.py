"""How a run's inputs are cut into partitions, one shard each, and the record that makes a
rerun resume instead of start over.

Partition ``k`` holds inputs ``k*n .. k*n+n-1`` of the source's deterministic listing and is
written as ``shard-{k:05d}.parquet`` (plus its quarantine part), so a shard's name says which
inputs it answers for. ``_plan.json``, written before any shard, records the source, the
partition size, a fingerprint of each partition's URIs and the annotator's provenance; a rerun
into the same directory must list the same inputs under the same annotator, otherwise it stops
with the difference instead of mixing two datasets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from annotate.sources import Item
from ifadapter.utils.files import write_json_atomic

PLAN_NAME = "_plan.json"


class PlanMismatch(ValueError):
    """The output directory holds a run over other inputs or with another annotator."""


def partition(items: Sequence[Item], rows_per_shard: int) -> list[list[Item]]:
    return [list(items[i : i + rows_per_shard]) for i in range(0, len(items), rows_per_shard)]


def fingerprint(items: Sequence[Item]) -> str:
    return hashlib.sha256("\n".join(item.uri for item in items).encode()).hexdigest()[:16]


@dataclass
class Plan:
    source: dict
    rows_per_shard: int
    inputs: int
    partitions: list[str]  # fingerprint of each partition's URIs
    annotator: dict

    @classmethod
    def make(
        cls, source: dict, parts: Sequence[Sequence[Item]], rows_per_shard: int, annotator: dict
    ) -> Plan:
        return cls(
            source=source,
            rows_per_shard=rows_per_shard,
            inputs=sum(len(p) for p in parts),
            partitions=[fingerprint(p) for p in parts],
            annotator=json.loads(json.dumps(annotator)),  # as it reads back from disk
        )

    def write(self, directory: Path) -> None:
        write_json_atomic(directory / PLAN_NAME, asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, directory: Path) -> Plan | None:
        path = directory / PLAN_NAME
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def differences(self, other: Plan) -> list[str]:
        """What ``other`` (this run) changes against ``self`` (the run found on disk)."""
        found = []
        if self.source != other.source:
            found.append(f"source {self.source} -> {other.source}")
        if self.rows_per_shard != other.rows_per_shard:
            found.append(f"rows_per_shard {self.rows_per_shard} -> {other.rows_per_shard}")
        if self.partitions != other.partitions:
            found.append(f"the inputs ({self.inputs} -> {other.inputs}, or their order)")
        if self.annotator != other.annotator:
            changed = sorted(
                key
                for key in {*self.annotator, *other.annotator}
                if self.annotator.get(key) != other.annotator.get(key)
            )
            found.append(f"the annotator ({', '.join(changed)})")
        return found

    def adopt(self, directory: Path) -> None:
        """Writes this plan into a fresh directory, or checks it against the one there."""
        existing = Plan.read(directory)
        if existing is None:
            self.write(directory)
            return
        differences = existing.differences(self)
        if differences:
            raise PlanMismatch(
                f"{directory} holds a run with other settings (changed: "
                + "; ".join(differences)
                + "); resume with the same ones or write to a new directory"
            )
