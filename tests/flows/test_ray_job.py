"""The stages on a Ray cluster that is not the driver's own: a head started with ``ray start
--head`` (dashboard and job server on), the annotate stage submitted to it with ``ray job
submit``, and the pipeline flow joining it through ``--ray-address``."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from annotate.schema import Manifest
from tests.support.annotate_inputs import REPO, write_scenes
from tests.support.flows import BIN, flow_env, ray_head, write_profile

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("ray-head")) as started:
        yield started


@pytest.fixture
def inputs(tmp_path, tiny_models_root, base_dir):
    images = tmp_path / "images"
    write_scenes(images, 6)
    profile = write_profile(
        tmp_path / "profile.yaml", tiny_models_root / "out" / "tiny-models", base_dir
    )
    return images, profile


def test_ray_job_submit_runs_the_annotate_stage(head, inputs, tmp_path):
    images, profile = inputs
    output = tmp_path / "shards"
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}}
    started = time.perf_counter()
    result = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address={head['dashboard']}",
            f"--runtime-env-json={json.dumps(runtime_env)}",
            "--",
            str(BIN / "python"),
            "-m",
            "ifadapter.cli",
            "annotate",
            f"--config={profile}",
            f"--input={images}",
            f"--output={output}",
        ],
        cwd=REPO,
        env=flow_env(**head["env"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower(), result.stdout[-3000:]
    manifest = Manifest.read(output)
    manifest.verify(output)
    assert manifest.inputs == 6 and manifest.rows + manifest.quarantined == 6
    print(f"ray job submit (annotate, 6 images): {seconds:.1f}s")


def test_pipeline_joins_a_running_cluster(head, inputs, tmp_path):
    """``--ray-address host:port``: the flow's stages run as a driver of the existing cluster
    (the job list shows it) instead of starting a local Ray."""
    from ray.job_submission import JobSubmissionClient

    images, profile = inputs
    output = tmp_path / "pipeline"
    result = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "ifadapter.cli",
            "pipeline",
            f"--config={profile}",
            f"--input={images}",
            f"--output={output}",
            f"--ray-address={head['address']}",
            "--stages=annotate",
        ],
        cwd=REPO,
        env=flow_env(PREFECT_HOME=str(tmp_path / "prefect-home"), **head["env"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    summary = json.loads(result.stdout.split("annotate: ", 1)[1].splitlines()[0])
    assert summary["inputs"] == 6 and not summary["skipped"]
    drivers = [
        job
        for job in JobSubmissionClient(
            head["dashboard"],
            headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"},
        ).list_jobs()
        if job.type == "DRIVER" and job.status == "SUCCEEDED"
    ]
    assert any("ifadapter.cli pipeline" in (job.entrypoint or "") for job in drivers), drivers


def test_pipeline_submits_stages_as_ray_jobs(head, inputs, tmp_path):
    """``--ray-address http://head:8265``: each stage goes to the cluster as a Ray job (what a
    Prefect worker outside the cluster does); a rerun's skip happens inside the job."""
    from ray.job_submission import JobSubmissionClient

    images, profile = inputs
    output = tmp_path / "pipeline"
    command = [
        str(BIN / "python"),
        "-m",
        "ifadapter.cli",
        "pipeline",
        f"--config={profile}",
        f"--input={images}",
        f"--output={output}",
        f"--ray-address={head['dashboard']}",
        "--stages=annotate",
    ]
    env = flow_env(PREFECT_HOME=str(tmp_path / "prefect-home"), **head["env"])
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.split("annotate: ", 1)[1].splitlines()[0])
    assert summary["inputs"] == 6 and not summary["skipped"] and summary["ray_job"]
    assert Manifest.read(output / "shards").inputs == 6
    client = JobSubmissionClient(
        head["dashboard"], headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"}
    )
    info = client.get_job_info(summary["ray_job"])
    assert info.status == "SUCCEEDED" and info.metadata["ifadapter_stage"] == "annotate"

    # A stage that fails in its job fails the flow with the stage and the job's reason.
    failing = [*command[:5], f"--input={tmp_path / 'no-such-folder'}", *command[6:]]
    bad = subprocess.run(failing, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    reason = next(x for x in bad.stderr.splitlines() if x.startswith("ifadapter pipeline:"))
    assert reason.startswith("ifadapter pipeline: annotate stage failed: ValueError: SourceError")
    assert "no-such-folder" in reason and "Ray job" in reason
