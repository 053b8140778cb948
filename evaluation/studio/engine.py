"""One model behind the page: the adapter's images, the base's on the same seeds, verdicts.

One pipeline serves every visitor, so generations take turns (a lock; the page also queues
requests one at a time and shows a waiting request its place): two at once would share the
adapter's conditioning on one UNet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from evaluation.studio.judging import InstanceVerdict, Judging, ProfileJudging, ToyJudging
from ifadapter.layout import Layout
from ifadapter.pipeline import IFAdapterSDXLPipeline
from ifadapter.sampling import Sampling, default_device, generate, load_pipeline

# Called with the share of the work done (0 to 1) and what is being done.
Progress = Callable[[float, str], None]


@dataclass
class Result:
    """The images of one layout with and without the adapter, and their verdicts (one list per
    image, one verdict per instance)."""

    layout: Layout
    sampling: Sampling
    adapter_images: list[Image.Image]
    base_images: list[Image.Image]
    adapter_verdicts: list[list[InstanceVerdict]]
    base_verdicts: list[list[InstanceVerdict]]
    seconds: float  # wall time of the two generations (not of the judging)

    @property
    def seeds(self) -> list[int]:
        return [self.sampling.seed + j for j in range(self.sampling.num_images)]


class Studio:
    def __init__(
        self,
        pipe: IFAdapterSDXLPipeline,
        base: str,
        adapter: Path,
        judging: Judging | None = None,
        lora: str | None = None,
    ):
        self.pipe, self.base, self.adapter, self.lora = pipe, base, adapter, lora
        self.judging = judging or ToyJudging()
        self._turn = threading.Lock()

    @classmethod
    def load(
        cls,
        base: str,
        adapter: Path,
        device: str | None = None,
        judges: str | Path | None = None,
        lora: str | None = None,
        lora_scale: float = 1.0,
    ) -> Studio:
        """The pipeline (with ``lora`` fused at ``lora_scale``, if given) and the judging: the
        detector and judges of the ``judges`` profile's ``evaluate:`` section, else the toy
        world's exact verifiers."""
        device = device or default_device()
        pipe = load_pipeline(base, adapter, device, lora=lora, lora_scale=lora_scale)
        judging = ProfileJudging(judges, device) if judges is not None else None
        return cls(pipe, base, adapter, judging, lora)

    @property
    def default_size(self) -> tuple[int, int]:
        """The base's native image size (width, height)."""
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    @property
    def size_step(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's
        downsampling."""
        levels = len(self.pipe.unet.config.block_out_channels) - 1
        return self.pipe.vae_scale_factor * 2**levels

    def check_size(self, width: int, height: int) -> None:
        step = self.size_step
        for name, value in (("width", width), ("height", height)):
            if value < step or value % step:
                raise ValueError(f"{name} {value} must be a positive multiple of {step} pixels")

    def run(self, layout: Layout, sampling: Sampling, progress: Progress | None = None) -> Result:
        """Generates ``layout`` with the adapter, then the base alone on the same seeds, once
        the generation before it has finished."""
        if sampling.width is not None and sampling.height is not None:
            self.check_size(sampling.width, sampling.height)
        report = progress or (lambda share, what: None)
        report(0.0, "waiting for the model")
        with self._turn:
            started = time.perf_counter()
            phases = (("IFAdapter", True), ("base model", False))
            images = []
            for phase, (name, with_adapter) in enumerate(phases):

                def on_step(step: int, steps: int, phase=phase, name=name) -> None:
                    report((phase + (step + 1) / steps) / 2, f"{name}: step {step + 1}/{steps}")

                images.append(
                    generate(
                        self.pipe, [layout], sampling, with_adapter=with_adapter, on_step=on_step
                    )
                )
            seconds = time.perf_counter() - started
        report(1.0, "judging")
        verdicts = [[self.judging.judge(image, layout) for image in batch] for batch in images]
        return Result(layout, sampling, *images, *verdicts, seconds)
