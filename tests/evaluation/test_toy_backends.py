"""The IFG benchmark on the toy world: the exact verifiers in the detector's and judge's roles."""

import json

import pytest
import yaml

from annotate.config import load_config as load_annotate_config
from annotate.engine.job import annotate
from annotate.sources import open_source
from annotate.toy.world import ToyInstance, ToyScene, render
from evaluation.backends.toy import ToyDetector, ToyJudge
from evaluation.config import parse_config
from evaluation.run import evaluate
from tests.annotate.toy.test_source import DEMO_PROFILE


def test_toy_judge_and_detector_on_a_render():
    circle = ToyInstance("circle", "red", "striped", (0.1, 0.1, 0.5, 0.5))
    square = ToyInstance("square", "blue", "solid", (0.55, 0.5, 0.95, 0.9))
    image = render(ToyScene((circle, square)))
    (found,) = ToyDetector(ToyDetector.Settings(), "cpu").detect([image], [["red", "blue"]])
    assert sorted(d.label for d in found) == ["blue", "red"]
    red = next(d for d in found if d.label == "red")
    x0, y0, x1, y1 = (round(v * 64) for v in red.box)
    crop = image.crop((x0, y0, x1, y1))
    judge = ToyJudge(ToyJudge.Settings(), "cpu")
    yes, wrong_shape, not_toy = judge.ask(
        [(crop, circle.caption), (crop, "a red striped square"), (crop, "a cat")]
    )
    assert yes.answer is True
    assert yes.attributes == {"colour": True, "shape": True, "texture": True}
    assert wrong_shape.answer is False and "shape" in wrong_shape.reason
    assert wrong_shape.attributes == {"colour": True, "shape": False, "texture": True}
    assert not_toy.answer is None and "unparsable" in not_toy.reason
    assert not_toy.attributes is None


@pytest.fixture(scope="module")
def toy_benchmark_shards(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-bench") / "shards"
    annotate(load_annotate_config(DEMO_PROFILE), open_source("toy:seed=21,count=24"), out)
    return out


def test_toy_benchmark_scores_renders_perfectly_and_the_base_lower(toy_benchmark_shards, tmp_path):
    section = yaml.safe_load(DEMO_PROFILE.read_text())["evaluate"]
    section["benchmark"].update(file=str(tmp_path / "benchmark.json"), count=16)
    section["benchmark"]["shards"] = str(toy_benchmark_shards)
    base = next(m for m in section["methods"] if m["name"] == "base")
    base["steps"] = 4
    section["methods"] = [base, {"name": "real", "runner": "real"}]
    section["threads"] = 1
    result = evaluate(parse_config(section), tmp_path / "eval")
    methods = json.loads(result.metrics_path.read_text())["methods"]
    real = methods["real"]
    # A square is drawn 10% inside its box, so its detection never reaches IoU 0.75: AP50 is
    # exact, the COCO average over 0.5:0.95 is not.
    assert real["placement"] == 1.0 and real["ap50"] > 0.99 and real["ap"] > 0.5
    assert real["ifs_rate"] > 0.95  # an instance covered by a later one may lose its outline
    assert real["instances"] >= 16 and real["unparsable"] == 0
    assert methods["base"]["ifs_rate"] < 0.5 and methods["base"]["placement"] < 0.5
    html = result.report_path.read_text()
    assert "base" in html and "real" in html
