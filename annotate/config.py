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
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from annotate.backends import Kind, StageConfig
from ifadapter.base_model import hub_offline
from ifadapter.utils.profiles import load_section, parse_section

SECTION = "annotate"


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


def parse_config(data: dict, origin: str = "config") -> AnnotateConfig:
    return parse_section(AnnotateConfig, SECTION, data, origin)


def load_config(path: str | Path) -> AnnotateConfig:
    """The ``annotate:`` section of a YAML profile; ``ConfigError`` (one line) on any fault."""
    return load_section(AnnotateConfig, SECTION, path)
