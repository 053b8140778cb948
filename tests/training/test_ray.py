"""Real Ray Train runs with two workers on gloo: the CLI, data parallelism against one worker
with the doubled batch, and a worker killed mid-run that resumes exactly."""

import argparse
import json
import os
import signal
import threading
import time

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ifadapter import IFAdapter
from ifadapter.utils.profiles import ConfigError
from tests.conftest import TINY_PROFILE
from training.cli import add_parser, run_train
from training.metrics import read_metrics
from training.run import train

# Two workers of one sample each; checkpoints every 4 of 16 steps.
RUN = {
    "num_workers": 2,
    "cpus_per_worker": 1,
    "batch_size": 1,
    "max_steps": 16,
    "checkpoint_every": 4,
    "log_every": 2,
    "lr": 1e-3,
    "warmup_steps": 2,
    "ema_decay": 0.9,
}


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "ifadapter.safetensors")


def cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ifadapter")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run_train(parser.parse_args(argv))


@pytest.fixture(scope="module")
def reference(ray_cluster, tiny_cache, base_dir, shard_dataset, shared_cache_dir, tmp_path_factory):
    """The uninterrupted two-worker run, through the command line."""
    root = tmp_path_factory.mktemp("reference")
    profile = yaml.safe_load(TINY_PROFILE.read_text())
    profile["train"].update(RUN, cache_dir=str(shared_cache_dir))
    (root / "profile.yaml").write_text(yaml.safe_dump(profile))
    cli(
        [
            "train",
            "--config",
            str(root / "profile.yaml"),
            "--base",
            str(base_dir),
            "--data",
            str(shard_dataset),
            "--output",
            str(root / "out"),
            "--name",
            "reference",
        ]
    )
    return root / "out" / "reference"


def test_the_cli_trains_and_writes_metrics_checkpoints_and_the_adapter(reference, capsys):
    metrics = read_metrics(reference)
    assert [m["step"] for m in metrics] == list(range(1, 17))
    assert set(metrics[0]) >= {"loss", "lr", "grad_norm", "samples_per_s"}
    assert metrics[0]["lr"] == pytest.approx(5e-4) and metrics[-1]["lr"] == pytest.approx(1e-3)
    assert all(m["samples_per_s"] > 0 and m["grad_norm"] > 0 for m in metrics)
    assert any((reference / "tensorboard").iterdir())
    checkpoints = sorted(p for p in reference.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # keep_checkpoints
    files = {p.name for p in checkpoints[-1].iterdir()}
    assert files >= {"adapter", "optimizer.pt", "ema.safetensors", "trainer_state.json"}
    assert files >= {"rng-rank0.safetensors", "rng-rank1.safetensors"}
    assert json.loads((checkpoints[-1] / "trainer_state.json").read_text())["step"] == 16
    adapter = IFAdapter.from_pretrained(reference / "adapter")  # the EMA weights
    raw = load_file(checkpoints[-1] / "adapter" / "ifadapter.safetensors")
    assert any(not torch.equal(v, raw[k]) for k, v in adapter.state_dict().items())


def test_two_workers_train_as_one_worker_with_the_doubled_batch(reference, train_config):
    config = train_config(**{**RUN, "num_workers": 1, "batch_size": 2}, name="one-worker")
    result = train(config)
    one, two = read_metrics(result.run_dir), read_metrics(reference)
    for mine, theirs in zip(one, two, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    mine, theirs = weights(result.run_dir), weights(reference)
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-3, atol=1e-5, msg=key)


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes (descendants of the test process only)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_killed_worker_resumes_exactly_where_it_stopped(reference, train_config):
    config = train_config(**RUN, name="killed", max_failures=1)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(config)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 300
    while runner.is_alive() and killed is None and time.monotonic() < deadline:
        steps = [m["step"] for m in read_metrics(config.run_dir)]
        # Ray Train has registered a checkpoint (its snapshot lists it) and the run goes on.
        registered = (config.run_dir / "checkpoint_manager_snapshot.json").is_file()
        if registered and steps and steps[-1] < 16:
            workers = _train_workers()
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed is not None, "the run ended before a worker could be killed"
    result = outcome["result"]
    assert result.resumed_from and result.resumed_from[0] in (4, 8, 12)

    def curve(run_dir) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "samples_per_s"} for m in read_metrics(run_dir)]

    assert curve(result.run_dir) == curve(reference)  # the same loss, lr and grad norm per step
    mine, theirs = weights(result.run_dir), weights(reference)
    assert all(torch.equal(mine[key], value) for key, value in theirs.items())


def test_resuming_with_other_settings_is_refused(reference, train_config, tmp_path):
    config = train_config(**{**RUN, "lr": 2e-3}, name="reference", output=str(reference.parent))
    with pytest.raises(ConfigError, match="other values of lr"):
        train(config)
    with pytest.raises(ConfigError, match="does not exist"):
        cli(["train", "--config", str(tmp_path / "missing.yaml")])
