"""The ``train:`` section of a YAML profile, validated on load.

A profile file holds one section per stage (``annotate:``, ``train:``, ...); each stage reads its
own section only, so the sections load independently. Paths are taken as written: relative ones
resolve against the working directory, like every path given on the command line.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ifadapter import IFAdapter
from ifadapter.utils.files import json_sha256
from ifadapter.utils.profiles import load_section

SECTION = "train"

# IFAdapter hyper-parameters a profile may set; the layers follow from the UNet and the
# patterns, the cross-attention width from the UNet (see ``IFAdapter.for_unet``).
_ADAPTER_KEYS = {
    name
    for name in inspect.signature(IFAdapter.__init__).parameters
    if name not in {"self", "layers", "layer_channels", "cross_attention_dim"}
} | {"layer_patterns"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(_Strict):
    """How images become training views; every field is part of the cache key."""

    resolution: int = Field(1024, gt=0, description="bucket area is about resolution**2 pixels")
    bucket_step: int = Field(
        64, gt=0, description="bucket sides are multiples of this (must suit the VAE and UNet)"
    )
    max_aspect: float = Field(4.0, ge=1.0, description="widest bucket side ratio (SDXL: 4)")
    random_crop: bool = Field(True, description="random crop offsets; False crops the centre")
    flip: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="horizontal flip probability; captions are not rewritten, so keep it 0 for "
        "data whose captions say 'left' or 'right'",
    )
    min_visible: float = Field(
        0.5, gt=0.0, le=1.0, description="an instance keeping less of its box area is dropped"
    )
    max_instances: int = Field(
        10, gt=0, description="instances per view; the largest visible boxes are kept"
    )
    views: int = Field(
        1, gt=0, description="augmented views cached per image; epoch e trains on view e % views"
    )
    seed: int = 0


class TrainConfig(_Strict):
    """Everything one training run depends on."""

    base: str = Field(description="local directory of an SDXL pipeline (save_pretrained layout)")
    data: str = Field(description="shard dataset directory (with _manifest.json)")
    output: str = Field(description="storage path: runs, checkpoints and the cache live here")
    name: str = Field("ifadapter", description="run name; the same name resumes the same run")
    cache_dir: str | None = Field(None, description="default: <output>/cache")
    adapter: dict[str, Any] = Field(
        default_factory=dict, description="IFAdapter hyper-parameters and layer_patterns"
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    cache_batch_size: int = Field(16, gt=0, description="views per encoder call when caching")
    cache_actors: int = Field(1, gt=0, description="encoder actors (one GPU each with use_gpu)")

    seed: int = 0
    max_steps: int = Field(gt=0, description="optimiser steps of the whole run")
    batch_size: int = Field(1, gt=0, description="samples per worker per micro-batch")
    gradient_accumulation: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up to lr, then the schedule")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant, or cosine decay to 0 at max_steps"
    )
    max_grad_norm: float = Field(1.0, gt=0)
    gate_lr_scale: float = Field(
        1.0,
        gt=0,
        description="lr multiplier of the zero-initialised tanh gates (no weight decay on them): "
        "Adam moves a parameter about lr per step, so short runs open the gates too slowly",
    )
    timestep_sampling: Literal["uniform", "cubic"] = Field(
        "uniform", description="cubic favours noisy timesteps, where layout is decided"
    )
    drop_local: float = Field(0.15, ge=0, le=1, description="CFG dropout of instance conditions")
    drop_global: float = Field(0.30, ge=0, le=1, description="CFG dropout of the caption")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the adapter, or none")
    mixed_precision: Literal["bf16", "fp16", "no"] = Field(
        "bf16", description="autocast on GPU: bf16, or fp16 with loss scaling (cards without bf16)"
    )
    gradient_checkpointing: bool = True

    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0, description="also the worker's torch threads on CPU")
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(3, ge=-1, description="worker failures to recover from (-1: any)")
    log_every: int = Field(10, gt=0, description="steps between reports to Ray Train")

    @field_validator("base", "data")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Workers run in other directories than the driver: a local path travels absolute."""
        return str(Path(value).resolve()) if Path(value).exists() else value

    @field_validator("adapter")
    @classmethod
    def _known_adapter_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - _ADAPTER_KEYS)
        if unknown:
            raise ValueError(f"unknown adapter settings {unknown}; known: {sorted(_ADAPTER_KEYS)}")
        return value

    @model_validator(mode="after")
    def _resolution_fits_buckets(self) -> TrainConfig:
        if self.augment.resolution < self.augment.bucket_step:
            raise ValueError("augment.resolution must be at least augment.bucket_step")
        return self

    @property
    def global_batch_size(self) -> int:
        """Samples per optimiser step over all workers and accumulation steps."""
        return self.batch_size * self.num_workers * self.gradient_accumulation

    @property
    def run_dir(self) -> Path:
        return Path(self.output).resolve() / self.name

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir or Path(self.output) / "cache").resolve()

    @property
    def text_encoder_layers(self) -> tuple[int, ...]:
        default = inspect.signature(IFAdapter.__init__).parameters["text_encoder_layers"].default
        return tuple(self.adapter.get("text_encoder_layers", default))

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide what the adapter's weights become, step by step.

        A run may be resumed with other values of everything else (more steps, another split of
        the same global batch over workers and accumulation, other checkpoint intervals); a
        cosine schedule ends at ``max_steps``, so there the step count is part of the path.
        """
        fields = self.model_dump(
            mode="json",
            exclude={
                "name",
                "output",
                "cache_dir",
                "cache_batch_size",
                "cache_actors",
                "max_steps",
                "batch_size",
                "gradient_accumulation",
                "num_workers",
                "cpus_per_worker",
                "checkpoint_every",
                "keep_checkpoints",
                "max_failures",
                "log_every",
                "gradient_checkpointing",
            },
        )
        fields["base"] = str(Path(self.base).resolve())
        fields["data"] = str(Path(self.data).resolve())
        if self.lr_schedule == "cosine":
            fields["max_steps"] = self.max_steps
        return {**fields, "global_batch_size": self.global_batch_size}

    def trajectory_digest(self) -> str:
        return json_sha256(self.trajectory())


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Reads the ``train:`` section of a profile; ``overrides`` (not None) replace its keys.
    ``ConfigError`` (one line) on any fault."""
    return load_section(TrainConfig, SECTION, path, **overrides)
