"""What the benchmark asks of a detector, a judge and a generation runner; how a config names one.

Each is a class with a pydantic ``Settings`` model (its entry of the ``evaluate:`` section,
validated when the profile loads) and a constructor that loads its models. A config names a
backend by a short name of ``BUILTIN`` or by ``"module:Class"``, as the data engine's backends
are named (``annotate.backends``): the toy world's exact verifiers plug in as
``evaluation.backends.toy:ToyDetector`` / ``ToyJudge`` without any change here.

Boxes are normalised xyxy everywhere, as in the shard contract.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from annotate.backends import NoSettings, resolve_class
from annotate.vlm.judge import Verdict
from evaluation.benchmark import Benchmark, BenchmarkLayout

Kind = Literal["detector", "judge", "runner"]

BUILTIN: dict[str, dict[str, str]] = {
    "detector": {
        "grounding_dino": "evaluation.backends.grounding_dino:GroundingDinoInstanceDetector"
    },
    "judge": {
        "vlm_transformers": "evaluation.backends.vlm_judges:TransformersVLMJudge",
        "vlm_http": "evaluation.backends.vlm_judges:HTTPVLMJudge",
    },
    "runner": {
        "ifadapter": "evaluation.runners:IFAdapterRunner",
        "sdxl": "evaluation.runners:SDXLRunner",
        "gligen": "evaluation.runners:GLIGENRunner",
        "images": "evaluation.runners:FolderRunner",
        "real": "evaluation.runners:RealRunner",
        "real-vae": "evaluation.runners:RealVAERunner",
    },
}


@dataclass(frozen=True)
class Detection:
    """One detection in a generated image: normalised xyxy ``box``, the ``label`` (one of the
    labels the detector was prompted with) and its confidence ``score``."""

    box: tuple[float, float, float, float]
    label: str
    score: float

    def to_dict(self) -> dict:
        return {"box": list(self.box), "label": self.label, "score": self.score}

    @classmethod
    def from_dict(cls, data: dict) -> Detection:
        return cls(tuple(float(v) for v in data["box"]), data["label"], float(data["score"]))


def weights_stamp(paths: Sequence[str | Path | None]) -> list:
    """A cheap identity of model files: (path, size, mtime) of every file under each local path.

    Hashing a 7 GB SDXL base on every run would cost more than scoring a small benchmark; a
    retrained checkpoint rewrites its files, which is what must invalidate cached results. A hub
    id (no local path) stands for itself."""
    stamp = []
    for path in paths:
        if path is None:
            continue
        root = Path(path)
        if not root.exists():
            stamp.append(str(path))
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            info = file.stat()
            stamp.append([str(file), info.st_size, info.st_mtime_ns])
    return stamp


class EvaluationBackend:
    """Common to detectors, judges and runners: settings validated at load, models loaded in
    ``__init__``, and a ``fingerprint`` that keys cached results (settings + weights)."""

    Settings: ClassVar[type[BaseModel]] = NoSettings

    def __init__(self, settings: BaseModel, device: str):
        self.settings = settings
        self.device = device

    @classmethod
    def model_paths(cls, settings: BaseModel) -> list[str | Path | None]:
        """Local paths whose files decide the results (see ``weights_stamp``)."""
        return [value for key, value in settings if key == "model" and isinstance(value, str)]

    @classmethod
    def fingerprint(cls, settings: BaseModel) -> dict:
        return {
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "settings": json.loads(settings.model_dump_json()),
            "weights": weights_stamp(cls.model_paths(settings)),
        }


class InstanceDetector(EvaluationBackend, ABC):
    """Finds the layout's labels in generated images (Grounding-DINO at real scale)."""

    batch_size: int = 8

    @abstractmethod
    def detect(
        self, images: Sequence[Image.Image], labels: Sequence[Sequence[str]]
    ) -> list[list[Detection]]:
        """Detections per image, prompted by that image's ``labels`` (the distinct labels of its
        layout's instances); every detection's label is one of them."""


class InstanceJudge(EvaluationBackend, ABC):
    """Says whether a crop shows its description (a VLM at real scale).

    ``name`` is the config entry's name (set when the config builds the judge); ``question_version``
    names the question asked, so that results of different questions are never mixed.
    ``attributes`` names what a judge checks one by one and reports in ``Verdict.attributes``
    (the toy world's exact judge: colour, shape, texture); empty for a yes/no judge (a VLM)."""

    name: str = ""
    question_version: str = ""
    attributes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def fingerprint(cls, settings: BaseModel) -> dict:
        """A judge's identity names the attributes it reports: verdicts cached before they
        were recorded are asked again. Yes/no judges keep their identity as it was."""
        identity = super().fingerprint(settings)
        if cls.attributes:
            identity["attributes"] = list(cls.attributes)
        return identity

    @abstractmethod
    def ask(self, items: Sequence[tuple[Image.Image, str]]) -> list[Verdict]:
        """One verdict per ``(crop, description)``, in order; an unusable reply is a ``Verdict``
        with ``answer`` None and the reason, never an exception. A judge with ``attributes``
        gives each verdict it could read ``Verdict.attributes`` (one bool per name)."""


class GenerationConfig(BaseModel):
    """The ``generation:`` entry of the ``evaluate:`` section: what every runner is given."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    batch_size: PositiveInt = 8
    height: PositiveInt | None = None  # None: the pipeline's default size
    width: PositiveInt | None = None
    # None: by the device, float32 on the CPU (half-precision matmuls are slow or missing
    # there) and float16 on an accelerator, as `ifadapter generate` chooses.
    dtype: str | None = Field(None, pattern=r"^(float32|float16|bfloat16)$")


class Runner(EvaluationBackend, ABC):
    """Makes (or fetches) one image per benchmark layout for a method."""

    def __init__(
        self, settings: BaseModel, device: str, generation: GenerationConfig, benchmark: Benchmark
    ):
        super().__init__(settings, device)
        self.generation = generation
        self.benchmark = benchmark

    @classmethod
    def model_paths(cls, settings: BaseModel) -> list[str | Path | None]:
        keys = {"base", "adapter", "lora", "model", "folder"}
        return [value for key, value in settings if key in keys and isinstance(value, (str, Path))]

    @abstractmethod
    def generate(
        self, layouts: Sequence[BenchmarkLayout], seeds: Sequence[int]
    ) -> list[Image.Image]:
        """One RGB image per layout; ``seeds[i]`` seeds layout i whatever the batch holds, so a
        resumed run makes the images an uninterrupted one would have made."""


INTERFACES: dict[str, type[EvaluationBackend]] = {
    "detector": InstanceDetector,
    "judge": InstanceJudge,
    "runner": Runner,
}


def resolve(kind: Kind, name: str) -> type[EvaluationBackend]:
    """The class a config names: a short name of ``BUILTIN[kind]`` or ``"module:Class"``;
    ``ValueError`` with the choices when it names nothing usable."""
    interface = INTERFACES[kind]
    return resolve_class(
        kind, name, BUILTIN[kind], (interface,), f"an evaluation {interface.__name__}"
    )
