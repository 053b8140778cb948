"""The ``annotate:`` section of a YAML profile, validated on load (docs/design.md, contracts).

A profile file may hold sections for other stages beside this one; ``load_config`` reads only
``annotate``. Each model stage (tagger, detector, captioner) names its backend and carries that
backend's own settings next to the Ray resources of its actors; the backend's ``Settings``
model validates them, so a typo or a bad threshold fails at load, not hours into a run. Model
references are local directories or hub ids; with ``HF_HUB_OFFLINE=1`` a reference that is not
a local directory is an error at load, naming the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from annotate.backends import Backend, Kind, resolve_backend
from ifadapter.base_model import hub_offline

SECTION = "annotate"


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A profile that cannot be used; the message is one line naming the file and the fields."""


def resolve_model(reference: str) -> str:
    """A local model directory as an absolute path (actors may run elsewhere), else a hub id.

    Something that is no directory here but cannot be a hub id either (``./x``, ``a/b/c``), or
    anything at all when the hub is off, is an error that names it."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if hub_offline():
        raise ValueError(
            f"model {reference!r} is not a local directory and HF_HUB_OFFLINE=1 rules out the hub"
        )
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise ValueError(f"model {reference!r} is not a local directory")
    return reference


ModelRef = Annotated[str, AfterValidator(resolve_model)]


class DecodeConfig(BaseModel):
    """Limits on what an input may be, the working size images travel at, decode resources."""

    model_config = ConfigDict(extra="forbid")

    max_pixels: PositiveInt = 64_000_000  # checked from the header: decompression bombs
    min_side: PositiveInt = 32
    max_bytes: PositiveInt = 64 * 2**20  # a stray video in an image folder is not read whole
    working_side: PositiveInt = 1333  # longest side passed to the models (Grounding-DINO's)
    num_cpus: PositiveFloat = 1.0
    batch_size: PositiveInt = 32  # also the block size: one Ray task decodes a block


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


class TaggerConfig(StageConfig):
    kind: ClassVar[Kind] = "tagger"
    backend: str = "clip"


class DetectorConfig(StageConfig):
    kind: ClassVar[Kind] = "detector"
    backend: str = "grounding_dino"


class CaptionerConfig(StageConfig):
    kind: ClassVar[Kind] = "captioner"
    backend: str = "template"


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows_per_shard: PositiveInt = 1000  # inputs per partition; a shard holds those that pass
    embed_images: bool = False  # store the original bytes in the `image` column


class AnnotateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    tagger: TaggerConfig
    detector: DetectorConfig
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def stages(self) -> dict[str, StageConfig]:
        return {"tag": self.tagger, "detect": self.detector, "caption": self.captioner}

    def provenance(self) -> dict:
        """What decides the annotations (not the resources): the ``annotator`` column's JSON."""
        limits = self.decode.model_dump(exclude={"num_cpus", "batch_size"})
        return {
            "decode": limits,
            **{stage: config.provenance() for stage, config in self.stages().items()},
        }


def one_line(error: ValidationError, section: str) -> str:
    """A validation error as one line naming each faulty field under its profile section."""
    faults = []
    for fault in error.errors():
        where = ".".join(str(part) for part in (section, *fault["loc"]))
        faults.append(f"{where}: {fault['msg']}")
    return "; ".join(faults)


def parse_section(model: type[M], section: str, data: dict, origin: str = "config") -> M:
    """``data`` (a profile's ``section:``) validated as ``model``; ``ConfigError`` in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {one_line(error, section)}") from None


def load_section(model: type[M], section: str, path: str | Path) -> M:
    """The ``section:`` of the YAML profile at ``path`` as ``model``; ``ConfigError`` (one line)
    when the file is missing, is not YAML, lacks the section or does not validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get(section), dict):
        raise ConfigError(f"{path} has no '{section}:' section")
    return parse_section(model, section, data[section], str(path))


def parse_config(data: dict, origin: str = "config") -> AnnotateConfig:
    return parse_section(AnnotateConfig, SECTION, data, origin)


def load_config(path: str | Path) -> AnnotateConfig:
    """The ``annotate:`` section of a YAML profile; ``ConfigError`` (one line) on any fault."""
    return load_section(AnnotateConfig, SECTION, path)
