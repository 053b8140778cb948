"""The evaluate stage in the pipeline, on the demo profile (the toy world: oracle annotation,
the frozen toy base, the world's exact verifiers as detector and judge), made short: the
benchmark runs on the adapter the train stage made, its results become Prefect artifacts (a
metrics table per method, a markdown summary with the report's location), and a rerun skips
every stage while still publishing them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.flows import short_demo

pytestmark = pytest.mark.slow


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
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    profile = short_demo(tmp_path / "demo-short.yaml")
    output = tmp_path / "out"
    arguments = {
        "config": str(profile),
        "input": "toy:seed=0,count=64",
        "output": str(output),
        "benchmark_input": "toy:seed=1,count=16",
    }
    state = pipeline(**arguments, return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert list(results) == ["annotate", "cache", "train", "annotate-benchmark", "evaluate"]
    evaluated = results["evaluate"]
    assert not evaluated["skipped"]
    assert Path(evaluated["metrics_path"]).is_file() and Path(evaluated["report_path"]).is_file()
    assert (output / "benchmark.json").is_file()
    names = [m["name"] for m in yaml.safe_load(profile.read_text())["evaluate"]["methods"]]
    assert evaluated["methods"] == names
    assert len(evaluated["table"]) == len(names)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    run_id = state.state_details.flow_run_id
    mine = {a.key: a for a in artifacts if a.flow_run_id == run_id}
    assert mine["ifadapter-metrics"].type == "table"
    assert mine["ifadapter-evaluation"].type == "markdown"
    assert evaluated["report_path"] in mine["ifadapter-evaluation"].data
    assert "| evaluate | ran |" in mine["ifadapter-pipeline-summary"].data

    again = pipeline(**arguments)
    assert all(stage["skipped"] for stage in again.values()), again
    assert again["evaluate"]["table"] == evaluated["table"]

    # One method, evaluated again on its own: the evaluate stage reruns (other settings).
    alone = pipeline(**arguments, methods=["ifadapter"])
    assert not alone["evaluate"]["skipped"] and alone["evaluate"]["methods"] == ["ifadapter"]
