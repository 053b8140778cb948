"""Prefect 3 flows: one per stage, and ``ifadapter-pipeline``, the DAG annotate -> cache ->
train -> evaluate.

Every stage runs as ``stage_task`` under the stage's name, a thin wrapper over the stage's
function of ``flows.stages`` (skip when complete, else connect to Ray and run the stage's own
entry point), and returns locations and counts. Tasks
retry with exponential back-off, but only on failures a second attempt can cure (a lost Ray
node, a dropped connection): bad input (``ValueError``: a config fault, a dataset that does not
follow the contract, a plan that does not match the directory) fails at once. A failed stage
fails the flow run with a state message that names the stage and the reason. Evaluation
results are published as artifacts: a table of metrics per method and a markdown summary with
the report's location; every pipeline run also publishes a summary of its stages.

``run_pipeline`` runs the pipeline from plain Python (the ``ifadapter pipeline`` command, the
demo): it checks the parameters first, then runs the flow against the Prefect API configured
(``PREFECT_API_URL``), or Prefect's temporary local server when there is none.

The pipeline flow's signature is the one definition of the parameters: each one-stage flow takes
some of them (``STAGE_FLOWS``) and ``run_pipeline`` takes them all, with the same defaults.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from annotate.ray_session import is_job_address, ray_scope
from flows import stages
from flows.params import PipelineParams, check_params
from flows.ray_jobs import run_stage_job
from flows.stage_records import StageRecord
from flows.stages import FINAL_ERRORS

PIPELINE_FLOW = "ifadapter-pipeline"
RETRIES = int(os.environ.get("IFADAPTER_TASK_RETRIES", "2"))
BACKOFF_S = float(os.environ.get("IFADAPTER_RETRY_BACKOFF_S", "10"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")


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


@task(
    name="stage",
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_S),
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,  # completion is judged from the files (flows.stage_records)
    # The stages report through their progress bars and return their counts; what the
    # libraries inside them print (pycocotools' AP table, for one) stays out of the run log.
    log_prints=False,
)
def stage_task(stage: str, ray_address: str | None, arguments: dict[str, Any]) -> dict[str, Any]:
    """``flows.stages.<stage>_stage(**arguments)`` in this process (joining ``ray_address`` or
    a local Ray), or, for a job server address (``http://head:8265``), as a Ray job on the
    cluster (``flows.ray_jobs``). The stage functions' signatures are the arguments' one
    definition."""
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


def _run(name: str, params: PipelineParams, **arguments: Any) -> dict[str, Any]:
    """Runs the stage task ``name`` (``annotate-benchmark`` is the annotate stage under its own
    record); a failure becomes ``StageFailed`` naming the stage."""
    logger = get_run_logger()
    stage = "annotate" if name == "annotate-benchmark" else name
    if name != stage:
        arguments["stage"] = name
    try:
        result = stage_task.with_options(name=name)(stage, params.ray_address, arguments)
    except Exception as error:
        raise StageFailed(name, error) from error
    verb = "skipped (complete and unchanged)" if result.get("skipped") else "done"
    logger.info("%s %s: %s", name, verb, {k: v for k, v in result.items() if k != "markdown"})
    return result


def run_stages(params: PipelineParams) -> dict[str, dict[str, Any]]:
    """The DAG: each stage's outputs are the next one's inputs; returns each stage's summary."""
    chosen = params.chosen()
    common = {"profile": params.config, "records": str(params.out)}
    shards = str(params.shards_dir)
    train_dir = str(params.train_dir)
    results: dict[str, dict[str, Any]] = {}
    with ray_scope():
        if "annotate" in chosen:
            results["annotate"] = _run(
                "annotate", params, **common, input=params.input, output=shards
            )
        if "cache" in chosen or "train" in chosen:
            cache = _run("cache", params, profile=params.config, shards=shards, output=train_dir)
            if "cache" in chosen:
                results["cache"] = cache
        if "train" in chosen:
            results["train"] = _run(
                "train", params, **common, shards=shards, output=train_dir, cache_key=cache["key"]
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
        record = StageRecord.read(params.out, "train")
        if record is None:
            raise StageFailed(
                "evaluate", ValueError(f"{params.output} holds no trained adapter: run train")
            )
        trained = record.summary
    common = {"profile": params.config, "records": str(params.out)}
    results: dict[str, dict[str, Any]] = {}
    benchmark: dict[str, str] = {}
    if params.benchmark_input:
        results["annotate-benchmark"] = _run(
            "annotate-benchmark",
            params,
            **common,
            input=params.benchmark_input,
            output=str(params.benchmark_shards),
        )
        benchmark = {
            "benchmark_shards": str(params.benchmark_shards),
            "benchmark_file": str(params.benchmark_file),
        }
    results["evaluate"] = _run(
        "evaluate",
        params,
        **common,
        adapter=trained["adapter"],
        output=str(params.eval_dir),
        methods=params.methods,
        **benchmark,
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
    params = check_params(**locals())  # here, exactly the parameters
    Path(params.output).mkdir(parents=True, exist_ok=True)
    results = run_stages(params)
    publish_summary(params, results)
    return results


PIPELINE_PARAMETERS = inspect.signature(pipeline.fn)


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name, defaults filled in (``TypeError`` as Python's own call)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


# Each one-stage flow: the pipeline parameters it takes, in order, and those it cannot do without
# (the rest keep the pipeline's defaults).
STAGE_FLOWS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "annotate": (("config", "input", "output", "ray_address"), ("config", "input")),
    "cache": (("config", "output", "shards", "ray_address"), ("config",)),
    "train": (("config", "output", "shards", "ray_address"), ("config",)),
    "evaluate": (("config", "output", "methods", "ray_address", "benchmark_input"), ("config",)),
}


def one_stage_flow(stage: str, description: str) -> Flow:
    """The flow ``ifadapter-<stage>``: that stage alone (through the pipeline's DAG, so the
    train stage finds or builds its cache first), taking ``STAGE_FLOWS[stage]``'s parameters."""
    names, required = STAGE_FLOWS[stage]
    parameters = [PIPELINE_PARAMETERS.parameters[name] for name in names]
    signature = PIPELINE_PARAMETERS.replace(
        parameters=[
            p.replace(default=inspect.Parameter.empty) if p.name in required else p
            for p in parameters
        ],
        return_annotation="dict[str, Any]",
    )

    def run_one_stage(*args: Any, **kwargs: Any) -> dict[str, Any]:
        values = _bind(signature, args, kwargs)
        return run_stages(check_params(**values, stages=[stage]))[stage]

    run_one_stage.__signature__ = signature  # what Prefect reads: names, types, defaults
    run_one_stage.__name__ = run_one_stage.__qualname__ = f"{stage}_flow"
    run_one_stage.__doc__ = description
    return flow(name=f"ifadapter-{stage}", log_prints=True)(run_one_stage)


annotate_flow = one_stage_flow(
    "annotate", "The annotate stage alone: ``input`` into ``<output>/shards``."
)
cache_flow = one_stage_flow(
    "cache", "The cache stage alone, over ``shards`` (default ``<output>/shards``)."
)
train_flow = one_stage_flow(
    "train", "The train stage alone (its cache built or found first), over ``shards``."
)
evaluate_flow = one_stage_flow(
    "evaluate",
    "The evaluate stage alone, on the adapter the last train stage under ``output`` made.",
)


def run_pipeline(*args: Any, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Runs ``ifadapter-pipeline`` from plain Python and returns each stage's summary; takes
    the pipeline flow's parameters (paths may be ``Path`` objects).

    Raises ``ValueError`` (one line) on bad parameters before Prefect starts, and
    ``StageFailed`` naming the stage when one fails."""
    values = _bind(PIPELINE_PARAMETERS, args, kwargs)
    values = {name: str(v) if isinstance(v, Path) else v for name, v in values.items()}
    check_params(**values)
    return pipeline(**values)


run_pipeline.__signature__ = PIPELINE_PARAMETERS
