"""The ``groundingdino_py`` detector in its own environment (``scripts/gdino_env.sh`` builds it
and runs this file with ``--noconftest``); skipped where the package is not installed."""

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip(
    "groundingdino",
    reason="groundingdino-py is not installed: it needs transformers < 5, so it has its own "
    "environment (scripts/gdino_env.sh builds .venv-gdino and runs this test there)",
)

from annotate.detectors.groundingdino_py import GroundingDinoPyDetector, GroundingDinoPySettings
from annotate.engine.records import Record
from tests.support.groundingdino_reference import (
    PROMPT,
    TINY_CONFIG,
    random_state,
    sample_image,
    write_text_encoder,
)
from tests.support.paths import FIXTURES

FIXTURE = FIXTURES / "groundingdino_py"
META = json.loads(FIXTURE.with_suffix(".json").read_text())
EXPECTED = load_file(FIXTURE.with_suffix(".safetensors"))


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    root = tmp_path_factory.mktemp("gdino")
    (root / "tiny_cfg.py").write_text(TINY_CONFIG)
    torch.save({"model": random_state(META["layout"], META["seed"])}, root / "tiny.pth")
    settings = GroundingDinoPySettings(
        config=str(root / "tiny_cfg.py"),
        checkpoint=str(root / "tiny.pth"),
        text_encoder=str(write_text_encoder(root / "bert")),
        image_side=224,
        max_side=400,
        max_instances=5,
    )
    return GroundingDinoPyDetector(settings, "cpu")


def test_outputs_are_the_original_codes(detector):
    text = detector.tokenizer([PROMPT], padding="longest", return_tensors="pt")
    probabilities, boxes = detector._forward([sample_image()], [PROMPT], text)
    expected = EXPECTED["logits"].sigmoid()
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes, EXPECTED["boxes"], atol=1e-5, rtol=0)


def test_detects_tags_within_limits(detector):
    image = sample_image()
    record = Record(
        uri="mem",
        source="test",
        partition=0,
        position=0,
        pixels=image.tobytes(),
        pixels_size=image.size,
        tags=["cat", "dog house", "red lamp"],
    )
    empty = Record(uri="mem2", source="test", partition=0, position=1, tags=[])
    found = detector.detect([record, empty])
    assert found[1] == [] and 0 < len(found[0]) <= 5
    for d in found[0]:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and d.label in record.tags
