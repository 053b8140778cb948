"""The IFG benchmark file: a deterministic selection of layouts from any annotated shard set.

Rules (``BenchmarkConfig``), applied to every shard row in manifest order:

- the global caption is present (not blank);
- every instance has a valid box (inside [0, 1], positive width and height), a label and a
  description, and its shortest side is at least ``min_box`` (normalised): a row with one unusable
  instance is left out whole rather than trimmed, so that the layout still describes everything
  its real image shows and the ``real`` upper bound stays comparable;
- ``min_instances <= instances <= max_instances``.

Among the rows that pass, the ``count`` with the smallest SHA-256 of ``"{seed}:{image_id}"`` are
taken (a ranking that depends neither on the shards' order nor on their number), sorted by id.
Too few eligible rows is an error naming the counts. The file records the rules, the shard
manifest's checksum, how many rows each rule left out, and a SHA-256 of its own content, which
``read_benchmark`` checks: an edited file is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from annotate.schema import MANIFEST_NAME, Manifest, check_schema
from ifadapter.utils.files import file_sha256, json_sha256, write_json_atomic

FORMAT = "ifg-benchmark"
VERSION = 1
COLUMNS = ["image_id", "sha256", "uri", "width", "height", "caption", "instances"]


class BenchmarkConfig(BaseModel):
    """Where the benchmark file is (built from ``shards`` when missing) and its selection rules."""

    model_config = ConfigDict(extra="forbid")

    file: Path
    shards: Path | None = None  # an annotated shard dataset; needed only to build the file
    count: PositiveInt = 1000
    seed: int = 0
    min_instances: PositiveInt = 1
    max_instances: PositiveInt = 8
    min_box: float = Field(0.02, ge=0.0, lt=1.0)  # shortest box side, normalised

    @model_validator(mode="after")
    def _range(self) -> BenchmarkConfig:
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances {self.min_instances} > max_instances")
        return self

    def rules(self) -> dict:
        """What decides the selection (not where the file goes)."""
        return self.model_dump(mode="json", exclude={"file", "shards"})


class BenchmarkError(ValueError):
    """A benchmark that cannot be built or read; the message names the file and the fault."""


@dataclass(frozen=True)
class BenchmarkInstance:
    box: tuple[float, float, float, float]
    label: str  # the detector's class
    caption: str  # the instance description the judges check


@dataclass(frozen=True)
class BenchmarkLayout:
    id: str
    caption: str
    instances: tuple[BenchmarkInstance, ...]
    width: int
    height: int
    source: dict  # uri, sha256, shard (relative to the shard directory), image_id

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "caption": self.caption,
            "width": self.width,
            "height": self.height,
            "instances": [
                {"box": list(i.box), "label": i.label, "caption": i.caption} for i in self.instances
            ],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> BenchmarkLayout:
        return cls(
            id=data["id"],
            caption=data["caption"],
            instances=tuple(
                BenchmarkInstance(tuple(i["box"]), i["label"], i["caption"])
                for i in data["instances"]
            ),
            width=data["width"],
            height=data["height"],
            source=data["source"],
        )


@dataclass(frozen=True)
class Benchmark:
    path: Path
    sha256: str  # of the content (see ``content_digest``)
    rules: dict
    layouts: tuple[BenchmarkLayout, ...]
    source: dict  # shard directory, manifest checksum, rows, eligible, excluded (rule -> rows)

    @property
    def instances(self) -> int:
        return sum(len(layout.instances) for layout in self.layouts)

    def summary(self) -> dict:
        """The ``benchmark`` entry of metrics.json."""
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "count": len(self.layouts),
            "instances": self.instances,
            "rules": self.rules,
        }


def content_digest(content: dict) -> str:
    """The checksum a benchmark file records of its own content (compact canonical JSON)."""
    return json_sha256(content, compact=True)


def _rejection(row: dict, config: BenchmarkConfig) -> str | None:
    """The first rule the row breaks, or None when it is eligible."""
    if not (row["caption"] or "").strip():
        return "no_caption"
    instances = row["instances"] or []
    for instance in instances:
        box = instance["box"]
        if box is None or len(box) != 4 or not all(math.isfinite(v) for v in box):
            return "bad_box"
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            return "bad_box"
        if not (instance["label"] or "").strip() or not (instance["caption"] or "").strip():
            return "no_instance_text"
        if min(x1 - x0, y1 - y0) < config.min_box:
            return "small_box"
    if len(instances) < config.min_instances:
        return "too_few_instances"
    if len(instances) > config.max_instances:
        return "too_many_instances"
    return None


def _rank(seed: int, image_id: str) -> str:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def build_benchmark(config: BenchmarkConfig) -> Benchmark:
    """Selects the layouts from ``config.shards`` and writes ``config.file`` atomically."""
    if config.shards is None:
        raise BenchmarkError(
            f"benchmark file {config.file} does not exist and benchmark.shards is not set"
        )
    manifest = Manifest.read(config.shards)
    manifest.verify(config.shards)
    excluded: Counter[str] = Counter()
    eligible: list[tuple[str, BenchmarkLayout]] = []
    seen: set[str] = set()
    for entry in manifest.shards:
        path = Path(config.shards) / entry.path
        check_schema(pq.read_schema(path), what=str(path))
        for row in pq.read_table(path, columns=COLUMNS).to_pylist():
            if row["image_id"] in seen:
                excluded["duplicate_id"] += 1
                continue
            seen.add(row["image_id"])
            reason = _rejection(row, config)
            if reason is not None:
                excluded[reason] += 1
                continue
            layout = BenchmarkLayout(
                id=row["image_id"],
                caption=row["caption"].strip(),
                instances=tuple(
                    BenchmarkInstance(
                        tuple(round(float(v), 6) for v in i["box"]),
                        i["label"].strip(),
                        i["caption"].strip(),
                    )
                    for i in row["instances"]
                ),
                width=row["width"],
                height=row["height"],
                source={
                    "uri": row["uri"],
                    "sha256": row["sha256"],
                    "shard": entry.path,
                    "image_id": row["image_id"],
                },
            )
            eligible.append((_rank(config.seed, layout.id), layout))
    if len(eligible) < config.count:
        raise BenchmarkError(
            f"{config.shards}: only {len(eligible)} rows pass the benchmark rules "
            f"(left out: {dict(sorted(excluded.items()))}), count asks for {config.count}"
        )
    eligible.sort(key=lambda item: item[0])
    chosen = sorted((layout for _, layout in eligible[: config.count]), key=lambda x: x.id)
    content = {
        "format": FORMAT,
        "version": VERSION,
        "rules": config.rules(),
        "source": {
            "shards": str(Path(config.shards).resolve()),
            "manifest_sha256": file_sha256(Path(config.shards) / MANIFEST_NAME),
            "rows": manifest.rows,
            "eligible": len(eligible),
            "excluded": dict(sorted(excluded.items())),
        },
        "layouts": [layout.to_dict() for layout in chosen],
    }
    digest = content_digest(content)
    target = Path(config.file)
    write_json_atomic(target, {**content, "sha256": digest}, indent=1, sort_keys=True)
    return Benchmark(target, digest, content["rules"], tuple(chosen), content["source"])


def read_benchmark(path: str | Path) -> Benchmark:
    """A benchmark file, its checksum verified."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BenchmarkError(f"{path} is not JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BenchmarkError(f"{path} is not an IFG benchmark file")
    if data.get("version") != VERSION:
        raise BenchmarkError(f"{path}: benchmark version {data.get('version')} is not {VERSION}")
    recorded = data.pop("sha256", None)
    if recorded != content_digest(data):
        raise BenchmarkError(f"{path} does not match its checksum (edited or truncated)")
    layouts = tuple(BenchmarkLayout.from_dict(item) for item in data["layouts"])
    return Benchmark(path, recorded, data["rules"], layouts, data["source"])


def load_or_build(config: BenchmarkConfig) -> Benchmark:
    """The benchmark at ``config.file``, built first when missing. An existing file made under
    other rules is refused (naming them) rather than silently scored under the wrong rules."""
    if not Path(config.file).is_file():
        return build_benchmark(config)
    benchmark = read_benchmark(config.file)
    if benchmark.rules != config.rules():
        changed = sorted(
            key
            for key in {*benchmark.rules, *config.rules()}
            if benchmark.rules.get(key) != config.rules().get(key)
        )
        raise BenchmarkError(
            f"{config.file} was built with other rules ({', '.join(changed)} differ): "
            "point benchmark.file elsewhere or delete it to rebuild"
        )
    return benchmark
