"""The evaluate stage in the pipeline: the benchmark runs on the adapter the train stage made,
its results become Prefect artifacts (a metrics table per method, a markdown summary with the
report's location), and a rerun skips it while still publishing them.

Runs once ``evaluation.run`` (the evaluate stage) and ``configs/demo.yaml`` (the toy world,
with its ``evaluate:`` section) are on the branch; skipped before. The demo's input is the one
the ``demo`` deployment of prefect.yaml names, the training made short here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from tests.annotate_inputs import REPO

DEMO = REPO / "configs" / "demo.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("evaluation.run") is None or not DEMO.is_file(),
        reason="needs the evaluate stage (evaluation.run) and configs/demo.yaml",
    ),
]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def test_pipeline_evaluates_and_publishes_artifacts(prefect_api, tmp_path, monkeypatch):
    from prefect import get_client

    from flows.pipeline import pipeline

    monkeypatch.setenv("IFADAPTER_RAY_CPUS", "2")
    profile = yaml.safe_load(DEMO.read_text())
    profile["train"].update({"max_steps": 4, "checkpoint_every": 2, "log_every": 1})
    short = tmp_path / "demo-short.yaml"
    short.write_text(yaml.safe_dump(profile, sort_keys=False))
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    demo_input = next(d for d in deployments if d["name"] == "demo")["parameters"]["input"]
    output = tmp_path / "out"

    state = pipeline(config=str(short), input=demo_input, output=str(output), return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    evaluated = results["evaluate"]
    assert not evaluated["skipped"]
    assert (output / "eval").is_dir()
    for key in ("metrics_path", "report_path"):
        assert Path(evaluated[key]).is_file(), evaluated[key]
    assert evaluated["table"] and all(isinstance(row, dict) for row in evaluated["table"])

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    mine = {a.key: a for a in artifacts if a.flow_run_id == state.state_details.flow_run_id}
    assert mine["ifadapter-metrics"].type == "table"
    assert mine["ifadapter-evaluation"].type == "markdown"
    assert evaluated["report_path"] in mine["ifadapter-evaluation"].data
    assert "ifadapter-pipeline-summary" in mine

    again = pipeline(config=str(short), input=demo_input, output=str(output))
    assert all(stage["skipped"] for stage in again.values())
    assert again["evaluate"]["table"] == evaluated["table"]
