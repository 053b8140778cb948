"""The toy world's oracle annotator: tags, boxes and captions read from the generator's ground
truth (the ``toy_instances`` column of ``annotate.toy.source.ToySource``) instead of models.

In the toy world the answers are known exactly, so the data engine runs for real (decode,
quarantine, shards, manifest, resume) while the annotations are perfect; the provenance names
the oracle, so a shard never passes for model output. An instance's label is its colour: colours
are distinct within a scene, and colour is what the world's exact detector
(``annotate.toy.verifiers.detect``) finds, as Grounding-DINO finds the tag it was prompted
with.
"""

from __future__ import annotations

from collections.abc import Sequence

from annotate.backends import Captioner, Detector, Tagger
from annotate.engine.records import Captions, Detection, Record
from annotate.toy.world import ToyInstance


def _truth(record: Record) -> list[ToyInstance]:
    truth = record.extras.get("toy_instances")
    if truth is None:
        raise ValueError(f"{record.uri} has no toy_instances: the oracle reads toy: sources only")
    return [
        ToyInstance(i["shape"], i["colour"], i["texture"], tuple(float(v) for v in i["box"]))
        for i in truth
    ]


class OracleTagger(Tagger):
    """The colours present, the labels the oracle detector is then 'prompted' with."""

    def tag(self, records: Sequence[Record]) -> list[list[str]]:
        return [[i.colour for i in _truth(record)] for record in records]


class OracleDetector(Detector):
    """Every instance's true box with score 1, labelled by its colour."""

    def detect(self, records: Sequence[Record]) -> list[list[Detection]]:
        return [[Detection(i.box, i.colour, 1.0) for i in _truth(r)] for r in records]


class OracleCaptioner(Captioner):
    """The world's own captions: the scene caption, and "a red striped circle" per instance
    (matched by colour, so the detector's order does not matter)."""

    def caption(self, records: Sequence[Record]) -> list[Captions]:
        answers = []
        for record in records:
            by_colour = {i.colour: i.caption for i in _truth(record)}
            answers.append(
                Captions(
                    caption=record.source_caption or "",
                    instances=[by_colour[d.label] for d in record.instances],
                )
            )
        return answers
