"""A stage as a Ray job: for a Prefect worker that is not a node of the Ray cluster.

With ``ray_address`` set to the cluster's dashboard (``http://head:8265``), a task does not run
the stage in its own process: it submits ``python -m flows.ray_jobs STAGE ARGS`` through Ray's
job server, so the stage's driver runs on the head node, next to the cluster, and the Prefect
worker only waits (this is what ``ray job submit`` does). The job runs the same stage function
as a local run, with ``ray_address="auto"`` (the cluster it runs in); it prints its summary on
its last line, which the task reads back from the job's logs. Paths go absolute, so they must
be on storage the head node sees (the shared volume of infra/).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from flows import stages
from flows.stages import FINAL_ERRORS

RESULT = "IFADAPTER_STAGE_RESULT "
ERROR = "IFADAPTER_STAGE_ERROR "
# The submitting environment's settings a job needs as well (offline hub, thread counts).
FORWARDED = ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_HOME", "OMP_NUM_THREADS", "VLLM_API_KEY")
PATH_ARGUMENTS = {"profile", "input", "output", "records", "shards", "adapter", "base"}


def _absolute(name: str, value: Any) -> Any:
    if name in PATH_ARGUMENTS and isinstance(value, str) and "://" not in value:
        return str(Path(value).resolve())
    return value


class StageJobFailed(RuntimeError):
    """The stage's Ray job failed for a reason a retry may cure (a lost node, a stopped job)."""


def run_stage_job(
    address: str, stage: str, arguments: dict[str, Any], poll_s: float = 1.0
) -> dict[str, Any]:
    """Submits the stage to the job server at ``address`` and waits; returns its summary.

    A fault the stage reports as bad input comes back as ``ValueError`` (not retried)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    arguments = {k: _absolute(k, v) for k, v in arguments.items()}
    env = {name: os.environ[name] for name in FORWARDED if name in os.environ}
    client = JobSubmissionClient(address)
    job = client.submit_job(
        entrypoint=f"{shlex.quote(sys.executable if _same_image() else 'python')} -m "
        f"flows.ray_jobs {stage} {shlex.quote(json.dumps(arguments))}",
        runtime_env={"env_vars": env} if env else None,
        metadata={"ifadapter_stage": stage},
    )
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job)) not in terminal:
        time.sleep(poll_s)
    lines = client.get_job_logs(job).splitlines()
    for line in reversed(lines):
        if status == JobStatus.SUCCEEDED and line.startswith(RESULT):
            return {**json.loads(line[len(RESULT) :]), "ray_job": job}
        if line.startswith(ERROR):
            fault = json.loads(line[len(ERROR) :])
            kind = ValueError if fault["final"] else StageJobFailed
            raise kind(f"{fault['type']}: {fault['message']} (Ray job {job})")
    tail = next((line for line in reversed(lines) if line.strip()), "")
    raise StageJobFailed(f"Ray job {job} {status.value}: {tail}")


def _same_image() -> bool:
    """Whether the job server's nodes have this interpreter (the same image or machine);
    set IFADAPTER_JOB_PYTHON=python to use the head's own ``python`` instead."""
    return os.environ.get("IFADAPTER_JOB_PYTHON", "same") == "same"


def main(argv: list[str]) -> int:
    """The job's entry point: ``python -m flows.ray_jobs STAGE JSON``."""
    stage, arguments = argv[0], json.loads(argv[1])
    function = getattr(stages, f"{stage}_stage")
    try:
        result = function(**arguments, ray_address="auto")
    except Exception as error:
        traceback.print_exc()
        fault = {
            "type": type(error).__name__,
            "message": str(error).strip().splitlines()[0] if str(error).strip() else "",
            "final": isinstance(error, FINAL_ERRORS),
        }
        print(ERROR + json.dumps(fault), flush=True)
        return 1
    print(RESULT + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
