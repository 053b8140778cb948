"""Grounding-DINO as the benchmark's detector: the data engine's model and inference, prompted
with the labels of a layout's instances instead of an image's tags.

The engine's defaults suit annotation (a minimum box size, 16 instances at most); scoring wants
every detection above the threshold (COCO AP reads up to 100 per image, and an instance is matched
among all detections of its label), so those two defaults differ here.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from pydantic import Field, PositiveInt

from annotate.detectors.grounding_dino import GroundingDinoDetector, GroundingDinoSettings
from evaluation.protocols import Detection, InstanceDetector


class BenchmarkGroundingDinoSettings(GroundingDinoSettings):
    min_box_size: float = Field(0.0, ge=0.0, lt=1.0)
    max_instances: PositiveInt = 100


class GroundingDinoInstanceDetector(InstanceDetector):
    Settings = BenchmarkGroundingDinoSettings

    def __init__(self, settings: BenchmarkGroundingDinoSettings, device: str):
        super().__init__(settings, device)
        self.detector = GroundingDinoDetector(settings, device)

    def detect(
        self, images: Sequence[Image.Image], labels: Sequence[Sequence[str]]
    ) -> list[list[Detection]]:
        found = self.detector.detect_tags([image.convert("RGB") for image in images], labels)
        return [[Detection(d.box, d.label, d.score) for d in image] for image in found]
