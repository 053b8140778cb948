"""Metric correctness on constructed cases, the benchmark file's rules, and config errors."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from annotate.vlm.client import ChatReply, ChatRequest
from evaluation.backends.vlm_judges import QUESTIONS, VLMJudge
from evaluation.benchmark import (
    BenchmarkError,
    BenchmarkInstance,
    BenchmarkLayout,
    build_benchmark,
    load_or_build,
    read_benchmark,
)
from evaluation.config import BenchmarkConfig, parse_config
from evaluation.metrics import FidScorer, average_precision, ifs_summary, instance_records
from evaluation.protocols import Detection
from evaluation.report import markdown_table, summary_table
from ifadapter.utils.profiles import ConfigError
from tests.support.paths import CONFIGS
from tests.support.shards import default_rows, shapes_row, write_dataset

BUCKETS = (0.05, 0.2)


def layout(*instances: tuple[tuple[float, ...], str], layout_id: str = "a") -> BenchmarkLayout:
    return BenchmarkLayout(
        id=layout_id,
        caption="shapes",
        instances=tuple(BenchmarkInstance(box, label, f"a {label}") for box, label in instances),
        width=64,
        height=64,
        source={},
    )


def test_perfect_detections_give_ap_one():
    layouts = [
        layout(((0.1, 0.1, 0.5, 0.5), "circle"), ((0.5, 0.5, 0.9, 0.9), "square"), layout_id="a"),
        layout(((0.2, 0.0, 0.7, 0.6), "circle"), layout_id="b"),
    ]
    perfect = [[Detection(i.box, i.label, 0.9) for i in item.instances] for item in layouts]
    assert average_precision(layouts, [(64, 64), (128, 96)], perfect) == {
        "ap": 1.0,
        "ap50": 1.0,
        "ap75": 1.0,
    }
    shifted = [[Detection((0.1, 0.3, 0.5, 0.7), "circle", 0.9)], []]  # IoU 1/3 with circle a
    assert average_precision(layouts, [(64, 64), (64, 64)], shifted)["ap50"] == 0.0
    assert average_precision(layouts, [(64, 64), (64, 64)], [[], []])["ap"] == 0.0


def test_iou_threshold_boundary():
    """0.5 exactly passes, just below fails; only detections of the instance's label count."""
    item = layout(((0.0, 0.0, 0.5, 0.5), "circle"))
    at_half = [Detection((0.0, 0.0, 0.25, 0.5), "circle", 0.9)]  # IoU 0.125 / 0.25 = 0.5
    below = [Detection((0.0, 0.0, 0.2499, 0.5), "circle", 0.9)]
    other_label = [Detection((0.0, 0.0, 0.5, 0.5), "square", 0.9)]
    [passed] = instance_records(item, at_half, 0.5, BUCKETS)
    [failed] = instance_records(item, below, 0.5, BUCKETS)
    [unmatched] = instance_records(item, other_label, 0.5, BUCKETS)
    assert passed.iou == 0.5 and passed.placed
    assert failed.iou < 0.5 and not failed.placed
    assert unmatched.matched_box is None and not unmatched.placed
    best = [
        Detection((0.0, 0.0, 0.1, 0.1), "circle", 0.99),
        Detection((0.0, 0.0, 0.5, 0.45), "circle", 0.3),
    ]
    [record] = instance_records(item, best, 0.5, BUCKETS)
    assert record.matched_box == (0.0, 0.0, 0.5, 0.45)  # highest IoU, not highest score


class ScriptedClient:
    """A real ``VLMClient``: answers each request with the next scripted reply, and keeps the
    requests it was asked (so the test can check what the judge sent)."""

    model = "scripted"

    def __init__(self, replies: Sequence[ChatReply]):
        self.replies = list(replies)
        self.requests: list[ChatRequest] = []

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        self.requests += requests
        return [self.replies.pop(0) for _ in requests]


class ScriptedSettings(VLMJudge.Settings):
    question_version: str = "ifs-v1"


def test_ifs_counts_yes_no_unparsable_and_misplaced():
    item = layout(
        ((0.0, 0.0, 0.5, 0.5), "circle"),
        ((0.5, 0.0, 1.0, 0.5), "circle"),
        ((0.0, 0.5, 0.5, 1.0), "square"),
        ((0.4, 0.4, 0.9, 0.9), "square"),  # overlaps the others
        ((0.95, 0.95, 0.97, 0.97), "dot"),  # small, separate, never detected
    )
    detections = [Detection(i.box, i.label, 0.9) for i in item.instances[:4]]
    records = instance_records(item, detections, 0.5, BUCKETS)
    client = ScriptedClient(
        [
            ChatReply('{"answer": "yes"}', finish_reason="stop"),
            ChatReply('{"answer": "no"}', finish_reason="stop"),
            ChatReply("Sure! It is a square.", finish_reason="stop"),
            ChatReply(None, error="timeout: no reply"),
        ]
    )
    judge = VLMJudge(ScriptedSettings(), "cpu", client)
    placed = [r for r in records if r.placed]
    image = Image.new("RGB", (64, 64))
    verdicts = judge.ask([(image, r.caption) for r in placed])
    for record, verdict in zip(placed, verdicts, strict=True):
        record.verdicts["scripted"] = (verdict.answer, verdict.reason)
    assert QUESTIONS["ifs-v1"][0].format(description="a circle") in client.requests[0].text
    summary = ifs_summary(records, ["scripted"])
    assert summary["ifs_rate"] == pytest.approx(1 / 5)
    assert summary["ifs_by_judge"] == {"scripted": pytest.approx(1 / 5)}
    assert summary["placement"] == pytest.approx(4 / 5)
    assert summary["unparsable"] == 2  # the prose reply and the failed request, reasons kept
    assert records[2].verdicts["scripted"][1] and records[3].verdicts["scripted"][1]
    assert summary["ifs_by_count"] == {"5": pytest.approx(1 / 5)}
    assert summary["ifs_by_size"] == {"small": 0.0, "medium": None, "large": pytest.approx(1 / 4)}
    assert summary["ifs_overlap"]["separate"] == 0.0  # the dot only
    assert summary["ifs_overlap"]["overlapping"] == pytest.approx(1 / 4)
    assert summary["attributes"] is None  # a VLM judge answers only yes or no
    row = records[2].to_row()
    assert row["verdicts"][0]["answer"] is None and row["verdicts"][0]["reason"]


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from annotate.tiny.benchmark import write_inception

    return write_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(inception, one_torch_thread):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]

    def shifted(amount: int) -> list[Image.Image]:
        return [Image.fromarray((np.asarray(i) + amount).astype(np.uint8)) for i in images]

    fid = FidScorer(inception, "cpu")
    reference = fid.features(images)
    assert reference.shape == (3, 2048)
    values = [fid.distance(reference, reference)]
    values += [fid.distance(reference, fid.features(shifted(amount))) for amount in (10, 50)]
    assert np.allclose(fid.features(shifted(0)[:1]), reference[:1])  # deterministic features
    assert values[0] < 1e-4 * values[1]
    assert 0 < values[1] < values[2]


def test_fid_refuses_a_pickle_that_is_not_tensors(tmp_path):
    import pickle

    bad = tmp_path / "inception.pth"
    bad.write_bytes(pickle.dumps(Image.new("RGB", (2, 2)), protocol=2))
    with pytest.raises(ValueError, match="tensors-only"):
        FidScorer(bad, "cpu")


def rows_with_rules() -> list[dict]:
    rows = default_rows(8)
    no_caption = shapes_row("tests-no-caption", [((0.1, 0.1, 0.5, 0.5), "red", "circle")])
    no_caption["caption"] = " "
    small = shapes_row("tests-small", [((0.1, 0.1, 0.12, 0.5), "red", "square")])
    bad = shapes_row("tests-bad", [((0.1, 0.1, 0.5, 0.5), "red", "circle")])
    bad["instances"][0]["box"] = [0.5, 0.1, 0.4, 0.5]
    return [*rows, no_caption, small, bad]


def test_benchmark_selection_is_deterministic_and_checked(tmp_path):
    rows = rows_with_rules()
    shards = write_dataset(tmp_path / "shards", [rows[:5], rows[5:]])
    config = BenchmarkConfig(file=tmp_path / "b.json", shards=shards, count=5, max_instances=2)
    first = build_benchmark(config)
    again = build_benchmark(config.model_copy(update={"file": tmp_path / "c.json"}))
    assert [x.id for x in first.layouts] == [x.id for x in again.layouts]
    assert first.sha256 == again.sha256 == read_benchmark(config.file).sha256
    assert first.source["excluded"] == {"bad_box": 1, "no_caption": 1, "small_box": 1}
    assert [x.id for x in first.layouts] == sorted(x.id for x in first.layouts)
    reshuffled = write_dataset(tmp_path / "reshuffled", [rows[6:], rows[:6]])
    other = build_benchmark(
        config.model_copy(update={"file": tmp_path / "d.json", "shards": reshuffled})
    )
    assert [x.id for x in other.layouts] == [x.id for x in first.layouts]
    seeded = build_benchmark(config.model_copy(update={"file": tmp_path / "e.json", "seed": 1}))
    assert [x.id for x in seeded.layouts] != [x.id for x in first.layouts]
    layout_dict = json.loads(config.file.read_text())["layouts"][0]
    assert set(layout_dict) == {"id", "caption", "width", "height", "instances", "source"}
    assert set(layout_dict["source"]) == {"uri", "sha256", "shard", "image_id"}
    assert set(layout_dict["instances"][0]) == {"box", "label", "caption"}

    data = json.loads(config.file.read_text())
    data["layouts"][0]["caption"] = "edited"
    config.file.write_text(json.dumps(data))
    with pytest.raises(BenchmarkError, match="checksum"):
        read_benchmark(config.file)
    build_benchmark(config)
    with pytest.raises(BenchmarkError, match="min_box"):
        load_or_build(config.model_copy(update={"min_box": 0.1}))
    with pytest.raises(BenchmarkError, match="only 8 rows pass"):
        build_benchmark(config.model_copy(update={"count": 9, "file": tmp_path / "f.json"}))


def test_config_errors_are_one_line(tmp_path):
    base = {
        "benchmark": {"file": str(tmp_path / "b.json")},
        "methods": [{"name": "real", "runner": "real"}],
        "metrics": {"ifs": False, "ap": False},
    }
    assert parse_config(base).methods[0].runner == "real"
    faults = [
        ({"methods": [{"name": "x", "runner": "nope"}]}, "unknown runner 'nope'"),
        ({"methods": [{"name": "x", "runner": "real", "colour": 1}]}, "colour"),
        ({"methods": [{"name": "x", "runner": "math:pi"}]}, "is not an evaluation Runner"),
        ({"metrics": {"ifs": True, "ap": False}}, "detector: needed"),
        ({"metrics": {"fid": {"inception": str(tmp_path / "none.pth")}}}, "nothing is downloaded"),
        ({"methods": [{"name": "a", "runner": "real"}] * 2}, "duplicate names"),
    ]
    for change, message in faults:
        with pytest.raises(ConfigError, match=message) as error:
            parse_config({**base, **change}, "profile.yaml")
        assert "\n" not in str(error.value) and str(error.value).startswith("profile.yaml: ")


def test_summary_table_and_markdown():
    metrics = {
        "methods": {
            "m": {
                "ifs_rate": 0.5,
                "ifs_by_judge": {"q": 0.5},
                "placement": 0.75,
                "ap": 0.123,
                "ap50": 0.2,
                "ap75": 0.1,
                "clip_score": 25.123,
                "fid": None,
                "images": 2,
                "instances": 4,
                "unparsable": 1,
            }
        }
    }
    [row] = summary_table(metrics)
    assert row["IFS"] == 50.0 and row["IFS q"] == 50.0 and row["AP"] == 12.3 and row["FID"] is None
    text = markdown_table([row])
    assert text.splitlines()[0].startswith("| method | IFS | IFS q |") and "| m | 50.0 |" in text


def test_profiles_evaluate_sections_load(tmp_path, monkeypatch):
    """Both profiles' sections validate where their local files are (paths relative to the run
    directory); sdxl.yaml names hub models, which validation accepts without downloading when
    the hub is not switched off."""

    from evaluation.config import load_config

    configs = CONFIGS
    for directory in (
        "out/tiny-models/grounding-dino",
        "out/tiny-models/qwen2-vl",
        "out/tiny-models/clip",
        "models/toy-base",
        "out/tiny-eval/gligen",
    ):
        (tmp_path / directory).mkdir(parents=True)
    (tmp_path / "out/tiny-eval/inception.pth").write_bytes(b"")
    (tmp_path / "models/pt_inception-2015-12-05-6726825d.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    tiny = load_config(configs / "tiny.yaml")
    assert [m.name for m in tiny.methods] == ["ifadapter", "sdxl", "gligen", "real"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    real_scale = load_config(configs / "sdxl.yaml")
    assert real_scale.report.paper_table and real_scale.benchmark.count == 1000
    assert [j.name for j in real_scale.judges] == ["qwen", "internvl"]


def test_findings_compare_the_adapter_and_rank_the_ablation():
    from evaluation.report import findings

    def method(ifs, placement=0.5):
        return {"ifs_rate": ifs, "placement": placement}

    paper_order = {
        "base": method(0.05, 0.1),
        "ifadapter": method(0.8),
        "ifadapter-no-appearance": method(0.7),
        "ifadapter-no-eot": method(0.3),
    }
    adapter, ablation = findings({"methods": paper_order})
    assert "IFS 80.0%" in adapter and "5.0% and 10.0%" in adapter
    assert ablation.endswith(": the paper's order.")
    swapped = {**paper_order, "ifadapter-no-eot": method(0.75)}
    assert "not the paper's order" in findings({"methods": swapped})[1]
    level = {name: method(0.0) for name in paper_order}
    assert "tied, so no order to compare" in findings({"methods": level})[1]
    assert findings({"methods": {"base": method(0.1)}}) == []
