"""Each instance's verdict, as the benchmark reaches it: find the instance (the detector, IoU
with its box), then ask the judge about the found region.

By default the judges are the toy world's exact verifiers (``evaluation.backends.toy``): an
instance described as the world describes its shapes ("a red striped circle") is judged; any
other description has no judge and says so, instead of a verdict nobody could trust. With real
models, the detector and VLM judges of an ``evaluate:`` profile judge every instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from annotate.toy.world import parse_description
from annotate.vlm.crops import crop_box
from evaluation.backends.toy import ToyDetector, ToyJudge
from evaluation.config import load_config
from evaluation.metrics import match, objections
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
    threshold: float = IOU_THRESHOLD

    @property
    def right(self) -> bool:
        return self.found and bool(self.attributes) and all(self.attributes.values())

    @property
    def summary(self) -> str:
        if not self.judged:
            return "no judge for this description"
        if not self.found:
            return f"not found (IoU {self.iou:.2f} < {self.threshold})"
        return "right" if self.right else (self.reason or "wrong")


class Judging(Protocol):
    """How the page judges a generated image: ``columns`` name the per-instance answers its
    verdicts carry (``InstanceVerdict.attributes``), ``name`` says who judges."""

    name: str
    columns: tuple[str, ...]

    def judge(self, image: Image.Image, layout: Layout) -> list[InstanceVerdict]: ...


class ToyJudging:
    """The toy world's exact verifiers: a description the world would write ("a red striped
    circle") is found by its colour and judged attribute by attribute."""

    name = "toy world's exact judges"
    columns = ATTRIBUTES

    def __init__(self) -> None:
        self.detector = ToyDetector(ToyDetector.Settings(), "cpu")
        self.verifier = ToyJudge(ToyJudge.Settings(), "cpu")

    def judge(self, image: Image.Image, layout: Layout) -> list[InstanceVerdict]:
        """A verdict per instance of ``layout`` in ``image``, in the layout's order."""
        colours: dict[int, str] = {}
        for index, instance in enumerate(layout.instances):
            try:
                colours[index] = parse_description(instance.caption)[1]
            except ValueError:
                continue
        detections = self.detector.detect([image], [sorted(set(colours.values()))])[0]
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
            answer = self.verifier.ask([(crop, caption)])[0]
            verdicts.append(
                InstanceVerdict(
                    number, caption, True, overlap, True, answer.attributes, answer.reason
                )
            )
        return verdicts


class ProfileJudging:
    """The detector and the VLM judges of an ``evaluate:`` profile, as the benchmark runs them:
    each instance's description prompts the detector (the benchmark prompts with the detector's
    class; a layout drawn here has only the description), the detection of it with the highest
    IoU to the box is the match, and every judge is asked about the matched crop. A verdict's
    columns are the judges' answers."""

    def __init__(self, profile: str | Path, device: str):
        config = load_config(profile)
        if config.detector is None or not config.judges:
            raise ValueError(f"{profile}: its evaluate: section names no detector or no judge")
        self.name = f"{config.detector.backend} + " + ", ".join(j.name for j in config.judges)
        self.detector = config.detector.backend_class()(config.detector.settings, device)
        self.judges = {j.name: j.backend_class()(j.settings, device) for j in config.judges}
        self.columns = tuple(self.judges)
        self.iou_threshold = config.metrics.iou_threshold
        self.crop_padding = config.metrics.crop_padding

    def judge(self, image: Image.Image, layout: Layout) -> list[InstanceVerdict]:
        captions = [instance.caption for instance in layout.instances]
        detections = self.detector.detect([image], [sorted(set(captions))])[0]
        verdicts = []
        for number, instance in enumerate(layout.instances, 1):
            found, overlap = match(instance.box, instance.caption, detections)
            if found is None or overlap < self.iou_threshold:
                verdicts.append(
                    InstanceVerdict(
                        number, instance.caption, True, overlap, threshold=self.iou_threshold
                    )
                )
                continue
            crop = crop_box(image, found.box, self.crop_padding)
            answers = {
                name: j.ask([(crop, instance.caption)])[0] for name, j in self.judges.items()
            }
            said = objections({name: (a.answer, a.reason) for name, a in answers.items()})
            verdicts.append(
                InstanceVerdict(
                    number,
                    instance.caption,
                    True,
                    overlap,
                    True,
                    {name: a.answer is True for name, a in answers.items()},
                    "; ".join(said) or None,
                    threshold=self.iou_threshold,
                )
            )
        return verdicts
