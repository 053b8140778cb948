"""The toy world and its exact verifiers: near 100% on real renders, near chance on noise."""

import numpy as np
import pytest

from annotate.toy.verifiers import best_iou, detect, verify
from annotate.toy.world import COLOURS, SHAPES, TEXTURES, ToyInstance, ToyScene, render, scenes


def rates(scene_list, images):
    counts = {"colour": 0, "shape": 0, "texture": 0, "located": 0}
    total = 0
    for scene, image in zip(scene_list, images, strict=True):
        detections = detect(image)
        for instance in scene.instances:
            verdict = verify(image, instance)
            counts["colour"] += verdict.colour
            counts["shape"] += verdict.shape
            counts["texture"] += verdict.texture
            counts["located"] += best_iou(detections, instance) >= 0.5
            total += 1
    return {key: value / total for key, value in counts.items()}


def test_world_is_deterministic_and_varied():
    first, again = scenes(7, 50), scenes(7, 80)[:50]
    assert first == again
    assert np.array_equal(np.asarray(render(first[3])), np.asarray(render(again[3])))
    counts = [len(s.instances) for s in first]
    assert min(counts) == 1 and max(counts) == 4
    used = {(i.shape, i.colour, i.texture) for s in scenes(7, 300) for i in s.instances}
    assert len(used) > 0.9 * len(SHAPES) * len(COLOURS) * len(TEXTURES)
    assert all(len({i.colour for i in s.instances}) == len(s.instances) for s in first)


def test_caption_names_every_instance_left_to_right():
    scene = ToyScene(
        (
            ToyInstance("square", "orange", "dotted", (0.5, 0.1, 0.9, 0.5)),
            ToyInstance("circle", "red", "solid", (0.0, 0.0, 0.4, 0.4)),
        )
    )
    assert scene.caption == "a red solid circle and an orange dotted square"


def test_verifiers_are_exact_on_renders_and_near_chance_on_noise():
    scene_list = scenes(11, 120)
    real = rates(scene_list, [render(s) for s in scene_list])
    assert real["colour"] == real["texture"] == real["located"] == 1.0
    assert real["shape"] > 0.99  # shapes are fitted to what is visible: occlusion can mislead
    rng = np.random.default_rng(0)
    noise = rates(
        scene_list, [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in scene_list]
    )
    assert noise["colour"] < 0.2 and noise["located"] < 0.05
    assert noise["shape"] < 0.35 and noise["texture"] < 0.45  # chance: 1/4 and 1/3
    shuffled = rates(scene_list, [render(s) for s in scene_list[1:] + scene_list[:1]])
    assert max(shuffled.values()) < 0.25


@pytest.mark.parametrize("texture", TEXTURES)
def test_each_texture_is_told_apart(texture):
    instance = ToyInstance("circle", "blue", texture, (0.2, 0.2, 0.8, 0.8))
    verdict = verify(render(ToyScene((instance,))), instance)
    assert verdict.predicted_texture == texture and verdict.success
