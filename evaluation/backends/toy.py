"""The toy world's exact verifiers as the benchmark's detector and judge.

With them, the IFG metrics run unchanged on the toy world (docs/toy-world.md): the detector
finds each colour's connected regions where Grounding-DINO would find the prompted labels (an
instance's label is its colour, as the oracle annotator writes it), and the judge checks the
matched crop's colour, shape and texture where a VLM would answer yes or no. Neither loads a
model; both are exact, so every difference between methods in the toy report is the
generator's.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from annotate.toy.verifiers import detect, verify
from annotate.toy.world import ToyInstance, parse_description
from annotate.vlm.judge import Verdict
from evaluation.protocols import Detection, InstanceDetector, InstanceJudge

QUESTION_VERSION = "toy-exact-1"


class ToyDetector(InstanceDetector):
    """Each prompted colour's regions, as boxes; labels outside the world's colours find
    nothing."""

    def detect(
        self, images: Sequence[Image.Image], labels: Sequence[Sequence[str]]
    ) -> list[list[Detection]]:
        found = []
        for image, wanted in zip(images, labels, strict=True):
            prompted = set(wanted)
            found.append(
                [Detection(d.box, d.colour, d.score) for d in detect(image) if d.colour in prompted]
            )
        return found


class ToyJudge(InstanceJudge):
    """Yes when the whole crop shows the description's colour, shape and texture, each of which
    is also reported on its own (``Verdict.attributes``). A description the world cannot produce
    has no answer (recorded with its reason, counted as a failure), as an unreadable VLM reply
    would."""

    question_version = QUESTION_VERSION
    attributes = ("colour", "shape", "texture")

    def ask(self, items: Sequence[tuple[Image.Image, str]]) -> list[Verdict]:
        verdicts = []
        for crop, description in items:
            try:
                shape, colour, texture = parse_description(description)
            except ValueError as error:
                verdicts.append(Verdict(None, f"unparsable: {error}"))
                continue
            check = verify(crop, ToyInstance(shape, colour, texture, (0.0, 0.0, 1.0, 1.0)))
            reason = None
            if not check.success:
                wrong = [
                    f"{what} {seen}"
                    for what, ok, seen in (
                        ("colour", check.colour, "differs"),
                        ("shape", check.shape, check.predicted_shape),
                        ("texture", check.texture, check.predicted_texture),
                    )
                    if not ok
                ]
                reason = "saw " + ", ".join(wrong)
            seen = {"colour": check.colour, "shape": check.shape, "texture": check.texture}
            verdicts.append(Verdict(check.success, reason, seen))
        return verdicts
