"""The four stages as plain functions the Prefect tasks wrap: skip when complete, else run.

Each function works out the digest of what its stage's result depends on, returns the recorded
summary when the stage's record says the outputs are complete and unchanged
(``flows.stage_records``), and otherwise connects to Ray, calls the stage's own entry point
(``annotate.engine.job.annotate``, ``training.cache.build_cache``, ``training.run.train``,
``evaluation.run.evaluate``), which resumes from whatever a killed run left, and records the
result. The heavy work, and every resume rule inside a stage, belongs to the stage's package;
what lives here is the wiring between them: which directory feeds which stage, and when a stage
can be skipped. Each returns a JSON-able summary: locations and counts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from annotate.ray_session import connect
from flows.stage_records import StageRecord
from ifadapter.utils.files import file_sha256, json_sha256
from ifadapter.utils.profiles import profile_section

logger = logging.getLogger(__name__)

# What a stage raises for a fault a retry repeats identically: bad configs, inputs or datasets,
# missing files or code. Anything else (a lost Ray node, a dropped connection) may pass later.
FINAL_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, KeyError)


def _skipped(record: StageRecord) -> dict[str, Any]:
    logger.info("%s: outputs complete and unchanged, skipped", record.stage)
    return {**record.summary, "skipped": True, "seconds": 0.0}


def plain(value: Any) -> Any:
    """JSON's own types for a summary (numpy scalars in a metrics table become numbers)."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _finish(
    stage: str, output: Path, inputs: str, files: list[Path], summary: dict, started: float
) -> dict[str, Any]:
    summary = json.loads(json.dumps({"stage": stage, **summary}, default=plain))
    StageRecord.make(stage, inputs, files, summary).write(output)
    return {**summary, "skipped": False, "seconds": round(time.perf_counter() - started, 2)}


# ------------------------------------------------------------------------------ annotate


def _drop_changed_shards(directory: Path) -> None:
    """Removes the listed files whose bytes no longer match the manifest (and the manifest), so
    that the engine, which trusts a shard that exists, annotates those partitions again."""
    from annotate.schema import MANIFEST_NAME, Manifest, SchemaError

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
    profile: str,
    input: str,
    output: str,
    records: str,
    ray_address: str | None,
    stage: str = "annotate",
) -> dict[str, Any]:
    """Annotates ``input`` into the shard dataset ``output``; a dataset already complete for
    the same inputs and annotator (manifest checksums intact) is kept as it is. ``stage``
    names the record (the benchmark's layouts are annotated as ``annotate-benchmark``)."""
    from annotate.config import load_config
    from annotate.engine.job import annotate
    from annotate.engine.plan import Plan, partition
    from annotate.schema import MANIFEST_NAME, Manifest
    from annotate.sources import open_source

    started = time.perf_counter()
    config = load_config(profile)
    source = open_source(input)
    size = config.output.rows_per_shard
    parts = partition(list(source.items()), size)
    plan = Plan.make(source.describe(), parts, size, config.provenance())
    inputs = json_sha256(
        {
            "plan": plan.__dict__,
            "output": str(Path(output).resolve()),
            "layout": config.output.model_dump(mode="json"),
        }
    )
    directory = Path(output)
    record = StageRecord.read(Path(records), stage)
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
        stage,
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
        info = build_cache(config, progress=True)
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
    inputs = json_sha256(
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
    result = train(config, progress=True)
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


def evaluate_config(
    profile: str,
    adapter: str,
    methods: list[str] | None,
    benchmark_shards: str | None = None,
    benchmark_file: str | None = None,
):
    """The profile's ``evaluate:`` section for this pipeline: every method whose runner is
    ``ifadapter`` evaluates the adapter the train stage made; ``methods`` keeps those methods
    only (in the profile's order); ``benchmark_shards``/``benchmark_file`` put the benchmark
    built from layouts this pipeline annotated under its output."""
    from evaluation.config import parse_config

    section = json.loads(json.dumps(profile_section(profile, "evaluate")))  # a copy to edit
    listed = [m for m in section.get("methods", []) if isinstance(m, dict)]
    if methods is not None:
        names = [m.get("name") for m in listed]
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise ValueError(f"methods {unknown} are not in {profile}'s evaluate: ({names})")
        listed = [m for m in listed if m.get("name") in methods]
    for method in listed:
        if method.get("runner") == "ifadapter":
            method["adapter"] = adapter
    section["methods"] = listed
    if benchmark_shards is not None:
        section["benchmark"] = {**section.get("benchmark", {}), "shards": benchmark_shards}
    if benchmark_file is not None:
        section["benchmark"] = {**section.get("benchmark", {}), "file": benchmark_file}
    return parse_config(section, str(profile))


def evaluate_stage(
    profile: str,
    adapter: str,
    output: str,
    records: str,
    methods: list[str] | None,
    ray_address: str | None,
    benchmark_shards: str | None = None,
    benchmark_file: str | None = None,
) -> dict[str, Any]:
    """Runs the benchmark on the trained adapter into ``output``; skipped when the adapter, the
    evaluate settings, the benchmark and the report files are the ones recorded (the
    evaluation also resumes by itself: images and scores already made are kept)."""
    from evaluation.run import evaluate

    started = time.perf_counter()
    config = evaluate_config(profile, adapter, methods, benchmark_shards, benchmark_file)
    adapter_files = sorted(p for p in Path(adapter).iterdir() if p.is_file())
    benchmark = Path(config.benchmark.file)

    def current() -> str:
        return json_sha256(
            {
                "config": config.model_dump(mode="json"),
                "adapter": {p.name: file_sha256(p) for p in adapter_files},
                "benchmark": file_sha256(benchmark) if benchmark.is_file() else None,
                "output": str(Path(output).resolve()),
            }
        )

    inputs = current()
    record = StageRecord.read(Path(records), "evaluate")
    if record is not None and record.unchanged(inputs):
        return _skipped(record)
    connect(ray_address)
    result = evaluate(config, Path(output), progress=True)
    inputs = current()  # with the benchmark a first run built, as a rerun will see it
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
            "methods": [m.name for m in config.methods],
            "seconds_by_stage": {k: round(v, 2) for k, v in result.timings.items()},
        },
        started,
    )
