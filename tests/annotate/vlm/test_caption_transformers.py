"""The in-process transformers backend on tiny Qwen2-VL / Qwen2.5-VL / InternVL checkpoints:
constrained replies, captions into shards with provenance, judges, and Ray Data's row functions."""

import json

import jsonschema
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotate.captioners.ray_vllm import (
    ERROR_COLUMN,
    SKIPPED,
    RayVLLMCaptioner,
    RayVLLMSettings,
    reply_columns,
    request_row,
    restore,
    result_row,
)
from annotate.captioners.requests import CaptionSettings, build_request, reply_schema
from annotate.config import CaptionerConfig
from annotate.engine.operators import annotate_records
from annotate.engine.records import Detection, Record, work_schema
from annotate.engine.writer import ShardWriter
from annotate.schema import check_schema
from annotate.sources import FolderSource
from annotate.vlm.bounded_schema import token_budget
from annotate.vlm.client import ChatReply, ChatRequest, encode_image
from annotate.vlm.in_process import TransformersChatClient
from annotate.vlm.judge import ANSWER_SCHEMA, Judge, parse_verdict
from tests.annotate.test_models import decoded_records

BOXES = [((0.05, 0.1, 0.55, 0.6), "red ball"), ((0.4, 0.3, 0.95, 0.9), "blue box")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_instances(records: list[Record]) -> list[Record]:
    for record in records:
        record.instances = [Detection(box, label, 0.9) for box, label in BOXES]
    return records


@pytest.mark.parametrize("architecture", ["qwen2_vl", "qwen2_5_vl", "internvl"])
def test_clients_answer_under_the_schema(tiny_vlm, architecture):
    client = TransformersChatClient(str(tiny_vlm(architecture)), "cpu")
    image = encode_image(Image.new("RGB", (80, 60), (200, 40, 40)))
    schema = reply_schema(True, 2, CaptionSettings(max_caption_chars=48, max_instance_chars=32))
    requests = [
        ChatRequest("Describe.", (image, image, image), "Be dense.", schema, token_budget(schema)),
        ChatRequest("A red ball?", (image,), None, ANSWER_SCHEMA, token_budget(ANSWER_SCHEMA)),
        ChatRequest("Describe.", (image,), None, schema, max_tokens=4),
    ]
    full, answer, cut = client.chat(requests)
    for reply, expected in [(full, schema), (answer, ANSWER_SCHEMA)]:
        assert reply.error is None and reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.text), expected)
        assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert cut.finish_reason == "length" and cut.completion_tokens == 4


def test_captioner_writes_captions_and_faults_into_shards(tiny_vlm, tmp_path):
    records = with_instances(decoded_records(tmp_path / "images", 3))
    records[2].instances.append(Detection(BOXES[0][0], "red ball", 0.8))  # a duplicate crop
    config = CaptionerConfig(
        backend="transformers_vlm",
        model=str(tiny_vlm("qwen2_vl")),
        instances_per_request=2,
        max_caption_chars=48,
        max_instance_chars=32,
    )
    captioner = config.build("cpu")
    annotate_records("caption", captioner, records)
    assert not any(r.rejected for r in records)
    out = tmp_path / "shards"
    out.mkdir()
    writer = ShardWriter(out, FolderSource.extra_schema, {"caption": config.provenance()})
    writer.write(0, records)
    table = pq.read_table(writer.shard_path(0))
    check_schema(table.schema)
    rows = table.to_pylist()
    assert len(rows) == 3
    written = 0
    for row in rows:
        annotator = json.loads(row["annotator"])
        provenance = annotator["caption"]
        assert provenance["backend"] == "transformers_vlm" and provenance["model"].endswith(
            "qwen2_vl"
        )
        assert (
            provenance["prompts"]["version"] == "dense-v1"
            and "transformers" in provenance["versions"]
        )
        faulted = {f["instance"]: f["reason"] for f in annotator.get("faults", [])}
        assert (row["caption"] == "") == (None in faulted)
        assert 0 < len(row["caption"]) <= 48 or faulted[None]
        for index, instance in enumerate(row["instances"]):
            assert (instance["caption"] == "") == (index in faulted)
            assert len(instance["caption"]) <= 32
            written += bool(instance["caption"])
    assert written > 0  # random weights, constrained: most replies are usable
    assert rows[2]["instances"][2]["caption"] == rows[2]["instances"][0]["caption"]

    korean = CaptionerConfig(backend="transformers_vlm", model=config.settings.model, language="ko")
    [record] = with_instances(decoded_records(tmp_path / "more", 1, start=5))
    annotate_records("caption", korean.build("cpu"), [record])
    assert record.caption == "" and [d.caption for d in record.instances] == ["", ""]
    assert [(f.instance, f.reason.split(":")[0]) for f in record.faults] == [
        (None, "wrong_language"),
        (0, "wrong_language"),
        (1, "wrong_language"),
    ]


def test_judge_is_a_question_and_a_parser_on_a_client(qwen2_vl_client):
    judge = Judge(qwen2_vl_client)
    crops = [(Image.new("RGB", (40, 40), colour), "a red square") for colour in ("red", "blue")]
    verdicts = judge.ask(crops)
    assert len(verdicts) == 2 and all(
        v.answer in (True, False) and v.reason is None for v in verdicts
    )
    assert "a red square" in judge.request(*crops[0]).text
    assert parse_verdict(ChatReply('{"answer": "maybe"}', finish_reason="stop")).reason == (
        "unparsable: answer 'maybe' is neither yes nor no"
    )
    assert parse_verdict(ChatReply("Yes.", finish_reason="stop")).reason.startswith("unparsable")
    with pytest.raises(ValueError, match="description"):
        Judge(qwen2_vl_client, question="Is this right?")


def test_ray_vllm_rows_round_trip_a_real_reply(qwen2_vl_client, tmp_path, ray_cluster):
    settings = RayVLLMSettings(
        model="Qwen/Qwen2-VL-2B-Instruct",
        instances_per_request=1,
        max_caption_chars=48,
        max_instance_chars=32,
    )
    schema = work_schema(FolderSource.extra_schema)
    names = schema.names
    live, rejected = with_instances(decoded_records(tmp_path / "images", 2))
    rejected.reject("decode", "truncated: cut short")
    row = live.to_row()
    asked = request_row(row, settings, names)
    system, message = asked["messages"]
    assert system["role"] == "system" and message["role"] == "user"
    urls = [p["image_url"]["url"] for p in message["content"] if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    params = asked["sampling_params"]
    assert params["temperature"] == 0.0 and params["structured_outputs"]["json"]["required"] == [
        "caption",
        "instances",
    ]
    assert request_row(rejected.to_row(), settings, names)["messages"] == SKIPPED

    # What vLLM would generate, here from the tiny model for the very same request.
    crops = [
        (encode_image(c), label) for c, label in [(live.rgb().crop((0, 0, 32, 32)), "red ball")]
    ]
    request = build_request(encode_image(live.rgb()), crops, settings)
    [generated] = qwen2_vl_client.chat([request])
    answered = {
        **row,
        "sampling_params": params,
        "num_generated_tokens": generated.completion_tokens,
    }
    answered["generated_text"] = generated.text
    done = Record.from_row(
        result_row({**reply_columns(answered, names), ERROR_COLUMN: ""}, settings, names)
    )
    assert done.pixels is None and done.instances[1].caption == ""
    faults = {f.instance: f.reason.split(":")[0] for f in done.faults}
    assert faults.get(1) == "over_limit" and (done.caption != "") == (None not in faults)

    failed = Record.from_row(result_row({**row, ERROR_COLUMN: "prompt too long"}, settings, names))
    assert [f.reason.split(":")[0] for f in failed.faults] == ["inference_error"] * 2 + [
        "over_limit"
    ]
    untouched = Record.from_row(result_row(rejected.to_row(), settings, names))
    assert untouched.reject_reason == "truncated: cut short" and untouched.faults == []

    import ray

    processed = [
        {**reply_columns(answered, names), ERROR_COLUMN: ""},
        {**row, "messages": asked["messages"], ERROR_COLUMN: "prompt too long"},
        {**reply_columns(rejected.to_row(), names), ERROR_COLUMN: ""},
    ]
    back = restore(ray.data.from_items(processed), settings, schema).take_all()
    assert [Record.from_row(r).faults for r in back] == [done.faults, failed.faults, []]
    stage = CaptionerConfig(backend="ray_vllm", model=str(qwen2_vl_client.model), workers=1)
    dataset = RayVLLMCaptioner.transform(ray.data.from_items([{"x": 1}]), stage, schema)
    assert isinstance(dataset, ray.data.Dataset)  # built lazily: running it needs vLLM and a GPU
