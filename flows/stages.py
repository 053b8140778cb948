"""The four stages as plain functions the Prefect tasks wrap: skip when complete, else run.

Each function works out the digest of what its stage's result depends on, returns the recorded
summary when the stage's record says the outputs are complete and unchanged
(``flows.records``), and otherwise connects to Ray, calls the stage's own entry point
(``annotate.engine.annotate``, ``training.cache.build_cache``, ``training.run.train``,
``evaluation.run.evaluate``), which resumes from whatever a killed run left, and records the
result. The heavy work, and every resume rule inside a stage, belongs to the stage's package;
what lives here is the wiring between them: which directory feeds which stage, and when a stage
can be skipped. Each returns a JSON-able summary: locations and counts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from flows.ray_session import connect
from flows.records import StageRecord, digest

logger = logging.getLogger(__name__)


def _skipped(record: StageRecord) -> dict[str, Any]:
    logger.info("%s: outputs complete and unchanged, skipped", record.stage)
    return {**record.summary, "skipped": True, "seconds": 0.0}


def _finish(
    stage: str, output: Path, inputs: str, files: list[Path], summary: dict, started: float
) -> dict[str, Any]:
    summary = {"stage": stage, **summary}
    StageRecord.make(stage, inputs, files, summary).write(output)
    return {**summary, "skipped": False, "seconds": round(time.perf_counter() - started, 2)}


# ------------------------------------------------------------------------------ annotate


def _drop_changed_shards(directory: Path) -> None:
    """Removes the listed files whose bytes no longer match the manifest (and the manifest), so
    that the engine, which trusts a shard that exists, annotates those partitions again."""
    from annotate.schema import MANIFEST_NAME, Manifest, SchemaError, file_sha256

    try:
        manifest = Manifest.read(directory)
    except SchemaError:
        return
    changed = [
        entry
        for entry in [*manifest.shards, *manifest.quarantine]
        if (directory / entry.path).is_file()
        and file_sha256(directory / entry.path) != entry.sha256
    ]
    for entry in changed:
        logger.warning("%s changed since it was written: annotating it again", entry.path)
        (directory / entry.path).unlink()
    if changed:
        (directory / MANIFEST_NAME).unlink()


def annotate_stage(
    profile: str, input: str, output: str, records: str, ray_address: str | None
) -> dict[str, Any]:
    """Annotates ``input`` into the shard dataset ``output``; a dataset already complete for
    the same inputs and annotator (manifest checksums intact) is kept as it is."""
    from annotate.config import load_config
    from annotate.engine import annotate
    from annotate.plan import Plan, partition
    from annotate.schema import MANIFEST_NAME, Manifest
    from annotate.sources import open_source

    started = time.perf_counter()
    config = load_config(profile)
    source = open_source(input)
    size = config.output.rows_per_shard
    parts = partition(list(source.items()), size)
    plan = Plan.make(source.describe(), parts, size, config.provenance())
    inputs = digest(
        {
            "plan": plan.__dict__,
            "output": str(Path(output).resolve()),
            "layout": config.output.model_dump(mode="json"),
        }
    )
    directory = Path(output)
    record = StageRecord.read(Path(records), "annotate")
    if record is not None and record.unchanged(inputs):
        return _skipped(record)
    _drop_changed_shards(directory)
    connect(ray_address)
    summary = annotate(config, source, directory)
    manifest = Manifest.read(directory)
    files = [
        directory / MANIFEST_NAME,
        *(directory / e.path for e in [*manifest.shards, *manifest.quarantine]),
    ]
    return _finish(
        "annotate",
        Path(records),
        inputs,
        files,
        {
            "output": str(directory),
            "inputs": summary.inputs,
            "processed": summary.processed,
            "rows": summary.rows,
            "quarantined": sum(summary.quarantined.values()),
            "shards": len(manifest.shards),
        },
        started,
    )


# ------------------------------------------------------------------------------ cache, train


def train_config(profile: str, shards: str, output: str):
    """The profile's ``train:`` section with the pipeline's directories: data from ``shards``,
    runs and cache under ``output`` (a ``cache_dir`` the profile names is kept)."""
    from training.config import load_train_config

    return load_train_config(profile, data=shards, output=output)


def cache_stage(profile: str, shards: str, output: str, ray_address: str | None) -> dict[str, Any]:
    """The latents and text-encoder outputs of ``shards``. The cache directory is named by a
    key over its inputs (encoder weights, augmentation, shard checksums) and exists only once
    complete, so finding it is the skip rule; otherwise the cache job runs."""
    from training.cache import build_cache, find_cache

    started = time.perf_counter()
    config = train_config(profile, shards, output)
    _, info = find_cache(config)
    if info is None:
        connect(ray_address)
        info = build_cache(config)
    return {
        "stage": "cache",
        "path": info.path,
        "key": info.key,
        "images": info.images,
        "views": info.views,
        "quarantined": info.quarantined,
        "skipped": not info.computed,
        "seconds": round(time.perf_counter() - started, 2),
    }


def run_name(name: str, cache_key: str) -> str:
    """The training run for this cache: new shards make a new run instead of resuming (and
    silently keeping) a finished run on the old ones; the same shards resume the same run."""
    return f"{name}-{cache_key[:12]}"


def train_stage(
    profile: str, shards: str, output: str, records: str, cache_key: str, ray_address: str | None
) -> dict[str, Any]:
    """Trains the adapter on the cache ``cache_key``; resumes a killed run from its latest
    checkpoint (Ray Train), and skips a finished run whose adapter is unchanged."""
    from training.run import train

    started = time.perf_counter()
    base = train_config(profile, shards, output)
    config = base.model_copy(update={"name": run_name(base.name, cache_key)})
    inputs = digest(
        {
            "trajectory": config.trajectory_digest(),
            "cache": cache_key,
            "max_steps": config.max_steps,
            "run_dir": str(config.run_dir),
        }
    )
    record = StageRecord.read(Path(records), "train")
    if record is not None and record.unchanged(inputs):
        return _skipped(record)
    connect(ray_address)
    result = train(config)
    adapter = Path(result.adapter_dir)
    return _finish(
        "train",
        Path(records),
        inputs,
        sorted(p for p in adapter.iterdir() if p.is_file()),
        {
            "run_dir": str(result.run_dir),
            "adapter": str(adapter),
            "metrics_path": str(result.metrics_path),
            "checkpoint": str(result.checkpoint_dir) if result.checkpoint_dir else None,
            "steps": result.steps,
            "loss": result.metrics.get("loss"),
            "resumed_from": result.resumed_from,
            "images": result.cache.images,
        },
        started,
    )


# ------------------------------------------------------------------------------ evaluate


def evaluate_config(profile: str, adapter: str, base: str, methods: list[str] | None):
    """The profile's ``evaluate:`` section, pointed at the adapter this pipeline trained (and
    its base, and the methods asked for) where the section has those settings."""
    from evaluation.config import EvaluateConfig

    section = yaml.safe_load(Path(profile).read_text()).get("evaluate")
    if not isinstance(section, dict):
        raise ValueError(f"config {profile} has no evaluate: section")
    fields = EvaluateConfig.model_fields
    overrides = {"adapter": adapter, "base": base, "methods": methods}
    values = {**section, **{k: v for k, v in overrides.items() if v is not None and k in fields}}
    return EvaluateConfig.model_validate(values)


def evaluate_stage(
    profile: str,
    adapter: str,
    base: str,
    output: str,
    records: str,
    methods: list[str] | None,
    ray_address: str | None,
) -> dict[str, Any]:
    """Runs the benchmark on the trained adapter into ``output``; skipped when the adapter, the
    evaluate settings and the report files are the ones recorded."""
    from evaluation.run import evaluate

    from annotate.schema import file_sha256

    started = time.perf_counter()
    config = evaluate_config(profile, adapter, base, methods)
    adapter_files = sorted(p for p in Path(adapter).iterdir() if p.is_file())
    inputs = digest(
        {
            "config": config.model_dump(mode="json"),
            "adapter": {p.name: file_sha256(p) for p in adapter_files},
            "output": str(Path(output).resolve()),
        }
    )
    record = StageRecord.read(Path(records), "evaluate")
    if record is not None and record.unchanged(inputs):
        return _skipped(record)
    connect(ray_address)
    result = evaluate(config, Path(output))
    files = [Path(result.metrics_path), Path(result.report_path)]
    return _finish(
        "evaluate",
        Path(records),
        inputs,
        [f for f in files if f.is_file()],
        {
            "output": str(result.output),
            "metrics_path": str(result.metrics_path),
            "report_path": str(result.report_path),
            "table": result.table,
            "markdown": result.markdown,
        },
        started,
    )
