"""End to end through Prefect's real machinery: ``prefect server start`` on 127.0.0.1, a process
work pool, ``prefect deploy --all`` from prefect.yaml, a ``prefect worker`` and ``prefect
deployment run 'ifadapter-pipeline/demo'`` (with the short test profile as its parameters).
The test starts and stops the server and the worker itself, checks that the run completed, that
its artifacts exist, that a run with a bad input fails with a state naming the stage, and that
the scheduled retraining deployment carries its cron schedule."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.annotate_inputs import REPO
from tests.support.flows import BIN, api, prefect_server, short_demo, start, stop, tail

POOL = "ifadapter"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

pytestmark = pytest.mark.slow


def prefect(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def run_deployment(env: dict[str, str], name: str, **params: str) -> str:
    """``prefect deployment run NAME --param k=v ...``; returns the flow run's id."""
    flags = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    output = prefect(env, "deployment", "run", name, *flags)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def wait_state(url: str, run_id: str, timeout: float, log: Path) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = api(url, f"/flow_runs/{run_id}")["state"]
        if state["type"] in TERMINAL:
            return state
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} still {state['type']} after {timeout}s:\n{tail(log)}")


def test_deployment_run_end_to_end(tmp_path):
    """The demo deployment on the demo profile, made short (tests/flows_support.short_demo)."""
    profile = short_demo(tmp_path / "demo-short.yaml")
    output = tmp_path / "pipeline"
    timings = {}
    started = time.perf_counter()
    with prefect_server(tmp_path / "prefect-home") as (url, env):
        timings["server start"] = time.perf_counter() - started
        prefect(env, "work-pool", "create", POOL, "--type", "process")
        prefect(env, "deploy", "--all")
        deployments = {
            d["name"]: d
            for d in api(url, "/deployments/filter", {"limit": 50})  # type: ignore[union-attr]
        }
        assert {"demo", "sdxl", "retrain"} <= set(deployments)
        schedules = deployments["retrain"]["schedules"]
        assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * 1"]

        log = tmp_path / "worker.log"
        worker = start([str(BIN / "prefect"), "worker", "start", "--pool", POOL], log, env)
        try:
            started = time.perf_counter()
            bad = run_deployment(
                env,
                "ifadapter-pipeline/demo",
                config=str(profile),
                input=str(tmp_path / "no-such-folder"),
                output=str(tmp_path / "bad"),
            )
            good = run_deployment(
                env,
                "ifadapter-pipeline/demo",
                config=str(profile),
                input="toy:seed=0,count=64",
                benchmark_input="toy:seed=1,count=16",
                output=str(output),
            )
            state = wait_state(url, good, 600, log)
            timings["deployment run"] = time.perf_counter() - started
            assert state["type"] == "COMPLETED", f"{state}\n{tail(log, 80)}"
            failed = wait_state(url, bad, 120, log)
        finally:
            stop(worker)

        # A deployment run's parameters come from the UI or --param: the flow checks them before
        # any stage starts, and the run fails with the fault in its state message.
        assert failed["type"] == "FAILED"
        assert "invalid pipeline parameters: input:" in failed["message"], failed
        assert "no-such-folder is not an image folder" in failed["message"], failed

        artifacts = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [good]}}})
        keys = {a["key"]: a for a in artifacts}  # type: ignore[union-attr]
        summary = keys["ifadapter-pipeline-summary"]["data"]
        stages = ("annotate", "cache", "train", "annotate-benchmark", "evaluate")
        for stage in stages:
            assert f"| {stage} | ran |" in summary, summary
        assert keys["ifadapter-metrics"]["type"] == "table"
        methods = {row["method"] for row in json.loads(keys["ifadapter-metrics"]["data"])}
        assert {"base", "ifadapter", "real"} <= methods
        assert "report" in keys["ifadapter-evaluation"]["data"].lower()
        tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [good]}}})
        assert {t["name"].rsplit("-", 1)[0]: t["state"]["type"] for t in tasks} == dict.fromkeys(  # type: ignore[union-attr]
            stages, "COMPLETED"
        )
    assert (output / "shards" / "_manifest.json").is_file()
    assert list(output.glob("train/*/adapter/ifadapter.safetensors"))
    assert (output / "eval" / "metrics.json").is_file()
    print({k: round(v, 1) for k, v in timings.items()})
