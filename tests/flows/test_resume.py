"""The pipeline flow killed mid-stage, then run again: finished work is kept, the killed stage
resumes, and a run over complete outputs skips every stage.

The images come from a local HTTP server (the annotate stage reads a URI list) that records
what each run fetches: that is what shows a rerun did not annotate finished shards again.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from annotate.schema import file_sha256
from tests.support.annotate_inputs import write_scenes
from tests.support.flows import BIN, flow_env, start, stop, tail, write_profile

IMAGES = 12
MAX_STEPS = 60
CHECKPOINT_EVERY = 5


class CountingImages(ThreadingHTTPServer):
    """Serves a folder of scenes and records which scene each request fetched."""

    daemon_threads = True

    def __init__(self, directory: Path) -> None:
        self.fetched: list[int] = []
        folder, server = str(directory), self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=folder, **kwargs)

            def log_message(self, *args) -> None:
                pass

            def send_head(self):
                server.fetched.append(int(Path(self.path).stem.split("-")[-1]))
                return super().send_head()

        super().__init__(("127.0.0.1", 0), Handler)


def last_step(output: Path) -> int:
    steps = [0]
    for path in output.glob("train/*/metrics.jsonl"):
        lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
        steps += [json.loads(line)["step"] for line in lines[-1:]]
    return max(steps)


@pytest.fixture(scope="module")
def prefect_api():
    """A real Prefect server (the test harness's) that in-process and subprocess runs share."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def served_images(tmp_path):
    """A URI list of scenes on a local HTTP server that counts what is fetched."""
    images = tmp_path / "images"
    write_scenes(images, IMAGES)
    server = CountingImages(images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    listing = tmp_path / "uris.csv"
    listing.write_text(
        "url\n" + "".join(f"http://127.0.0.1:{port}/scene-{i:03d}.png\n" for i in range(IMAGES))
    )
    yield server, listing
    server.shutdown()
    server.server_close()


def test_killed_pipeline_resumes_without_redoing_finished_work(
    prefect_api, served_images, tiny_models_root, base_dir, tmp_path, monkeypatch
):
    from flows.pipeline import run_pipeline

    server, listing = served_images
    models = tiny_models_root / "out" / "tiny-models"
    profile = write_profile(
        tmp_path / "profile.yaml",
        models,
        base_dir,
        max_steps=MAX_STEPS,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    output = tmp_path / "out"
    command = [
        str(BIN / "python"),
        "-m",
        "ifadapter.cli",
        "pipeline",
        f"--config={profile}",
        f"--input={listing}",
        f"--output={output}",
    ]
    # 1. The pipeline in a subprocess, killed (SIGKILL, its local Ray with it) while the train
    # stage runs, past its first checkpoint: annotate and cache are finished by then.
    log = tmp_path / "killed-run.log"
    killed = start(command, log, flow_env(PREFECT_API_URL=prefect_api))
    try:
        deadline = time.monotonic() + 240
        while last_step(output) < CHECKPOINT_EVERY + 2:
            assert killed.poll() is None, f"the run ended before the kill:\n{tail(log)}"
            assert time.monotonic() < deadline, f"training never got going:\n{tail(log)}"
            time.sleep(0.1)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(30)
    finally:
        stop(killed)
    # Ray's workers live in process groups of their own: they stop when they find their raylet
    # gone, within seconds. Wait until the run's step stops moving.
    killed_at, still = last_step(output), time.monotonic()
    while time.monotonic() - still < 3:
        assert time.monotonic() < deadline + 60, "training outlived the killed driver"
        time.sleep(0.2)
        if last_step(output) != killed_at:
            killed_at, still = last_step(output), time.monotonic()
    assert killed_at < MAX_STEPS, "the kill came after training finished"
    assert (output / "_flows" / "annotate.json").is_file()
    assert not (output / "_flows" / "train.json").exists()
    shards = sorted((output / "shards").glob("shard-*.parquet"))
    kept = {p.name: p.stat().st_mtime_ns for p in shards}
    caches = sorted((output / "train" / "cache").iterdir())

    # 2. The rerun: annotate and cache are complete and unchanged (skipped, no image fetched
    # again), training resumes from the latest checkpoint instead of step 0.
    server.fetched.clear()
    for name, value in flow_env().items():
        if name.startswith(("IFADAPTER_", "RAY_TRAIN_")):
            monkeypatch.setenv(name, value)
    started = time.perf_counter()
    results = run_pipeline(profile, input=str(listing), output=output)
    resumed_s = time.perf_counter() - started
    assert results["annotate"]["skipped"] and results["cache"]["skipped"]
    assert server.fetched == []
    assert {p.name: p.stat().st_mtime_ns for p in shards} == kept
    assert sorted((output / "train" / "cache").iterdir()) == caches
    trained = results["train"]
    assert not trained["skipped"]
    assert trained["steps"] == MAX_STEPS
    assert len(trained["resumed_from"]) == 1
    resumed = trained["resumed_from"][0]
    assert CHECKPOINT_EVERY <= resumed <= killed_at and resumed % CHECKPOINT_EVERY == 0
    assert Path(trained["adapter"], "ifadapter.safetensors").is_file()

    # 3. Complete and unchanged: every stage skipped, nothing fetched, no Ray started.
    started = time.perf_counter()
    again = run_pipeline(profile, input=str(listing), output=output)
    skipped_s = time.perf_counter() - started
    assert all(r["skipped"] for r in again.values()), again
    assert again["train"]["adapter"] == trained["adapter"]
    assert server.fetched == []
    # The one-stage flows read and write the same layout, so they agree.
    from flows.pipeline import annotate_flow, train_flow

    assert annotate_flow(str(profile), str(listing), str(output))["skipped"]
    assert train_flow(str(profile), str(output))["adapter"] == trained["adapter"]

    # 4. A changed output (an edited shard) reruns from there: that shard's inputs only are
    # annotated again. The engine is deterministic, so the shard comes back byte for byte and
    # the cache and the training run downstream are the ones already complete.
    victim = output / "shards" / "shard-00001.parquet"
    before = file_sha256(victim)
    pq.write_table(pq.read_table(victim).slice(0, 1), victim)
    changed = run_pipeline(profile, input=str(listing), output=output)
    assert changed["annotate"]["processed"] == 4
    assert sorted(set(server.fetched)) == [4, 5, 6, 7]
    assert file_sha256(victim) == before
    assert changed["cache"]["skipped"] and changed["train"]["skipped"]
    print(
        f"killed at step {killed_at}, resumed from {resumed}: resumed run {resumed_s:.1f}s, "
        f"all-skipped rerun {skipped_s:.1f}s"
    )
