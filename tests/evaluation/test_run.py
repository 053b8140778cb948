"""The benchmark end to end on tiny real-architecture models: shards -> benchmark file ->
generation by every runner -> Grounding-DINO, the tiny Qwen2-VL judge (in process and over the
HTTP server), CLIP score, FID -> metrics.json and report.html; then a rerun that makes nothing
again, and the CLI."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from diffusers import StableDiffusionXLPipeline

from evaluation.config import parse_config
from evaluation.report import load_table
from evaluation.run import evaluate
from ifadapter import IFAdapter, tiny
from ifadapter.cli import main
from tests.conftest import open_gates
from tests.support.shards import default_rows, write_dataset


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    from annotate.tiny.benchmark import write_tiny_eval_models

    return write_tiny_eval_models(tmp_path_factory.mktemp("tiny-eval"))


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    base = StableDiffusionXLPipeline.from_pretrained(base_dir)
    torch.manual_seed(0)
    adapter = open_gates(IFAdapter.for_unet(base.unet, **tiny.adapter_config()))
    path = tmp_path_factory.mktemp("adapter")
    adapter.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rows = default_rows(6)
    return write_dataset(tmp_path_factory.mktemp("eval-shards"), [rows[:3], rows[3:]])


def profile(tmp_path, shards, base_dir, adapter_dir, models, tiny_models_root, judge: dict):
    return {
        "benchmark": {"file": str(tmp_path / "benchmark.json"), "shards": str(shards), "count": 4},
        "detector": {
            "backend": "grounding_dino",
            "model": str(tiny_models_root / "out" / "tiny-models" / "grounding-dino"),
            "box_threshold": 0.0,
            "text_threshold": 0.0,
            "batch_size": 4,
        },
        "judges": [judge],
        "methods": [
            {
                "name": "ifadapter",
                "runner": "ifadapter",
                "base": str(base_dir),
                "adapter": str(adapter_dir),
                "steps": 2,
            },
            {"name": "sdxl", "runner": "sdxl", "base": str(base_dir), "steps": 2},
            {"name": "gligen", "runner": "gligen", "model": str(models / "gligen"), "steps": 2},
            {"name": "real", "runner": "real"},
        ],
        "metrics": {
            # random-weight Grounding-DINO boxes are small: a low threshold lets instances through
            # to the judges, so that every stage runs
            "iou_threshold": 0.005,
            "clip": {"model": str(models / "clip")},
            "fid": {"inception": str(models / "inception.pth")},
        },
        "generation": {"seed": 0, "batch_size": 2, "height": 64, "width": 64},
        "report": {"paper_table": True, "gallery": 2},
        "threads": 1,
    }


def test_evaluate_end_to_end_and_resume(
    tmp_path, shards, base_dir, adapter_dir, eval_models, tiny_models_root, tiny_vlm
):
    judge = {"name": "qwen", "backend": "vlm_transformers", "model": str(tiny_vlm("qwen2_vl"))}
    data = profile(tmp_path, shards, base_dir, adapter_dir, eval_models, tiny_models_root, judge)
    output = tmp_path / "out"
    result = evaluate(parse_config(data), output)

    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["benchmark"]["count"] == 4 and len(metrics["benchmark"]["sha256"]) == 64
    assert list(metrics["methods"]) == ["ifadapter", "sdxl", "gligen", "real"]
    for name, m in metrics["methods"].items():
        assert m["images"] == 4 and m["instances"] == metrics["benchmark"]["instances"], name
        for key in ("ifs_rate", "placement", "ap", "ap50", "ap75", "clip_score", "fid"):
            assert isinstance(m[key], float), (name, key)
        assert set(m["ifs_by_judge"]) == {"qwen"}
        assert set(m["ifs_by_size"]) == {"small", "medium", "large"}
        assert set(m["ifs_overlap"]) == {"overlapping", "separate"}
        assert set(m["ifs_by_count"]) <= {"1", "2"} and isinstance(m["unparsable"], int)
    fids = {name: m["fid"] for name, m in metrics["methods"].items()}
    assert fids["real"] < 1e-3 * min(fids["sdxl"], fids["gligen"]), fids  # reference = real

    records = pq.read_table(output / "records" / "ifadapter.parquet").to_pylist()
    assert len(records) == metrics["benchmark"]["instances"]
    judged = [r for r in records if r["placed"]]
    assert judged and all(r["verdicts"][0]["judge"] == "qwen" for r in judged)
    assert all(r["verdicts"][0]["answer"] in (True, False) for r in judged)  # grammar-shaped
    assert all(r["verdicts"] == [] for r in records if not r["placed"])

    report = result.report_path.read_text()
    for name in metrics["methods"]:
        assert f"<b>{name}</b>" in report and f"<td>{name}</td>" in report
    assert "Reported in the paper" in report and "<svg" in report
    assert report.count('src="data:image/png;base64,') == 2 * 4
    assert not re.search(r'src="(?!data:)', report)  # self-contained
    assert [row["method"] for row in result.table] == list(metrics["methods"])
    assert "| ifadapter |" in result.markdown
    assert load_table(result.metrics_path) == (result.table, result.markdown)

    images = sorted([*(output / "methods").rglob("*.png"), *output.rglob("*.npy")])
    assert len([path for path in images if path.suffix == ".npy"]) == 1 + 4  # FID features
    stamps = {path: path.stat().st_mtime_ns for path in images}
    logs = {path: path.stat().st_size for path in (output / "methods").rglob("*.jsonl")}
    again = evaluate(parse_config(data), output)
    assert again.metrics["methods"] == metrics["methods"]
    assert {path: path.stat().st_mtime_ns for path in images} == stamps  # nothing made again
    assert {p: p.stat().st_size for p in (output / "methods").rglob("*.jsonl")} == logs


def test_folder_runner_scores_like_the_method_that_made_the_images(
    tmp_path, shards, base_dir, adapter_dir, eval_models, tiny_models_root, tiny_vlm
):
    """The HTTP judge (annotate.vlm.server) gives the in-process judge's answers, and images read
    from a folder score exactly as the method that generated them."""
    from annotate.vlm.in_process import TransformersChatClient
    from annotate.vlm.server import ChatCompletionsServer, running

    client = TransformersChatClient(str(tiny_vlm("qwen2_vl")), "cpu", max_batch=8)
    with running(ChatCompletionsServer(client, "qwen")) as url:
        judge = {"name": "qwen", "backend": "vlm_http", "url": url, "model": "qwen"}
        data = profile(
            tmp_path, shards, base_dir, adapter_dir, eval_models, tiny_models_root, judge
        )
        data["methods"] = data["methods"][:1]
        data["metrics"] = {"iou_threshold": 0.005}
        first = evaluate(parse_config(data), tmp_path / "out")
        [folder] = (tmp_path / "out" / "methods" / "ifadapter").glob("*/images")
        data["methods"].append({"name": "copy", "runner": "images", "folder": str(folder)})
        second = evaluate(parse_config(data), tmp_path / "out")
    original, copy = second.metrics["methods"]["ifadapter"], second.metrics["methods"]["copy"]
    assert copy == original == first.metrics["methods"]["ifadapter"]
    assert original["placement"] > 0 and original["ifs_by_judge"]["qwen"] is not None


def test_cli_evaluate_reports_bad_input_in_one_line(tmp_path, capsys):
    config = tmp_path / "profile.yaml"
    config.write_text(yaml.safe_dump({"evaluate": {"benchmark": {"file": "x"}, "methods": []}}))
    assert main(["evaluate", "--config", str(config), "--output", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ifadapter evaluate: error: ") and "\n" not in error
    assert "at least one method" in error
    missing = tmp_path / "benchmark.json"
    config.write_text(
        yaml.safe_dump(
            {
                "evaluate": {
                    "benchmark": {"file": str(missing)},
                    "methods": [{"name": "real", "runner": "real"}],
                    "metrics": {"ifs": False, "ap": False},
                }
            }
        )
    )
    assert main(["evaluate", "--config", str(config), "--output", str(tmp_path / "o")]) == 2
    assert "benchmark.shards is not set" in capsys.readouterr().err


def test_ifadapter_runner_with_a_lora(tmp_path, base_dir, adapter_dir, shards, one_torch_thread):
    """A LoRA on the base (saved as diffusers saves LoRAs) changes the images; scale 0 does not."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from evaluation.benchmark import build_benchmark
    from evaluation.config import BenchmarkConfig, GenerationConfig
    from evaluation.runners import IFAdapterRunner

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False
        )
    )
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
    )
    benchmark = build_benchmark(BenchmarkConfig(file=tmp_path / "b.json", shards=shards, count=1))
    generation = GenerationConfig(height=64, width=64)

    def image(**lora):
        settings = IFAdapterRunner.Settings(
            base=str(base_dir), adapter=adapter_dir, steps=2, **lora
        )
        runner = IFAdapterRunner(settings, "cpu", generation, benchmark)
        return torch.tensor(list(runner.generate(benchmark.layouts, [0])[0].getdata())).float()

    plain = image()
    assert (image(lora=str(tmp_path / "lora")) - plain).abs().mean() > 1
    assert torch.equal(image(lora=str(tmp_path / "lora"), lora_scale=0.0), plain)
