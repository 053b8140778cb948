"""Layouts to images, one way for every front end (``ifadapter generate`` and the studio).

Each image has its own seed, ``seed + k`` for the k-th image of a run (layout by layout, then
image by image), drawn from its own generator. So an image does not depend on how the layouts
are split into batches, nor on which other layouts share its run (up to one grey level: a batch
of another size rounds its float arithmetic differently), and a layout composed in the studio
at seed S gives exactly the image that ``ifadapter generate --seed S`` gives for a file holding
that layout alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ifadapter.layout import Layout
    from ifadapter.pipeline import IFAdapterSDXLPipeline

# Called after each denoising step with (step index, steps of the call).
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Sampling:
    """How to sample: the settings ``ifadapter generate`` takes as options."""

    steps: int = 30
    guidance: float = 7.5
    control_ratio: float = 1.0
    unconditional_layout: Literal["boxes", "none"] = "boxes"
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise ValueError(f"images per layout must be at least 1, got {self.num_images}")
        if not 0.0 <= self.control_ratio <= 1.0:
            raise ValueError(f"control_ratio must be in [0, 1], got {self.control_ratio}")
        if self.guidance < 0:
            raise ValueError(f"guidance must not be negative, got {self.guidance}")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """One dtype for a whole pipeline on ``device``: float32 on the CPU (half-precision
    matmuls are slow or missing there), float16 on an accelerator."""
    import torch

    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def load_pipeline(
    base: str, adapter: Path, device: str, lora: str | None = None, lora_scale: float = 1.0
) -> IFAdapterSDXLPipeline:
    """The base with the adapter, in the device's one dtype (``default_dtype``)."""
    from ifadapter.adapter import IFAdapter
    from ifadapter.base_model import check_base
    from ifadapter.pipeline import IFAdapterSDXLPipeline

    base = check_base(base)
    if not (Path(adapter) / "config.json").is_file():
        raise ValueError(f"{adapter} is not an IFAdapter checkpoint (no config.json)")
    dtype = default_dtype(device)
    weights = IFAdapter.from_pretrained(adapter, dtype=dtype)
    pipe = IFAdapterSDXLPipeline.from_pretrained(base, adapter=weights, dtype=dtype)
    if lora is not None:  # a style LoRA on the base (diffusers' loader), beside the adapter
        pipe.load_lora_weights(lora, adapter_name="style")
        pipe.set_adapters(["style"], [lora_scale])
    pipe.set_progress_bar_config(disable=True)  # the callers show their own progress
    return pipe.to(device)


def generators(device: str | torch.device, seeds: Sequence[int]) -> list[torch.Generator]:
    """One generator per image, seeded with its own seed."""
    import torch

    where = "cpu" if torch.device(device).type == "mps" else device  # MPS: no seedable one
    return [torch.Generator(where).manual_seed(int(seed)) for seed in seeds]


def generate(
    pipe: IFAdapterSDXLPipeline,
    layouts: Sequence[Layout],
    sampling: Sampling,
    first: int = 0,
    with_adapter: bool = True,
    on_step: StepCallback | None = None,
) -> list[Image.Image]:
    """``sampling.num_images`` images per layout, in layout order; ``first`` is the index of
    ``layouts[0]`` in the whole run (it sets the seeds). ``with_adapter=False`` is the base
    model alone on the same seeds: the global captions without the instances."""
    count = sampling.num_images
    start = sampling.seed + first * count
    seeds = range(start, start + len(layouts) * count)

    def step_end(pipeline, step: int, timestep, tensors: dict) -> dict:
        on_step(step, pipeline.num_timesteps)
        return tensors

    return pipe(
        [layout.caption for layout in layouts],
        [layout.instances for layout in layouts] if with_adapter else None,
        control_ratio=sampling.control_ratio,
        unconditional_layout=sampling.unconditional_layout,
        num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance,
        num_images_per_prompt=count,
        height=sampling.height,
        width=sampling.width,
        generator=generators(pipe.device, seeds),
        callback_on_step_end=step_end if on_step is not None else None,
    ).images
