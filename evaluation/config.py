"""The ``evaluate:`` section of a YAML profile, validated on load (docs/design.md).

The detector, every judge and every method name a backend (a short name or ``"module:Class"``,
see ``evaluation.protocols``) and carry that backend's own settings beside it; the backend's
``Settings`` model validates them at load, so a typo fails before any model loads. Relative
paths are read from the directory the command runs in. Errors are one line naming the fields.
The ``benchmark:`` entry's model lives with the benchmark (``evaluation.benchmark``) and the
``generation:`` entry's with the runners' interface (``evaluation.protocols``), which both
import without importing this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

from annotate.config import ModelRef
from evaluation.benchmark import BenchmarkConfig
from evaluation.protocols import EvaluationBackend, GenerationConfig, Kind, resolve
from ifadapter.utils.profiles import load_section, parse_section

SECTION = "evaluate"


class BackendConfig(BaseModel):
    """A backend name and that backend's settings (the entry's other keys)."""

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[Kind]
    backend_key: ClassVar[str] = "backend"
    _settings: BaseModel = PrivateAttr()

    def backend_name(self) -> str:
        return getattr(self, self.backend_key)

    @model_validator(mode="after")
    def _validate_settings(self) -> BackendConfig:
        extra = dict(self.model_extra or {})
        self._settings = self.backend_class().Settings.model_validate(extra)
        return self

    @property
    def settings(self) -> BaseModel:
        return self._settings

    def backend_class(self) -> type[EvaluationBackend]:
        return resolve(self.kind, self.backend_name())

    def fingerprint(self) -> dict:
        return self.backend_class().fingerprint(self.settings)


class DetectorConfig(BackendConfig):
    kind: ClassVar[Kind] = "detector"
    backend: str = "grounding_dino"
    batch_size: PositiveInt = 8


class JudgeConfig(BackendConfig):
    kind: ClassVar[Kind] = "judge"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    backend: str
    batch_size: PositiveInt = 16


class MethodConfig(BackendConfig):
    kind: ClassVar[Kind] = "runner"
    backend_key: ClassVar[str] = "runner"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    runner: str


class ClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelRef  # a CLIPModel directory with its processor
    batch_size: PositiveInt = 32


class FidConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inception: Path  # torch-fidelity's pt_inception-2015-12-05 state dict (a .pth of tensors)
    reference: Path | None = None  # a folder of images; None: the benchmark's real images
    batch_size: PositiveInt = 32

    @field_validator("inception")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"Inception weights {value} do not exist (nothing is downloaded)")
        return value


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ifs: bool = True
    ap: bool = True
    clip: ClipConfig | None = None
    fid: FidConfig | None = None
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0)
    crop_padding: NonNegativeFloat = 0.15  # as the data engine cropped instances to describe them
    size_buckets: tuple[float, float] = (0.05, 0.2)  # box area shares: small | medium | large

    @field_validator("size_buckets")
    @classmethod
    def _increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] < value[1] < 1:
            raise ValueError("size_buckets must be two increasing area shares in (0, 1)")
        return value


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paper_table: bool = False  # the paper's Table 1 beside ours: only for the real-scale benchmark
    gallery: int = Field(24, ge=0)  # layouts shown with every method's image


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: BenchmarkConfig
    detector: DetectorConfig | None = None
    judges: list[JudgeConfig] = Field(default_factory=list)
    methods: list[MethodConfig]
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    device: str = "cpu"
    threads: PositiveInt | None = None  # torch threads on the CPU (None: torch's default)

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        if not self.methods:
            raise ValueError("methods: at least one method is needed")
        for what, names in (
            ("methods", [m.name for m in self.methods]),
            ("judges", [j.name for j in self.judges]),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{what}: duplicate names {duplicates}")
        if (self.metrics.ifs or self.metrics.ap) and self.detector is None:
            raise ValueError("detector: needed by metrics.ifs and metrics.ap (or switch both off)")
        if self.metrics.ifs and not self.judges:
            raise ValueError("judges: metrics.ifs needs at least one judge (or set ifs: false)")
        return self


def parse_config(data: dict, origin: str = "config") -> EvaluateConfig:
    return parse_section(EvaluateConfig, SECTION, data, origin)


def load_config(path: str | Path) -> EvaluateConfig:
    """The ``evaluate:`` section of a YAML profile; ``ConfigError`` (one line) on any fault."""
    return load_section(EvaluateConfig, SECTION, path)
