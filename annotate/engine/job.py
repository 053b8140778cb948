"""The annotation job: a source's inputs through decode, tag, detect and caption into shards.

Ray Data does the work: decoding runs as tasks, each model stage as a pool of actors with its
own CPUs/GPUs, all streaming, so the same job runs on a laptop (``ray.init(num_cpus=2)``) and
on a cluster (``ray.init(address=...)``). The driver only plans, collects the finished records
of each partition (small: pixels are dropped after the last stage) and writes them
(``annotate.engine.writer``); a rerun into the same directory skips the partitions whose shard
exists.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotate.backends import DatasetCaptioner
from annotate.config import AnnotateConfig
from annotate.engine.operators import ModelOperator, decode_batch
from annotate.engine.plan import Plan, partition
from annotate.engine.records import (
    PIXEL_COLUMNS,
    Record,
    records_from_table,
    records_to_table,
    work_schema,
)
from annotate.engine.writer import ShardWriter
from annotate.schema import MANIFEST_NAME, Manifest
from annotate.sources import Item, Source, SourceError


@dataclass
class RunSummary:
    output: Path
    inputs: int
    processed: int  # inputs this run annotated; the others were on disk already
    rows: int
    quarantined: dict[str, int]  # by reason code, over the whole dataset
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{code} {n}" for code, n in sorted(self.quarantined.items()))
        done = self.inputs - self.processed
        if self.processed == 0:
            first = f"all {self.inputs} inputs were already annotated: nothing to do"
        else:
            first = (
                f"{self.processed} of {self.inputs} inputs annotated in {self.seconds:.1f}s "
                f"({self.images_per_second:.2f} images/s)"
                + (f"; {done} were already done" if done else "")
            )
        return [
            first,
            f"{self.rows} rows, {sum(self.quarantined.values())} quarantined"
            + (f" ({reasons})" if reasons else ""),
            f"dataset: {self.output}",
        ]


def check_resources(config: AnnotateConfig, available: dict[str, float]) -> None:
    """Fixed actor pools wait forever for resources the cluster lacks: say so up front."""
    stages = config.stages()
    cpus = available.get("CPU", 0.0)
    gpus = available.get("GPU", 0.0)
    for name, stage in stages.items():
        if stage.num_gpus > gpus:
            raise ValueError(
                f"the {name} stage asks for {stage.num_gpus} GPU per actor; the Ray cluster has "
                f"{gpus:g}"
            )
    held = sum(s.workers * s.num_cpus for s in stages.values()) + config.decode.num_cpus
    if held > cpus:
        raise ValueError(
            f"the actors ({', '.join(f'{n} {s.workers}x{s.num_cpus:g}' for n, s in stages.items())}"
            f") and one decode task ({config.decode.num_cpus:g}) need {held:g} CPUs; the Ray "
            f"cluster has {cpus:g}: lower workers or num_cpus"
        )


def items_table(
    items: Sequence[Item], index: int, first: int, source: Source, schema: pa.Schema
) -> pa.Table:
    records = [
        Record(
            uri=item.uri,
            source=source.name,
            partition=index,
            position=first + offset,
            source_caption=item.caption,
            extras=item.extras,
        )
        for offset, item in enumerate(items)
    ]
    return records_to_table(records, schema)


def quarantine_reasons(directory: Path, manifest: Manifest) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for entry in manifest.quarantine:
        for reason in pq.read_table(directory / entry.path, columns=["reason"])["reason"]:
            counts[str(reason).split(":", 1)[0]] += 1
    return dict(counts)


def annotate_partitions(
    config: AnnotateConfig,
    source: Source,
    parts: Sequence[Sequence[Item]],
    pending: Sequence[int],
    writer: ShardWriter,
    progress: Callable[[int], None] | None,
) -> None:
    """The Ray Data job over the ``pending`` partitions (decode, then each model stage's
    actors); ``writer`` writes each partition as soon as all its records are back."""
    import ray

    check_resources(config, ray.cluster_resources())
    schema = work_schema(source.extra_schema)
    size = config.output.rows_per_shard
    # Blocks of one decode batch, not one partition: actors can only share out whole blocks.
    step = config.decode.batch_size
    tables = [items_table(parts[k], k, k * size, source, schema) for k in pending]
    dataset = ray.data.from_arrow(
        [t.slice(start, step) for t in tables for start in range(0, t.num_rows, step)]
    )
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={"source": source, "limits": config.decode, "embed": config.output.embed_images},
        batch_format="pyarrow",
        batch_size=config.decode.batch_size,
        num_cpus=config.decode.num_cpus,
    )
    for stage, stage_config in config.stages().items():
        backend = stage_config.backend_class()
        if issubclass(backend, DatasetCaptioner):
            dataset = backend.transform(dataset, stage_config, schema)
            continue
        dataset = dataset.map_batches(
            ModelOperator,
            fn_constructor_kwargs={"stage": stage, "config": stage_config},
            compute=ray.data.ActorPoolStrategy(size=stage_config.workers),
            batch_format="pyarrow",
            batch_size=stage_config.batch_size,
            num_cpus=stage_config.num_cpus,
            num_gpus=stage_config.num_gpus,
        )
    dataset = dataset.drop_columns(PIXEL_COLUMNS)

    expected = {k: len(parts[k]) for k in pending}
    received: dict[int, list[Record]] = defaultdict(list)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for record in records_from_table(batch):
            received[record.partition].append(record)
            if len(received[record.partition]) == expected[record.partition]:
                writer.write(record.partition, received.pop(record.partition))
        if progress is not None:
            progress(batch.num_rows)
    if received:
        raise RuntimeError(f"partitions {sorted(received)} came back incomplete")


def annotate(
    config: AnnotateConfig,
    source: Source,
    output: str | Path,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> RunSummary:
    """Annotates every input of ``source`` into the dataset directory ``output``, resuming a
    run found there. ``on_plan(inputs, already_done)`` is called once the work is known, then
    ``progress(n)`` as records come back. Needs a connection to Ray
    (``annotate.ray_session.connect``)."""
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    items = list(source.items())
    if not items:
        raise SourceError(f"{source.describe()} holds no input")
    size = config.output.rows_per_shard
    parts = partition(items, size)
    annotator = config.provenance()
    Plan.make(source.describe(), parts, size, annotator).adopt(output)
    writer = ShardWriter(output, source.extra_schema, annotator)
    pending = writer.resume(range(len(parts)))
    todo = sum(len(parts[k]) for k in pending)
    if on_plan is not None:
        on_plan(len(items), len(items) - todo)
    if pending:
        (output / MANIFEST_NAME).unlink(missing_ok=True)  # stale until every shard is back
        annotate_partitions(config, source, parts, pending, writer, progress)
    manifest = writer.finish(len(parts), len(items), annotator)
    return RunSummary(
        output=output,
        inputs=len(items),
        processed=todo,
        rows=manifest.rows,
        quarantined=quarantine_reasons(output, manifest),
        seconds=time.perf_counter() - started,
    )
