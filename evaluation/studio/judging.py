"""Each instance's verdict, as the benchmark reaches it: find the instance (the detector, IoU
with its box), then ask the judge about the found region.

The judges are the toy world's exact verifiers (``evaluation.toy_backends``): an instance
described as the world describes its shapes ("a red striped circle") is judged; any other
description has no judge here and says so, instead of a verdict nobody could trust.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from annotate.crops import crop_box
from annotate.toy_world import parse_description
from evaluation.metrics import match
from evaluation.toy_backends import ToyDetector, ToyJudge
from ifadapter.layout import Layout

IOU_THRESHOLD = 0.5  # the benchmark's default (evaluation.config MetricsConfig)
CROP_PADDING = 0.0  # the toy profile's: the exact judge reads the crop's own shape
ATTRIBUTES = ("colour", "shape", "texture")


@dataclass(frozen=True)
class InstanceVerdict:
    """What the judges made of one instance. ``judged`` is False when no judge knows its
    description; ``found`` is whether the detector placed it (IoU at the threshold);
    ``attributes`` holds the judge's per-attribute answers once it was found."""

    number: int
    caption: str
    judged: bool
    iou: float = 0.0
    found: bool = False
    attributes: dict[str, bool] | None = None
    reason: str | None = None

    @property
    def right(self) -> bool:
        return self.found and bool(self.attributes) and all(self.attributes.values())

    @property
    def summary(self) -> str:
        if not self.judged:
            return "no judge for this description"
        if not self.found:
            return f"not found (IoU {self.iou:.2f} < {IOU_THRESHOLD})"
        return "right" if self.right else (self.reason or "wrong")


def judge(image: Image.Image, layout: Layout) -> list[InstanceVerdict]:
    """A verdict per instance of ``layout`` in ``image``, in the layout's order."""
    colours: dict[int, str] = {}
    for index, instance in enumerate(layout.instances):
        try:
            colours[index] = parse_description(instance.caption)[1]
        except ValueError:
            continue
    detections = ToyDetector(ToyDetector.Settings(), "cpu").detect(
        [image], [sorted(set(colours.values()))]
    )[0]
    verdicts = []
    for index, instance in enumerate(layout.instances):
        number, caption = index + 1, instance.caption
        if index not in colours:
            verdicts.append(InstanceVerdict(number, caption, judged=False))
            continue
        found, overlap = match(instance.box, colours[index], detections)
        if found is None or overlap < IOU_THRESHOLD:
            verdicts.append(InstanceVerdict(number, caption, True, overlap))
            continue
        crop = crop_box(image, found.box, CROP_PADDING)
        answer = ToyJudge(ToyJudge.Settings(), "cpu").ask([(crop, caption)])[0]
        verdicts.append(
            InstanceVerdict(number, caption, True, overlap, True, answer.attributes, answer.reason)
        )
    return verdicts
