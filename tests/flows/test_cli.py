"""``ifadapter pipeline``: parameters are checked before Prefect or Ray start, and every fault
is one line with exit status 2; the flows carry the names the deployments use."""

from __future__ import annotations

import pytest

from flows.params import check_params
from ifadapter.cli import main
from tests.support.annotate_inputs import TINY_PROFILE

BASE = ["--config", str(TINY_PROFILE), "--output", "o", "--input", "toy:seed=1,count=4"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "no-such.yaml", "--output", "o"], "config no-such.yaml does not exist"),
        (["--config", str(TINY_PROFILE), "--output", "o"], "the annotate stage needs an input"),
        (
            [*BASE, "--stages", "fly"],
            "unknown stages ['fly']",
        ),
        (
            [*BASE, "--ray-address", "ftp://head:8265"],
            "is not 'auto', 'host:port', 'ray://host:port' or a job server",
        ),
        (
            [*BASE, "--methods", "a,a"],
            "name a method twice",
        ),
        (
            [*BASE, "--shards", "s"],
            "give it, or an input to annotate",
        ),
        (
            ["--config", str(TINY_PROFILE), "--output", "o", "--shards", "no-shards"],
            "no-shards is not a shard dataset",
        ),
        (
            ["--config", str(TINY_PROFILE), "--output", "o", "--input", "/no/such/photos"],
            "input: input /no/such/photos is not an image folder",
        ),
        (
            [*BASE, "--benchmark-input", "held-out.json"],
            "benchmark_input: COCO annotations held-out.json do not exist",
        ),
        (
            BASE,
            "the evaluate: section's benchmark out/tiny/benchmark.json does not exist",
        ),
    ],
)
def test_bad_parameters_are_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["pipeline", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ifadapter pipeline: error: invalid pipeline parameters:")
    assert message in error
    assert len(error.splitlines()) == 1


def test_default_stages_follow_the_profile(tmp_path):
    params = check_params(
        config=str(TINY_PROFILE),
        input=str(tmp_path),
        output=str(tmp_path),
        benchmark_input="toy:seed=2,count=4",
    )
    assert params.chosen() == ["annotate", "cache", "train", "evaluate"]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "_manifest.json").write_text("{}")
    retrain = check_params(
        config=str(TINY_PROFILE),
        shards=str(shards),
        output=str(tmp_path),
        benchmark_input="toy:seed=2,count=4",
    )
    assert retrain.chosen() == ["cache", "train", "evaluate"]
    assert retrain.shards_dir == shards
    ordered = check_params(
        config=str(TINY_PROFILE), output="o", shards=str(shards), stages=["train", "cache"]
    )
    assert ordered.chosen() == ["cache", "train"]


def test_a_stage_needs_its_section(tmp_path, capsys):
    profile = tmp_path / "annotate-only.yaml"
    profile.write_text("annotate: {}\n")
    argv = ["pipeline", "--config", str(profile), "--output", "o", "--stages", "train"]
    assert main(argv) == 2
    assert "has no train: section" in capsys.readouterr().err
    params = check_params(config=str(profile), input=str(tmp_path), output="o")
    assert params.chosen() == ["annotate"]


def test_flow_names_and_failures_name_the_stage():
    import ray

    from flows import pipeline

    assert pipeline.pipeline.name == "ifadapter-pipeline"
    assert {f.name for f in (pipeline.annotate_flow, pipeline.cache_flow)} == {
        "ifadapter-annotate",
        "ifadapter-cache",
    }
    assert pipeline.train_flow.name == "ifadapter-train"
    assert pipeline.evaluate_flow.name == "ifadapter-evaluate"
    wrapped = ray.exceptions.RayTaskError(
        "encode", "Traceback ...\nValueError: no image can be trained on", ValueError("no image")
    )
    assert str(pipeline.StageFailed("cache", wrapped)) == (
        "cache stage failed: ValueError: no image"
    )
    assert str(pipeline.StageFailed("train", OSError("disk full\nmore"))) == (
        "train stage failed: OSError: disk full"
    )


def test_retries_only_what_a_retry_can_cure():
    import ray
    from prefect.states import Failed

    from annotate.sources import SourceError
    from flows.pipeline import transient
    from ifadapter.utils.profiles import ConfigError

    for final in (ValueError("x"), SourceError("x"), ConfigError("x"), FileNotFoundError("x")):
        assert not transient(None, None, Failed(data=final))
    for passing in (ConnectionError("x"), ray.exceptions.RaySystemError("x"), OSError("x")):
        assert transient(None, None, Failed(data=passing))


def test_paths_behind_a_job_server_are_left_to_the_cluster():
    """Submitted to a job server, the stages open their inputs on the cluster's storage, which
    the submitting machine need not see: only the local checks are skipped."""
    params = check_params(
        config=str(TINY_PROFILE),
        input="/cluster/photos",
        output="o",
        ray_address="http://head:8265",
    )
    assert params.chosen() == ["annotate", "cache", "train", "evaluate"]
    with pytest.raises(ValueError, match="input /cluster/photos is not an image folder"):
        check_params(config=str(TINY_PROFILE), input="/cluster/photos", output="o")
