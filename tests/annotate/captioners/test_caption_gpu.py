"""The HTTP captioner and a judge against a real ``vllm serve`` with a small Qwen2-VL, and the
same model in Ray Data's vLLM engine (``ray_vllm``).

GPU machines only: skipped unless CUDA and vLLM (the ``vllm`` extra) are present. The model is
``IFADAPTER_VLLM_MODEL``, a local directory or a hub id already in the cache (the tests run with
``HF_HUB_OFFLINE=1``); default ``Qwen/Qwen2-VL-2B-Instruct``.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import time

import pytest
import requests
import torch
from PIL import Image

from annotate.config import CaptionerConfig
from annotate.engine.operators import annotate_records
from annotate.engine.records import Detection, Record, records_to_table, work_schema
from annotate.sources import FolderSource
from annotate.vlm.judge import Judge
from tests.annotate.test_models import decoded_records

MODEL = os.environ.get("IFADAPTER_VLLM_MODEL", "Qwen/Qwen2-VL-2B-Instruct")
SERVED = "qwen2-vl"
START_TIMEOUT_S = 900

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (
            torch.cuda.is_available() and importlib.util.find_spec("vllm") and shutil.which("vllm")
        ),
        reason="needs a CUDA GPU and vLLM (pip install '.[vllm]')",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    command = [
        "vllm",
        "serve",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        SERVED,
        "--max-model-len",
        "8192",
        "--limit-mm-per-prompt",
        '{"image": 5}',
        "--gpu-memory-utilization",
        "0.45",  # leaves room for the Ray Data engine of the other test
    ]
    with open(log, "wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited {server.returncode}: {log.read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up: {log.read_text()[-3000:]}")
            time.sleep(5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=120)


def scenes(directory, count: int) -> list[Record]:
    records = decoded_records(directory, count)
    for record in records:
        record.instances = [
            Detection((0.0, 0.0, 0.7, 0.7), "shape", 0.9),
            Detection((0.3, 0.3, 1.0, 1.0), "shape", 0.8),
            Detection((0.0, 0.5, 0.5, 1.0), "shape", 0.7),
        ]
    return records


def test_vllm_server_captions_and_judges(vllm_url, tmp_path):
    records = scenes(tmp_path / "images", 4)
    config = CaptionerConfig(
        backend="openai_http", url=vllm_url, model=SERVED, instances_per_request=2
    )
    captioner = config.build("cpu")
    annotate_records("caption", captioner, records)
    assert not any(r.rejected for r in records)
    faults = [f.reason for r in records for f in r.faults]
    assert not [f for f in faults if f.startswith(("unparsable", "length"))], faults
    captions = [r.caption for r in records] + [d.caption for r in records for d in r.instances]
    assert sum(bool(c) for c in captions) >= 0.8 * len(captions), faults

    judge = Judge(captioner.client)
    red, blue = Image.new("RGB", (224, 224), "red"), Image.new("RGB", (224, 224), "blue")
    verdicts = judge.ask([(red, "a red square"), (blue, "a red square")])
    assert [v.answer for v in verdicts] == [True, False], verdicts


def test_ray_data_vllm_engine_captions_records(ray_cluster, tmp_path):
    import ray

    records = scenes(tmp_path / "images", 4)
    records[3].reject("decode", "truncated: cut short")
    schema = work_schema(FolderSource.extra_schema)
    stage = CaptionerConfig(
        backend="ray_vllm",
        model=MODEL,
        instances_per_request=2,
        engine_kwargs={"gpu_memory_utilization": 0.35},
        workers=1,
        batch_size=2,
    )
    dataset = ray.data.from_arrow(records_to_table(records, schema))
    out = stage.backend_class().transform(dataset, stage, schema)
    done = sorted(
        (Record.from_row(row) for row in out.take_all()), key=lambda record: record.position
    )
    assert [r.reject_reason for r in done] == [None, None, None, "truncated: cut short"]
    for record in done[:3]:
        assert record.pixels is None
        reasons = {f.instance: f.reason for f in record.faults}
        assert reasons.get(2, "").startswith("over_limit")  # two crops per image request
        assert record.caption and all(d.caption for d in record.instances[:2]), reasons
