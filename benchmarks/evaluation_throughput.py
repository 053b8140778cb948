"""Throughput of the IFG evaluation on the tiny models, stage by stage, and what a rerun costs.

One command, side by side: the whole ``evaluate()`` on ``--layouts`` layouts (64x64 shard
images, 1-2 instances each) with four methods (ifadapter and sdxl at ``--steps`` Euler steps,
GLIGEN, the real images), the tiny Grounding-DINO, the tiny Qwen2-VL judge in process, the tiny
CLIP and a random Inception-v3 for FID, on one torch thread. Reported per stage: seconds
(model loading included) and images/s, where the stage's images are every method's (the
generation stages count their own method's). Then the same command again into the same output,
where everything is cached (the resume path).

    python -m benchmarks.evaluation_throughput [--layouts 32] [--steps 10] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import StableDiffusionXLPipeline

from annotate.tiny.benchmark import write_tiny_eval_models
from annotate.tiny.models import write_tiny_models
from annotate.tiny.vlm import write_tiny_vlm
from evaluation.config import parse_config
from evaluation.run import evaluate
from ifadapter import IFAdapter, tiny
from tests.support.shards import default_rows, write_dataset

METHODS = ("ifadapter", "sdxl", "gligen", "real")


def build(root: Path, layouts: int) -> dict[str, Path]:
    """Every tiny model and a shard set of ``layouts`` images under ``root``."""
    paths = {
        "base": root / "base",
        "adapter": root / "adapter",
        "models": write_tiny_models(root / "models", vocabulary="ram"),
        "eval": write_tiny_eval_models(root / "eval"),
        "qwen": write_tiny_vlm(root / "qwen2-vl", "qwen2_vl"),
    }
    components = tiny.components(seed=0)
    StableDiffusionXLPipeline(**components).save_pretrained(paths["base"])
    adapter = IFAdapter.for_unet(components["unet"], **tiny.adapter_config())
    with torch.no_grad():  # open the gates: an untrained adapter is the identity
        for layer in adapter.ism_layers.values():
            layer.gate.fill_(1.0)
    adapter.save_pretrained(paths["adapter"])
    rows = default_rows(layouts)
    paths["shards"] = write_dataset(root / "shards", [rows[: layouts // 2], rows[layouts // 2 :]])
    return paths


def profile(paths: dict[str, Path], root: Path, layouts: int, steps: int) -> dict:
    return {
        "benchmark": {
            "file": str(root / "benchmark.json"),
            "shards": str(paths["shards"]),
            "count": layouts,
        },
        "detector": {
            "backend": "grounding_dino",
            "model": str(paths["models"] / "grounding-dino"),
            "box_threshold": 0.0,
            "text_threshold": 0.0,
            "batch_size": 8,
        },
        "judges": [{"name": "qwen", "backend": "vlm_transformers", "model": str(paths["qwen"])}],
        "methods": [
            {
                "name": "ifadapter",
                "runner": "ifadapter",
                "base": str(paths["base"]),
                "adapter": str(paths["adapter"]),
                "steps": steps,
            },
            {"name": "sdxl", "runner": "sdxl", "base": str(paths["base"]), "steps": steps},
            {
                "name": "gligen",
                "runner": "gligen",
                "model": str(paths["eval"] / "gligen"),
                "steps": steps,
            },
            {"name": "real", "runner": "real"},
        ],
        "metrics": {
            "iou_threshold": 0.005,  # random boxes are small: let instances reach the judge
            "clip": {"model": str(paths["models"] / "clip")},
            "fid": {"inception": str(paths["eval"] / "inception.pth")},
        },
        "generation": {"batch_size": 8, "height": 64, "width": 64},
        "report": {"gallery": 8},
        "threads": 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, args.layouts)
        config = parse_config(profile(paths, root, args.layouts, args.steps))
        first = evaluate(config, root / "out")
        again = evaluate(config, root / "out")
        placed = {
            m: round(
                first.metrics["methods"][m]["placement"] * first.metrics["benchmark"]["instances"]
            )
            for m in METHODS
        }
    images = args.layouts * len(METHODS)
    print(
        f"{args.layouts} layouts x {len(METHODS)} methods, 64x64, {args.steps} steps, "
        "tiny models, one torch thread"
    )
    print(f"{'stage':<20}{'s':>8}{'images/s':>10}{'share':>8}{'rerun s':>9}")
    total = sum(first.timings.values())
    for stage, seconds in first.timings.items():
        count = args.layouts if stage.startswith("generate") else images
        rate = f"{count / seconds:>10.1f}" if stage not in ("benchmark", "report") else f"{'-':>10}"
        print(
            f"{stage:<20}{seconds:>8.2f}{rate}{seconds / total:>8.1%}"
            f"{again.timings.get(stage, 0.0):>9.2f}"
        )
    rerun = sum(again.timings.values())
    print(f"{'total':<20}{total:>8.2f}{images / total:>10.1f}{'':>8}{rerun:>9.2f}")
    print(f"instances placed (so judged) per method at IoU >= 0.005: {placed}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"first": first.timings, "rerun": again.timings, "placed": placed}, indent=2)
        )


if __name__ == "__main__":
    main()
