"""The Ray Data side of the annotate operators (tag, detect, caption): Arrow batches in, Arrow
batches out, records in between.

Kept thin on purpose: decoding and the backends are plain code (``annotate.engine.decode``,
``annotate.backends``); here they are applied to a batch, rejected records pass through, and a
backend that fails on a batch is retried record by record so that one bad image costs one
quarantine row, not its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from annotate.backends import Backend
from annotate.config import DecodeConfig, StageConfig
from annotate.engine.decode import decode_record
from annotate.engine.records import Record, records_from_table, records_to_table
from annotate.sources import Source


def device(num_gpus: float) -> str:
    """CUDA for an actor that was given a GPU; torch is imported only then."""
    if num_gpus > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def decode_batch(table: pa.Table, *, source: Source, limits: DecodeConfig, embed: bool) -> pa.Table:
    records = records_from_table(table)
    for record in records:
        decode_record(record, source, limits, embed)
    return records_to_table(records, table.schema)


def apply_backend(stage: str, backend: Backend, records: Sequence[Record]) -> None:
    """Runs one backend on records that are all alive and stores its answers on them."""
    if stage == "tag":
        results = backend.tag(records)
    elif stage == "detect":
        results = backend.detect(records)
    else:
        results = backend.caption(records)
    if len(results) != len(records):
        raise ValueError(f"{stage} backend answered {len(results)} of {len(records)} records")
    for record, result in zip(records, results, strict=True):
        if stage == "tag":
            record.tags = list(result)
        elif stage == "detect":
            record.instances = list(result)
        else:
            if len(result.instances) != len(record.instances):
                raise ValueError(
                    f"captioner described {len(result.instances)} of "
                    f"{len(record.instances)} instances"
                )
            if any(
                f.instance is not None and not 0 <= f.instance < len(record.instances)
                for f in result.faults
            ):
                raise ValueError("captioner reported a fault for an instance the image lacks")
            record.caption = result.caption
            record.faults += result.faults
            for detection, text in zip(record.instances, result.instances, strict=True):
                detection.caption = text


def annotate_records(stage: str, backend: Backend, records: Sequence[Record]) -> None:
    """``apply_backend`` on the live records; on failure once more one by one, rejecting those
    that still fail with the error as reason."""
    live = [r for r in records if not r.rejected]
    if not live:
        return
    try:
        apply_backend(stage, backend, live)
    except Exception:
        for record in live:
            try:
                apply_backend(stage, backend, [record])
            except Exception as error:
                record.reject(stage, f"{stage}_failed: {type(error).__name__}: {error}")


class ModelOperator:
    """A Ray Data actor holding one backend (models load once per actor). Ray sets the actor's
    OMP_NUM_THREADS from its CPUs, which torch's thread pool follows."""

    def __init__(self, stage: str, config: StageConfig):
        self.stage = stage
        self.backend = config.build(device(config.num_gpus))

    def __call__(self, table: pa.Table) -> pa.Table:
        records = records_from_table(table)
        annotate_records(self.stage, self.backend, records)
        return records_to_table(records, table.schema)
