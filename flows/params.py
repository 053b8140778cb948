"""The pipeline's parameters, checked before any stage starts.

A deployment run takes its parameters from the Prefect UI or ``prefect deployment run
--param``, so the flow cannot trust them: every fault (a missing profile, a profile without the
section a chosen stage reads, no input for the annotate stage, a Ray address ``ray.init`` will
not take, an empty method name) is reported at once, in one line, before Ray or a model is
touched. The CLI runs the same checks before it starts Prefect.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from annotate.ray_session import check_address, is_job_address
from ifadapter.utils.profiles import one_line, read_profile, sections

STAGES = ("annotate", "cache", "train", "evaluate")
# The profile section each stage reads (the cache is computed from the train: section).
SECTIONS = {"annotate": "annotate", "cache": "train", "train": "train", "evaluate": "evaluate"}


class PipelineParams(BaseModel):
    """What one pipeline run is asked to do; paths are kept as given (relative ones resolve
    against the working directory, which a deployment sets to the project directory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: str = Field(description="YAML profile with annotate:, train: (and evaluate:)")
    input: str | None = Field(None, description="what the annotate stage reads (open_source)")
    output: str = Field(description="pipeline directory: shards/, train/, eval/, _flows/")
    ray_address: str | None = Field(None, description="None: a local Ray on this machine")
    methods: list[str] | None = Field(None, description="methods to evaluate (profile default)")
    stages: list[str] | None = Field(
        None, description="stages to run, in DAG order (default: every stage the profile has)"
    )
    shards: str | None = Field(None, description="shard dataset to train on (default: shards/)")
    benchmark_input: str | None = Field(
        None,
        description="layouts to annotate into the benchmark (benchmark-shards/, benchmark.json) "
        "instead of the evaluate: section's own benchmark files",
    )
    _present: set[str] = PrivateAttr(default_factory=set)  # the profile's sections

    @field_validator("ray_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return check_address(value)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [s for s in value if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; known: {list(STAGES)}")
        if not value:
            raise ValueError("no stage to run")
        return [s for s in STAGES if s in value]  # the DAG's order, whatever order was given

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value or any(not isinstance(m, str) or not m.strip() for m in value):
            raise ValueError("methods must be a non-empty list of method names")
        if len(set(value)) != len(value):
            raise ValueError(f"methods {value} name a method twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PipelineParams:
        document = read_profile(self.config)
        present = sections(document)
        missing = sorted({SECTIONS[s] for s in self.chosen(present)} - present)
        if missing:
            raise ValueError(f"config {self.config} has no {', '.join(missing)}: section")
        if self.benchmark_input and "evaluate" not in self.chosen(present):
            raise ValueError("benchmark_input is for the evaluate stage, which is not chosen")
        if "annotate" in self.chosen(present) and not self.input:
            raise ValueError("the annotate stage needs an input")
        chosen = self.chosen(present)
        if self.shards and ("annotate" in chosen or self.input):
            raise ValueError(
                "shards names an existing dataset to train on: give it, or an input to annotate"
            )
        if "annotate" not in chosen and {"cache", "train"} & set(chosen):
            manifest = self.shards_dir / "_manifest.json"
            if not manifest.is_file():
                raise ValueError(f"{self.shards_dir} is not a shard dataset (no {manifest.name})")
        # Through a job server the stages read their paths on the cluster's storage, which this
        # machine need not see: the stage reports what it cannot open.
        if not is_job_address(self.ray_address):
            if "annotate" in chosen:
                _check_source("input", self.input)
            if self.benchmark_input:
                _check_source("benchmark_input", self.benchmark_input)
            elif "evaluate" in chosen:
                _check_benchmark(self.config, document["evaluate"])
        self._present = present
        return self

    def chosen(self, present: set[str] | None = None) -> list[str]:
        """The stages to run: those asked for, else every stage the profile has a section for
        (without annotate when ``shards`` names an existing dataset)."""
        if self.stages is not None:
            return list(self.stages)
        present = present if present is not None else self._present
        return [
            s for s in STAGES if SECTIONS[s] in present and not (s == "annotate" and self.shards)
        ]

    @property
    def out(self) -> Path:
        return Path(self.output)

    @property
    def shards_dir(self) -> Path:
        return Path(self.shards) if self.shards else self.out / "shards"

    @property
    def train_dir(self) -> Path:
        return self.out / "train"

    @property
    def eval_dir(self) -> Path:
        return self.out / "eval"

    @property
    def benchmark_shards(self) -> Path:
        return self.out / "benchmark-shards"

    @property
    def benchmark_file(self) -> Path:
        return self.out / "benchmark.json"


def check_params(**values: object) -> PipelineParams:
    """``PipelineParams`` or a ``ValueError`` whose message is one line."""
    try:
        return PipelineParams.model_validate(values)
    except ValidationError as error:
        raise ValueError(f"invalid pipeline parameters: {one_line(error)}") from None


def _check_source(name: str, value: str) -> None:
    """The input opens as a source (a folder that exists, a COCO file, a URI list, a toy
    world): the same check the annotate stage makes first, made before anything starts."""
    from annotate.sources import SourceError, open_source

    try:
        open_source(value)
    except SourceError as error:
        raise ValueError(f"{name}: {error}") from None


def _check_benchmark(config: str, section: dict) -> None:
    """Without ``benchmark_input`` the evaluate: section's own benchmark is used: its file, or
    the shards it is built from, must exist before the run starts."""
    benchmark = section.get("benchmark") or {}
    file, shards = benchmark.get("file"), benchmark.get("shards")
    if file and Path(file).is_file():
        return
    if shards and (Path(shards) / "_manifest.json").is_file():
        return
    raise ValueError(
        f"config {config}: the evaluate: section's benchmark {file} does not exist and its "
        f"shards {shards} are not a shard dataset; give benchmark_input (--benchmark-input: "
        "images to annotate into the benchmark) or build the benchmark first"
    )
