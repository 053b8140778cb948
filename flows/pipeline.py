"""Prefect 3 flows: one per stage, and ``ifadapter-pipeline``, the DAG annotate -> cache ->
train -> evaluate.

Every task is a thin wrapper over a function of ``flows.stages`` (skip when complete, else
connect to Ray and run the stage's own entry point) and returns locations and counts. Tasks
retry with exponential back-off, but only on failures a second attempt can cure (a lost Ray
node, a dropped connection): bad input (``ValueError``: a config fault, a dataset that does not
follow the contract, a plan that does not match the directory) fails at once. A failed stage
fails the flow run with a state message that names the stage and the reason. Evaluation
results are published as artifacts: a table of metrics per method and a markdown summary with
the report's location; every pipeline run also publishes a summary of its stages.

``run_pipeline`` runs the pipeline from plain Python (the ``ifadapter pipeline`` command, the
demo): it checks the parameters first, then runs the flow against the Prefect API configured
(``PREFECT_API_URL``), or Prefect's temporary local server when there is none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows import stages
from flows.params import PipelineParams, check_params
from flows.ray_jobs import is_job_address, run_stage_job
from flows.ray_session import ray_scope

PIPELINE_FLOW = "ifadapter-pipeline"
RETRIES = int(os.environ.get("IFADAPTER_TASK_RETRIES", "2"))
BACKOFF_S = float(os.environ.get("IFADAPTER_RETRY_BACKOFF_S", "10"))
# Faults a retry repeats identically: bad configs, inputs or datasets, missing files or code.
ANSI = re.compile(r"\x1b\[[0-9;]*m")
FINAL_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, KeyError)


class StageFailed(RuntimeError):
    """A stage of the pipeline failed; the message names it and says why (the flow run's
    state message shows it)."""

    def __init__(self, stage: str, error: BaseException) -> None:
        # A Ray task's error wraps the worker's exception (``cause``) in a traceback dump.
        while getattr(error, "cause", None) is not None and error.cause is not error:
            error = error.cause
        lines = [line.strip() for line in ANSI.sub("", str(error)).splitlines() if line.strip()]
        # A Ray error that carries no cause ends its dump with the worker's exception line.
        ray_dump = type(error).__module__.startswith("ray.")
        reason = (lines[-1] if ray_dump else lines[0]) if lines else ""
        super().__init__(f"{stage} stage failed: {type(error).__name__}: {reason}")
        self.stage = stage


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry unless the failure is one a retry would repeat."""
    try:
        state.result()
    except FINAL_ERRORS:
        return False
    except Exception:
        return True
    return False


def _call(stage: str, ray_address: str | None, /, **arguments: Any) -> dict[str, Any]:
    """The stage in this process (joining ``ray_address`` or a local Ray), or, for a job
    server address (``http://head:8265``), as a Ray job on the cluster (``flows.ray_jobs``)."""
    if is_job_address(ray_address):
        return run_stage_job(ray_address, stage, arguments)
    try:
        return getattr(stages, f"{stage}_stage")(**arguments, ray_address=ray_address)
    except FINAL_ERRORS:
        raise
    except Exception as error:
        # A retry after a lost head or raylet needs a new connection, not the dead one.
        import ray

        if isinstance(error, ray.exceptions.RayError | ConnectionError):
            ray.shutdown()
        raise


def _stage_task(name: str):
    return task(
        name=name,
        retries=RETRIES,
        retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_S),
        retry_condition_fn=transient,
        cache_policy=NO_CACHE,  # completion is judged from the files (flows.records)
        # The stages report through their progress bars and return their counts; what the
        # libraries inside them print (pycocotools' AP table, for one) stays out of the run log.
        log_prints=False,
    )


@_stage_task("annotate")
def annotate_task(
    config: str, input: str, shards: str, records: str, ray_address: str | None
) -> dict[str, Any]:
    """Annotates ``input`` into the shard dataset ``shards`` (Ray Data job)."""
    return _call(
        "annotate", ray_address, profile=config, input=input, output=shards, records=records
    )


@_stage_task("cache")
def cache_task(config: str, shards: str, train_dir: str, ray_address: str | None) -> dict:
    """Caches latents and text-encoder outputs of ``shards`` (Ray Data job)."""
    return _call("cache", ray_address, profile=config, shards=shards, output=train_dir)


@_stage_task("train")
def train_task(
    config: str,
    shards: str,
    train_dir: str,
    records: str,
    cache_key: str,
    ray_address: str | None,
) -> dict[str, Any]:
    """Trains the adapter on the cache (Ray Train job)."""
    return _call(
        "train",
        ray_address,
        profile=config,
        shards=shards,
        output=train_dir,
        records=records,
        cache_key=cache_key,
    )


@_stage_task("annotate-benchmark")
def annotate_benchmark_task(
    config: str, input: str, shards: str, records: str, ray_address: str | None
) -> dict[str, Any]:
    """Annotates the benchmark's layouts (held-out inputs) into their own shard dataset."""
    return _call(
        "annotate",
        ray_address,
        profile=config,
        input=input,
        output=shards,
        records=records,
        stage="annotate-benchmark",
    )


@_stage_task("evaluate")
def evaluate_task(
    config: str,
    adapter: str,
    eval_dir: str,
    records: str,
    methods: list[str] | None,
    ray_address: str | None,
    benchmark_shards: str | None = None,
    benchmark_file: str | None = None,
) -> dict[str, Any]:
    """Runs the IFG benchmark on the trained adapter (and the profile's other methods)."""
    return _call(
        "evaluate",
        ray_address,
        profile=config,
        adapter=adapter,
        output=eval_dir,
        records=records,
        methods=methods,
        benchmark_shards=benchmark_shards,
        benchmark_file=benchmark_file,
    )


# ------------------------------------------------------------------------------ artifacts


def publish_evaluation(result: dict[str, Any]) -> None:
    """The evaluation's metrics table and markdown summary (with the report's location)."""
    if result.get("table"):
        create_table_artifact(
            table=result["table"],
            key="ifadapter-metrics",
            description=f"IFG metrics per method ({result['metrics_path']})",
        )
    markdown = (result.get("markdown") or "").rstrip()
    create_markdown_artifact(
        markdown=f"{markdown}\n\n**Report:** `{result['report_path']}`  \n"
        f"**Metrics:** `{result['metrics_path']}`\n",
        key="ifadapter-evaluation",
        description="IFG benchmark summary",
    )


def publish_summary(params: PipelineParams, results: dict[str, dict[str, Any]]) -> None:
    """One markdown table: what each stage did (ran or skipped), where its output is, counts."""
    locations = {"annotate": "output", "cache": "path", "train": "adapter", "evaluate": "output"}
    locations["annotate-benchmark"] = "output"
    counts = {
        "annotate": ("inputs", "processed", "rows", "quarantined"),
        "cache": ("images", "views", "quarantined"),
        "train": ("steps", "loss", "resumed_from"),
        "evaluate": ("methods",),
    }
    counts["annotate-benchmark"] = counts["annotate"]
    lines = [
        f"# IFAdapter pipeline: `{params.output}`",
        "",
        f"Profile `{params.config}`, Ray `{params.ray_address or 'local'}`.",
        "",
        "| stage | ran | seconds | output | counts |",
        "|---|---|---|---|---|",
    ]
    for stage, result in results.items():
        detail = ", ".join(f"{k} {result.get(k)}" for k in counts[stage] if k in result)
        ran = "skipped" if result.get("skipped") else "ran"
        lines.append(
            f"| {stage} | {ran} | {result.get('seconds', '')} | "
            f"`{result.get(locations[stage], '')}` | {detail or result.get('reason', '')} |"
        )
    create_markdown_artifact(
        markdown="\n".join(lines) + "\n",
        key="ifadapter-pipeline-summary",
        description="stages of this pipeline run",
    )


# ------------------------------------------------------------------------------ flows


def _run(stage: str, call, *args: Any) -> dict[str, Any]:
    """Calls a stage task; a failure becomes ``StageFailed`` naming the stage."""
    logger = get_run_logger()
    try:
        result = call(*args)
    except Exception as error:
        raise StageFailed(stage, error) from error
    verb = "skipped (complete and unchanged)" if result.get("skipped") else "done"
    logger.info("%s %s: %s", stage, verb, {k: v for k, v in result.items() if k != "markdown"})
    return result


def run_stages(params: PipelineParams) -> dict[str, dict[str, Any]]:
    """The DAG: each stage's outputs are the next one's inputs; returns each stage's summary."""
    chosen = params.chosen()
    records = str(params.out)
    shards = str(params.shards_dir)
    train_dir = str(params.train_dir)
    results: dict[str, dict[str, Any]] = {}
    with ray_scope():
        if "annotate" in chosen:
            results["annotate"] = _run(
                "annotate",
                annotate_task,
                params.config,
                params.input,
                shards,
                records,
                params.ray_address,
            )
        if "cache" in chosen or "train" in chosen:
            cache = _run("cache", cache_task, params.config, shards, train_dir, params.ray_address)
            if "cache" in chosen:
                results["cache"] = cache
        if "train" in chosen:
            results["train"] = _run(
                "train",
                train_task,
                params.config,
                shards,
                train_dir,
                records,
                cache["key"],
                params.ray_address,
            )
        if "evaluate" in chosen:
            results.update(_run_evaluate(params, results.get("train")))
    return results


def _run_evaluate(
    params: PipelineParams, trained: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """The benchmark's annotation when asked for, then the evaluation and its artifacts."""
    if trained is None:
        # Evaluation alone: the adapter of the latest train stage recorded under this output.
        from flows.records import StageRecord

        record = StageRecord.read(params.out, "train")
        if record is None:
            raise StageFailed(
                "evaluate", ValueError(f"{params.output} holds no trained adapter: run train")
            )
        trained = record.summary
    results: dict[str, dict[str, Any]] = {}
    benchmark: dict[str, str] = {}
    if params.benchmark_input:
        results["annotate-benchmark"] = _run(
            "annotate-benchmark",
            annotate_benchmark_task,
            params.config,
            params.benchmark_input,
            str(params.benchmark_shards),
            str(params.out),
            params.ray_address,
        )
        benchmark = {
            "benchmark_shards": str(params.benchmark_shards),
            "benchmark_file": str(params.benchmark_file),
        }
    results["evaluate"] = _run(
        "evaluate",
        evaluate_task,
        params.config,
        trained["adapter"],
        str(params.eval_dir),
        str(params.out),
        params.methods,
        params.ray_address,
        *benchmark.values(),
    )
    publish_evaluation(results["evaluate"])
    return results


@flow(name=PIPELINE_FLOW, log_prints=True)
def pipeline(
    config: str,
    input: str | None = None,
    output: str = "out/pipeline",
    ray_address: str | None = None,
    methods: list[str] | None = None,
    stages: list[str] | None = None,
    shards: str | None = None,
    benchmark_input: str | None = None,
) -> dict[str, dict[str, Any]]:
    """annotate -> cache -> train -> evaluate on one profile; stages whose outputs are complete
    and unchanged are skipped, the others run (and resume what a killed run left)."""
    params = check_params(
        config=config,
        input=input,
        output=output,
        ray_address=ray_address,
        methods=methods,
        stages=stages,
        shards=shards,
        benchmark_input=benchmark_input,
    )
    Path(params.output).mkdir(parents=True, exist_ok=True)
    results = run_stages(params)
    publish_summary(params, results)
    return results


@flow(name="ifadapter-annotate", log_prints=True)
def annotate_flow(
    config: str, input: str, output: str = "out/pipeline", ray_address: str | None = None
) -> dict[str, Any]:
    """The annotate stage alone: ``input`` into ``<output>/shards``."""
    params = check_params(
        config=config, input=input, output=output, ray_address=ray_address, stages=["annotate"]
    )
    return run_stages(params)["annotate"]


@flow(name="ifadapter-cache", log_prints=True)
def cache_flow(
    config: str,
    output: str = "out/pipeline",
    shards: str | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """The cache stage alone, over ``shards`` (default ``<output>/shards``)."""
    params = check_params(
        config=config, output=output, shards=shards, ray_address=ray_address, stages=["cache"]
    )
    return run_stages(params)["cache"]


@flow(name="ifadapter-train", log_prints=True)
def train_flow(
    config: str,
    output: str = "out/pipeline",
    shards: str | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """The train stage alone (its cache built or found first), over ``shards``."""
    params = check_params(
        config=config, output=output, shards=shards, ray_address=ray_address, stages=["train"]
    )
    return run_stages(params)["train"]


@flow(name="ifadapter-evaluate", log_prints=True)
def evaluate_flow(
    config: str,
    output: str = "out/pipeline",
    methods: list[str] | None = None,
    ray_address: str | None = None,
    benchmark_input: str | None = None,
) -> dict[str, Any]:
    """The evaluate stage alone, on the adapter the last train stage under ``output`` made."""
    params = check_params(
        config=config,
        output=output,
        methods=methods,
        ray_address=ray_address,
        stages=["evaluate"],
        benchmark_input=benchmark_input,
    )
    return run_stages(params)["evaluate"]


def run_pipeline(
    config: str | Path,
    input: str | None = None,
    output: str | Path = "out/pipeline",
    ray_address: str | None = None,
    methods: list[str] | None = None,
    stages: list[str] | None = None,
    shards: str | Path | None = None,
    benchmark_input: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs ``ifadapter-pipeline`` from plain Python and returns each stage's summary.

    Raises ``ValueError`` (one line) on bad parameters before Prefect starts, and
    ``StageFailed`` naming the stage when one fails."""
    values = {
        "config": str(config),
        "input": None if input is None else str(input),
        "output": str(output),
        "ray_address": ray_address,
        "methods": methods,
        "stages": stages,
        "shards": None if shards is None else str(shards),
        "benchmark_input": benchmark_input,
    }
    check_params(**values)
    return pipeline(**values)
