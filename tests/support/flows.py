"""What the flow tests share: a short pipeline profile on tiny models, and the real servers the
tests start and stop themselves (a Prefect server, a Prefect worker, a Ray head), each in its
own process group so that teardown ends exactly the processes a test started."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.support.annotate_inputs import REPO, TINY_PROFILE

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_profile(
    path: Path, models: Path, base: Path, *, rows_per_shard: int = 4, **train: object
) -> Path:
    """configs/tiny.yaml made short: absolute model paths, small shards, a few training steps,
    one CPU per actor budget that fits two cores next to Ray Train."""
    profile = yaml.safe_load(TINY_PROFILE.read_text())
    # The tiny evaluate: section needs a tiny VLM judge, GLIGEN and Inception weights: the
    # evaluate stage is tested on the demo profile instead (tests/flows/test_evaluate.py).
    profile.pop("evaluate", None)
    annotate = profile["annotate"]
    annotate["tagger"]["model"] = str(models / "clip")
    annotate["detector"]["model"] = str(models / "grounding-dino")
    # Batches of one shard at every stage: a stage holding a larger batch would keep finished
    # partitions back until the rest arrive (the resume test kills the job between shards).
    for stage in ("decode", "tagger", "detector", "captioner"):
        annotate[stage]["batch_size"] = rows_per_shard
    # The cache stage reads image bytes from the shards or from local/pyarrow paths: images
    # fetched over HTTP must be embedded.
    annotate["output"]["embed_images"] = True
    annotate["output"]["rows_per_shard"] = rows_per_shard
    profile["train"].update(
        {
            "base": str(base),
            "data": "unused: the pipeline sets it",
            "output": "unused: the pipeline sets it",
            "name": "flows-test",
            "max_steps": 4,
            "warmup_steps": 0,
            "checkpoint_every": 2,
            "log_every": 1,
            "ema_decay": None,
            "augment": {**profile["train"]["augment"], "views": 1},
            **train,
        }
    )
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def short_demo(path: Path) -> Path:
    """configs/demo.yaml in the demo's short configuration (``ifadapter demo --quick``)."""
    from flows.demo import demo_profile

    return demo_profile(path, quick=True)


def flow_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that runs project code: offline, no telemetry, the
    repository importable, one torch thread, Ray's local cluster at two CPUs."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1",
            "IFADAPTER_RAY_CPUS": "2",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            "IFADAPTER_RETRY_BACKOFF_S": "1",
        }
    )
    env.update(extra)
    return env


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path = REPO):
    """A process in its own session (so its whole group can be ended), output to ``log``."""
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process in stop()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    process.log_handle = handle  # type: ignore[attr-defined]
    return process


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group this test started, SIGKILL after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    process.log_handle.close()  # type: ignore[attr-defined]


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_http(
    url: str, timeout: float, process: subprocess.Popen, log: Path, answers: tuple[int, ...] = ()
) -> None:
    """Until ``url`` answers 200 (or one of ``answers``: Ray's dashboard says 401 to a request
    without its cluster token, and that is an answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            if error.code in answers:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{tail(log)}")


def api(url: str, path: str, body: dict | None = None) -> object:
    """A call of the Prefect REST API (GET, or POST with a JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``prefect server start`` on 127.0.0.1 (a free port, its database under ``home``);
    yields its API URL and the environment that points clients at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = flow_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    log = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    server = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log,
        env,
    )
    try:
        wait_http(f"{url}/health", 120, server, log)
        yield url, env
    finally:
        stop(server)


@contextlib.contextmanager
def ray_head(directory: Path) -> Iterator[dict]:
    """``ray start --head --block`` with the dashboard (job submission) on free ports; yields
    the GCS address and the dashboard URL. ``--block`` keeps the head in this process group,
    so ending the group ends this head only (``ray stop`` would end every Ray on the machine).
    Its own short temp dir keeps it out of /tmp/ray, where a plain ``ray.init()`` elsewhere on
    the machine would find and join it."""
    gcs, dashboard = free_port(), free_port()
    log = directory / "ray-head.log"
    directory.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    # Ray 2.60 guards the cluster with a token; this head gets its own (not ~/.ray/auth_token),
    # and every client of it gets the same environment.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = start(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        log,
        flow_env(**auth),
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_http(f"{url}/api/version", 120, head, log, answers=(401,))
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": url, "log": str(log), "env": auth}
    finally:
        stop(head, grace=20)
        shutil.rmtree(temp_dir, ignore_errors=True)
