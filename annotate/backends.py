"""The three annotator interfaces (tagger, detector, captioner) and how a config names a backend.

A backend is a class with a pydantic ``Settings`` model (its section of the config, validated
when the profile loads), a constructor ``(settings, device)`` that loads its models, one method
that annotates a batch of records, and ``provenance`` (what goes into the ``annotator`` column).
Records carry the decoded image and everything the source knew (extra columns), so a backend
that reads ground truth instead of running a model (the toy world's oracle) is just another
backend. A config names a backend by a short name from ``BUILTIN`` or by ``"module:Class"``, so
a new one (RAM++, a vLLM captioner) plugs in without touching the engine. A captioner that runs
as Ray Data operators of its own (vLLM in Ray Data) is a ``DatasetCaptioner`` instead.
``StageConfig`` is a model stage's entry in the ``annotate:`` section: its backend, that
backend's settings and the Ray resources of its actors (``annotate.config`` holds the section).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    model_validator,
)

from annotate.engine.records import Captions, Detection, Record

if TYPE_CHECKING:  # Ray only where a dataset captioner runs, not to validate a config
    import ray.data

Kind = Literal["tagger", "detector", "captioner"]

BUILTIN: dict[str, dict[str, str]] = {
    "tagger": {
        "clip": "annotate.taggers.clip:ClipTagger",
        "ram_plus": "annotate.taggers.ram:RamTagger",  # RAM++ or RAM, from the checkpoint
        "ram": "annotate.taggers.ram:RamTagger",
        "oracle": "annotate.toy.oracle:OracleTagger",  # the toy world's ground truth
    },
    "detector": {
        "grounding_dino": "annotate.detectors.grounding_dino:GroundingDinoDetector",
        # the original code for original .pth weights; runs in .venv-gdino (transformers < 5)
        "groundingdino_py": "annotate.detectors.groundingdino_py:GroundingDinoPyDetector",
        "oracle": "annotate.toy.oracle:OracleDetector",
    },
    "captioner": {
        "template": "annotate.captioners.template:TemplateCaptioner",
        "transformers_vlm": "annotate.captioners.vlm:TransformersVLMCaptioner",
        "openai_http": "annotate.captioners.vlm:HTTPVLMCaptioner",
        "ray_vllm": "annotate.captioners.ray_vllm:RayVLLMCaptioner",
        "oracle": "annotate.toy.oracle:OracleCaptioner",
    },
}


def _version(package: str) -> str | None:
    """None where the package is not installed: a backend may run in another environment than
    the driver that records the provenance (``groundingdino_py``)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class NoSettings(BaseModel):
    """The settings of a backend that takes none (annotators and the benchmark's backends)."""

    model_config = ConfigDict(extra="forbid")


class Backend:
    """Common to every backend. Models load in ``__init__`` (on the actor), never at import,
    so that validating a config loads nothing."""

    Settings: ClassVar[type[BaseModel]] = NoSettings
    packages: ClassVar[tuple[str, ...]] = ()  # whose versions go into the provenance

    def __init__(self, settings: BaseModel, device: str):
        self.settings = settings
        self.device = device

    @classmethod
    def provenance(cls, settings: BaseModel) -> dict:
        """Which backend, with which settings (model references, thresholds, prompts)."""
        return {
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "versions": {name: _version(name) for name in cls.packages},
            **settings.model_dump(),
        }


class Tagger(Backend, ABC):
    @abstractmethod
    def tag(self, records: Sequence[Record]) -> list[list[str]]:
        """Tags per record, best first."""


class Detector(Backend, ABC):
    @abstractmethod
    def detect(self, records: Sequence[Record]) -> list[list[Detection]]:
        """Instances per record, prompted by ``record.tags``; captions left empty."""


class Captioner(Backend, ABC):
    @abstractmethod
    def caption(self, records: Sequence[Record]) -> list[Captions]:
        """A global caption per record and one per instance of ``record.instances``."""


class DatasetCaptioner(Backend, ABC):
    """A captioner that brings its own Ray Data operators instead of running in the engine's
    actors: vLLM inside Ray Data, where ``ray.data.llm`` owns the GPU engines and their
    batching. It is never instantiated by the engine; ``transform`` maps the dataset's work rows
    one to one, filling in captions and faults, and keeps the rows in ``schema``."""

    @classmethod
    @abstractmethod
    def transform(
        cls, dataset: ray.data.Dataset, stage: StageConfig, schema: pa.Schema
    ) -> ray.data.Dataset:
        """The dataset with this stage's operators appended."""


INTERFACES: dict[str, tuple[type[Backend], ...]] = {
    "tagger": (Tagger,),
    "detector": (Detector,),
    "captioner": (Captioner, DatasetCaptioner),
}


def resolve_class(
    what: str, name: str, builtin: Mapping[str, str], interfaces: tuple[type, ...], expected: str
) -> type:
    """The class a config names: a short name of ``builtin`` or ``"module:Class"``, subclassing
    one of ``interfaces``. Raises ``ValueError`` naming ``what`` (e.g. "detector backend") and
    the choices when it names nothing usable, or saying it "is not ``expected``". The data
    engine's backends and the benchmark's (``evaluation.protocols``) are named this way."""
    target = builtin.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise ValueError(
            f"unknown {what} {name!r}: use one of {', '.join(builtin)} or 'module:Class'"
        )
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{what} {name!r} cannot be imported: {error}") from None
    if not (isinstance(found, type) and issubclass(found, interfaces)):
        raise ValueError(f"{what} {name!r} is not {expected}")
    return found


def resolve_backend(kind: Kind, name: str) -> type[Backend]:
    """The class a config's ``backend`` names: a short name of ``BUILTIN[kind]`` or
    ``"module:Class"``. Raises ``ValueError`` with the choices when it names nothing usable."""
    interfaces = INTERFACES[kind]
    expected = "a " + " or ".join(interface.__name__ for interface in interfaces)
    return resolve_class(f"{kind} backend", name, BUILTIN[kind], interfaces, expected)


class StageConfig(BaseModel):
    """A model stage: its backend with that backend's settings, and its Ray actor pool."""

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[Kind]

    backend: str
    workers: PositiveInt = 1  # actors
    num_cpus: PositiveFloat = 1.0  # per actor
    num_gpus: NonNegativeFloat = 0.0  # per actor
    batch_size: PositiveInt = 8
    _settings: BaseModel = PrivateAttr()

    @model_validator(mode="after")
    def _validate_backend_settings(self) -> StageConfig:
        backend = resolve_backend(self.kind, self.backend)
        self._settings = backend.Settings.model_validate(self.model_extra or {})
        return self

    @property
    def settings(self) -> BaseModel:
        return self._settings

    def backend_class(self) -> type[Backend]:
        return resolve_backend(self.kind, self.backend)

    def provenance(self) -> dict:
        return {"backend": self.backend, **self.backend_class().provenance(self.settings)}

    def build(self, device: str) -> Backend:
        return self.backend_class()(self.settings, device)
