"""The ``real-vae`` runner on a tiny SDXL base, and the per-attribute rates of the toy world's
exact judge carried from its verdicts to metrics.json, the records and report.html."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from annotate.toy.world import ToyInstance, ToyScene, render
from evaluation.benchmark import build_benchmark
from evaluation.config import BenchmarkConfig, GenerationConfig, parse_config
from evaluation.protocols import resolve
from evaluation.run import evaluate
from evaluation.runners import RealRunner, RealVAERunner, image_name
from ifadapter import tiny
from tests.support.shards import image_row, png, write_dataset

# Striped and dotted, well separated instances: every attribute is exact on the renders.
SCENES = [
    ToyScene(
        (
            ToyInstance("circle", "red", "striped", (0.05, 0.05, 0.45, 0.45)),
            ToyInstance("triangle", "blue", "dotted", (0.55, 0.5, 0.95, 0.9)),
        )
    ),
    ToyScene((ToyInstance("diamond", "green", "striped", (0.2, 0.2, 0.7, 0.7)),)),
    ToyScene(
        (
            ToyInstance("square", "purple", "dotted", (0.05, 0.5, 0.45, 0.9)),
            ToyInstance("circle", "yellow", "striped", (0.55, 0.05, 0.95, 0.45)),
        )
    ),
]


def toy_row(image_id: str, scene: ToyScene, image: Image.Image | None = None) -> dict:
    """A shard row as the oracle annotates a toy render (label = colour)."""
    image = render(scene) if image is None else image
    return image_row(
        image_id,
        png(image),
        image.width,
        image.height,
        caption=scene.caption,
        tags=sorted({i.colour for i in scene.instances}),
        instances=[
            {"box": list(i.box), "label": i.colour, "score": 1.0, "caption": i.caption}
            for i in scene.instances
        ],
        annotator=json.dumps({"oracle": "tests.evaluation.test_attributes"}),
    )


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    rows = [toy_row(f"toy-{k}", scene) for k, scene in enumerate(SCENES)]
    return write_dataset(tmp_path_factory.mktemp("toy-shards"), [rows[:2], rows[2:]])


@pytest.fixture(scope="module")
def half_base(tmp_path_factory):
    """The tiny SDXL base stored in float16, as the shipped toy base is."""
    path = tmp_path_factory.mktemp("tiny-sdxl-fp16")
    pipe = StableDiffusionXLPipeline(**tiny.components("tiny", seed=0))
    pipe.to(torch.float16).save_pretrained(path)
    return path


def test_real_vae_runner_returns_the_real_images_through_the_vae(
    tmp_path, half_base, one_torch_thread
):
    """Same sizes (one not a multiple of the VAE's factor), RGB, not the real pixels,
    deterministic, and a float32 VAE from a float16 base."""
    odd = ToyScene((ToyInstance("circle", "red", "solid", (0.1, 0.1, 0.6, 0.6)),))
    wide = render(odd).resize((70, 46))
    rows = [toy_row("toy-0", SCENES[0]), toy_row("toy-1", SCENES[1]), toy_row("odd", odd, wide)]
    shards = write_dataset(tmp_path / "shards", [rows])
    benchmark = build_benchmark(BenchmarkConfig(file=tmp_path / "b.json", shards=shards, count=3))
    generation = GenerationConfig(batch_size=3)
    assert resolve("runner", "real-vae") is RealVAERunner
    real = RealRunner(RealRunner.Settings(), "cpu", generation, benchmark)
    settings = RealVAERunner.Settings(base=str(half_base))
    runner = RealVAERunner(settings, "cpu", generation, benchmark)
    assert runner.vae.dtype == torch.float32 and runner.factor == 4
    seeds = [0] * len(benchmark.layouts)
    originals = real.generate(benchmark.layouts, seeds)
    images = runner.generate(benchmark.layouts, seeds)
    assert [i.size for i in images] == [i.size for i in originals]
    assert sorted(i.size for i in images) == [(64, 64), (64, 64), (70, 46)]
    assert all(i.mode == "RGB" for i in images)
    for image, original in zip(images, originals, strict=True):
        assert not np.array_equal(np.asarray(image), np.asarray(original))
    again = RealVAERunner(settings, "cpu", generation, benchmark)
    for image, repeat in zip(images, again.generate(benchmark.layouts, seeds), strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(repeat))


def test_attribute_rates_travel_to_metrics_records_and_report(
    tmp_path, toy_shards, half_base, one_torch_thread
):
    """The renders show every attribute (all rates 1); the same shapes drawn solid show their
    colour and shape but not the texture the layout asks for; the tiny random VAE's images keep
    IFS <= every attribute rate <= placement."""
    solid = tmp_path / "solid"
    solid.mkdir()
    for k, scene in enumerate(SCENES):
        drawn = ToyScene(
            tuple(ToyInstance(i.shape, i.colour, "solid", i.box) for i in scene.instances)
        )
        render(drawn).save(solid / f"{image_name(f'toy-{k}')}.png")
    section = {
        "benchmark": {
            "file": str(tmp_path / "benchmark.json"),
            "shards": str(toy_shards),
            "count": len(SCENES),
            "min_instances": 1,
            "max_instances": 4,
        },
        "detector": {"backend": "evaluation.backends.toy:ToyDetector"},
        "judges": [{"name": "toy-exact", "backend": "evaluation.backends.toy:ToyJudge"}],
        "methods": [
            {"name": "real", "runner": "real"},
            {"name": "solid", "runner": "images", "folder": str(solid)},
            {"name": "real-vae", "runner": "real-vae", "base": str(half_base)},
        ],
        "metrics": {"crop_padding": 0.0},
        "generation": {"seed": 0, "batch_size": 2},
        "report": {"gallery": 1},
        "threads": 1,
    }
    result = evaluate(parse_config(section), tmp_path / "out")
    methods = json.loads(result.metrics_path.read_text())["methods"]
    real, wrong, vae = methods["real"], methods["solid"], methods["real-vae"]
    assert real["instances"] == 5
    assert real["attributes"] == {"colour": 1.0, "shape": 1.0, "texture": 1.0}
    assert real["ifs_rate"] == real["placement"] == 1.0
    assert wrong["attributes"] == {"colour": 1.0, "shape": 1.0, "texture": 0.0}
    assert wrong["placement"] == 1.0 and wrong["ifs_rate"] == 0.0
    assert set(vae["attributes"]) == {"colour", "shape", "texture"}
    for rate in vae["attributes"].values():
        assert vae["ifs_rate"] <= rate <= vae["placement"]
    assert set(real["ifs_by_count"]) == {"1", "2"}
    assert real["ifs_overlap"] == {"overlapping": None, "separate": 1.0}

    [verdicts] = (tmp_path / "out" / "methods" / "solid").glob("*/verdicts-toy-exact-*.jsonl")
    entries = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert len(entries) == 5
    assert all(
        e["attributes"] == {"colour": True, "shape": True, "texture": False} for e in entries
    )
    rows = pq.read_table(tmp_path / "out" / "records" / "solid.parquet").to_pylist()
    assert all(r["verdicts"][0]["attributes"]["texture"] is False for r in rows)

    report = result.report_path.read_text()
    header = report[report.index("<caption>Measured") :]
    header = header[: header.index("</tr>")]
    columns = [c.split("</th>")[0] for c in header.split("<th>")[1:]]
    assert columns[:7] == [
        "method",
        "IFS",
        "IFS toy-exact",
        "colour",
        "shape",
        "texture",
        "placement",
    ]
    assert "<td>solid</td><td>0.0</td><td>0.0</td><td>100.0</td><td>100.0</td><td>0.0</td>" in (
        report
    )
    assert "| method | IFS | IFS toy-exact | colour | shape | texture | placement |" in (
        result.markdown
    )
    again = evaluate(parse_config(section), tmp_path / "out")  # from the cached verdicts
    assert again.metrics["methods"] == methods
