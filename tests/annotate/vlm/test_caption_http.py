"""The HTTP backend against a real server on 127.0.0.1 that speaks vLLM's chat-completions API
and answers with the tiny Qwen2-VL; faults injected through the same server."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml
from PIL import Image

from annotate.config import CaptionerConfig, parse_config
from annotate.engine.operators import annotate_records
from annotate.engine.records import Detection
from annotate.vlm.client import ChatRequest, encode_image
from annotate.vlm.http import HTTPChatClient
from annotate.vlm.judge import Judge
from annotate.vlm.server import ChatCompletionsServer, running
from ifadapter.utils.profiles import ConfigError
from tests.annotate.engine.test_engine import dataset, run_cli
from tests.annotate.test_models import decoded_records
from tests.support.annotate_inputs import TINY_PROFILE, write_scenes
from tests.support.vlm_faults import FaultyServer, Rule

SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string", "minLength": 1, "maxLength": 24}},
    "required": ["caption"],
    "additionalProperties": False,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fault_rules() -> dict[str, Rule]:
    """Instance labels and the fault each one's request meets."""
    return {
        "flaky thing": Rule("status", times=1, status=503),  # one 503, then an answer
        "broken thing": Rule("status", status=500),
        "forbidden thing": Rule("status", status=400),
        "garbled thing": Rule("malformed"),
        "chatty thing": Rule("prose"),
        "sorry thing": Rule("apology"),
        "refusing thing": Rule("refusal"),
    }


@pytest.fixture
def image() -> bytes:
    return encode_image(Image.new("RGB", (64, 64), (30, 120, 200)))


def test_server_speaks_the_chat_completions_api(qwen2_vl_client, image):
    server = ChatCompletionsServer(qwen2_vl_client, served_model="tiny-qwen2-vl")
    with running(server) as url:
        assert url.startswith("http://127.0.0.1:")
        assert requests.get(url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
        models = requests.get(f"{url}/models", timeout=30).json()
        assert models["data"][0]["id"] == "tiny-qwen2-vl"
        request = ChatRequest("Describe.", (image,), "Be brief.", SCHEMA, 64)
        body = {
            "model": "tiny-qwen2-vl",
            "messages": request.messages(),
            "max_tokens": 64,
            "structured_outputs": {"json": SCHEMA},
        }
        answer = requests.post(f"{url}/chat/completions", json=body, timeout=60).json()
        assert answer["object"] == "chat.completion" and answer["model"] == "tiny-qwen2-vl"
        [choice] = answer["choices"]
        assert (
            choice["finish_reason"] == "stop"
            and len(json.loads(choice["message"]["content"])["caption"]) <= 24
        )
        assert answer["usage"]["prompt_tokens"] > 0
        refused = {
            "guided_json": ({**body, "guided_json": SCHEMA}, 400, "not supported"),
            "sampling": ({**body, "temperature": 0.7}, 400, "greedily"),
            "remote image": (
                {
                    **body,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
                            ],
                        }
                    ],
                },
                400,
                "data:image",
            ),
            "bad schema": (
                {**body, "structured_outputs": {"json": {"type": "number"}}},
                400,
                "not supported",
            ),
            "other model": ({**body, "model": "gpt-4o"}, 404, "does not exist"),
        }
        for name, (payload, status, message) in refused.items():
            got = requests.post(f"{url}/chat/completions", json=payload, timeout=60)
            assert got.status_code == status, name
            assert message in got.json()["error"]["message"], name


def test_client_retries_bounds_concurrency_and_records_every_fault(qwen2_vl_client, tmp_path):
    server = FaultyServer(qwen2_vl_client, fault_rules(), served_model="tiny")
    records = decoded_records(tmp_path / "images", 2)
    labels = [*server.rules, "plain thing"]
    records[0].instances = [Detection((0.1, 0.1, 0.6, 0.6), label, 0.9) for label in labels]
    records[1].instances = [Detection((0.2, 0.2, 0.9, 0.9), "plain thing", 0.9)]
    with running(server) as url:
        config = CaptionerConfig(
            backend="openai_http",
            url=url,
            model="tiny",
            concurrency=3,
            retries=2,
            backoff_s=0.05,
            timeout_s=120,
            max_instance_chars=32,
        )
        annotate_records("caption", config.build("cpu"), records)
    assert not any(r.rejected for r in records)
    reasons = {f.instance: f.reason for f in records[0].faults}
    by_label = {labels[i]: reasons.get(i) for i in range(len(labels))}
    assert by_label["flaky thing"] is None and records[0].instances[0].caption  # retried, then fine
    assert (
        by_label["broken thing"].startswith("http: 500")
        and "(attempts: 3)" in by_label["broken thing"]
    )
    assert (
        by_label["forbidden thing"].startswith("http: 400")
        and "(attempts: 1)" in by_label["forbidden thing"]
    )
    assert by_label["garbled thing"].startswith("bad_response: not a chat completion")
    assert by_label["chatty thing"].startswith("unparsable: not JSON")
    assert by_label["sorry thing"].startswith("refusal:")
    assert by_label["refusing thing"] == 'refusal: "I can\'t help with that image."'
    for index, detection in enumerate(records[0].instances):
        assert (detection.caption == "") == (index in reasons)
    assert server.rules["flaky thing"].fired == 1 and server.rules["broken thing"].fired == 3
    assert 1 <= server.most_in_flight <= 3


def test_timeouts_connection_errors_and_api_keys(qwen2_vl_client, image, monkeypatch):
    request = ChatRequest("A slow thing?", (image,), None, SCHEMA, 64)
    slow = FaultyServer(
        qwen2_vl_client, {"slow thing": Rule("slow", delay_s=3.0)}, served_model="m"
    )
    with running(slow) as url:
        client = HTTPChatClient(url, "m", timeout_s=0.5, retries=1, backoff_s=0.05)
        [reply] = client.chat([request])
    assert reply.error == "timeout: no reply within 0.5s (attempts: 2)"

    [reply] = HTTPChatClient(url, "m", timeout_s=5, retries=1, backoff_s=0.05).chat([request])
    assert reply.error.startswith("connection: ClientConnectorError")  # the server is gone

    locked = ChatCompletionsServer(qwen2_vl_client, served_model="m", api_key="s3cret")
    monkeypatch.setenv("VLM_KEY", "s3cret")
    with running(locked) as url:
        [reply] = HTTPChatClient(url, "m", api_key="wrong").chat([request])
        assert reply.error == 'http: 401 "missing or wrong API key" (attempts: 1)'
        config = CaptionerConfig(backend="openai_http", url=url, model="m", api_key_env="VLM_KEY")
        assert "s3cret" not in json.dumps(config.provenance())
        judge = Judge(config.build("cpu").client)
        [verdict] = judge.ask([(Image.new("RGB", (32, 32), "red"), "a red square")])
        assert verdict.answer in (True, False) and verdict.reason is None
    monkeypatch.delenv("VLM_KEY")
    with pytest.raises(ValueError, match="api_key_env: VLM_KEY is not set"):
        CaptionerConfig(backend="openai_http", url=url, model="m", api_key_env="VLM_KEY").build(
            "cpu"
        )
    with pytest.raises(ConfigError, match="must start with http"):
        parse_config(
            {
                "tagger": {},
                "detector": {},
                "captioner": {"backend": "openai_http", "url": "x", "model": "m"},
            }
        )


def test_engine_captions_over_http_into_shards(
    ray_cluster, tiny_models_root, qwen2_vl_client, tmp_path, monkeypatch
):
    """The whole Ray Data job with the HTTP captioner: its actor talks to the server here."""
    monkeypatch.chdir(tiny_models_root)
    server = FaultyServer(qwen2_vl_client, {}, served_model="tiny-qwen2-vl")
    write_scenes(tmp_path / "images", 4)
    profile = yaml.safe_load(TINY_PROFILE.read_text())
    with running(server) as url:
        profile["annotate"]["captioner"] = {
            "backend": "openai_http",
            "url": url,
            "model": "tiny-qwen2-vl",
            "instances_per_request": 4,
            "max_caption_chars": 48,
            "max_instance_chars": 32,
            "workers": 1,
            "num_cpus": 0.25,
            "batch_size": 4,
        }
        path = Path(tmp_path / "profile.yaml")
        path.write_text(yaml.safe_dump(profile))
        run_cli("--config", path, "--input", tmp_path / "images", "--output", tmp_path / "shards")
    rows, quarantined = dataset(tmp_path / "shards")
    assert len(rows) == 4 and quarantined == []
    assert server.requests >= 4
    for row in rows:
        annotator = json.loads(row["annotator"])
        assert annotator["caption"]["backend"] == "openai_http"
        assert annotator["caption"]["prompts"]["version"] == "dense-v1"
        faulted = {f["instance"] for f in annotator.get("faults", [])}
        assert (row["caption"] == "") == (None in faulted)
        for index, instance in enumerate(row["instances"]):
            assert (instance["caption"] == "") == (index in faulted)
    assert any(instance["caption"] for row in rows for instance in row["instances"])
    table = pq.read_table(tmp_path / "shards" / "shard-00000.parquet")
    assert sum(bool(c) for c in table["caption"].to_pylist()) > 0
