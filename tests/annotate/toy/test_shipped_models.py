"""The toy models shipped in ``models/``: the base passes its quality gate, the adapter controls.

Both are measured with the toy world's exact verifiers on a few held-out samples; the thresholds
sit below the recorded figures (``models/toy-base/training_record.json``, the adapter's
``metrics.json``) with room for the noise of a few dozen samples.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from annotate.toy.base import QUALITY_GATE, BaseTrainingConfig, evaluate_base
from annotate.toy.verifiers import best_iou, detect, verify
from annotate.toy.world import scenes
from ifadapter import IFAdapter, IFAdapterSDXLPipeline
from tests.support.paths import MODELS

BASE, ADAPTER = MODELS / "toy-base", MODELS / "toy-adapter"
HELD_OUT = 7  # a world seed neither model was trained or benchmarked on


@pytest.fixture(scope="module")
def base_scores() -> dict[str, float]:
    """Single-shape scores of the shipped base on 24 samples (its record used 48)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return evaluate_base(pipe, BaseTrainingConfig(eval_samples=24, eval_steps=25))


def test_shipped_base_renders_as_its_record_says(base_scores):
    recorded = json.loads((BASE / "training_record.json").read_text())["single_shape_scores"]
    for attribute in QUALITY_GATE:
        assert base_scores[attribute] >= recorded[attribute] - 0.2, (attribute, base_scores)


def test_shipped_base_passes_its_quality_gate(base_scores):
    for attribute, floor in QUALITY_GATE.items():
        assert base_scores[attribute] >= floor - 0.1, (attribute, base_scores)


def layout_scores(images, layouts) -> dict[str, float]:
    placed = coloured = 0
    instances = [i for scene in layouts for i in scene.instances]
    for image, scene in zip(images, layouts, strict=True):
        found = detect(image)
        for instance in scene.instances:
            placed += best_iou(found, instance) >= 0.5
            coloured += verify(image, instance).colour
    return {"placement": placed / len(instances), "colour_in_box": coloured / len(instances)}


@pytest.fixture(scope="module")
def held_out_layouts():
    return [scene for scene in scenes(HELD_OUT, 24) if len(scene.instances) >= 2][:8]


def test_shipped_adapter_moves_each_colour_into_its_box(held_out_layouts):
    adapter = IFAdapter.from_pretrained(ADAPTER, dtype=torch.float32)
    pipe = IFAdapterSDXLPipeline.from_pretrained(BASE, adapter=adapter, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = [scene.caption for scene in held_out_layouts]

    def generate(instances):
        return pipe(
            prompts,
            instances,
            num_inference_steps=20,
            guidance_scale=3.0,
            unconditional_layout="none",
            generator=torch.Generator().manual_seed(0),
        ).images

    instances = [
        [{"box": i.box, "caption": i.caption} for i in scene.instances]
        for scene in held_out_layouts
    ]
    with_adapter = layout_scores(generate(instances), held_out_layouts)
    without = layout_scores(generate(None), held_out_layouts)
    # On 8 layouts: placement 0.90 against 0.0, colour 0.90 against 0.57. Recorded on the 64
    # benchmark layouts (metrics.json, CFG 3, "none"): placement 0.92 against the base's 0.09,
    # colour 0.91 against 0.09.
    assert with_adapter["placement"] >= without["placement"] + 0.4, (with_adapter, without)
    assert with_adapter["colour_in_box"] >= without["colour_in_box"] + 0.25, (with_adapter, without)
