"""Generation runners: one image per benchmark layout for each method, behind one interface.

- ``ifadapter``: an IFAdapter checkpoint on an SDXL base (any diffusers SDXL directory or hub id:
  community checkpoints work), optionally with a LoRA; each method names its own checkpoint, so
  ablations are methods.
- ``sdxl``: the same base without layout (global caption only): the lower bound.
- ``gligen``: diffusers' ``StableDiffusionGLIGENPipeline`` with the instances as phrases and
  boxes (it takes one layout per call, so batches run layout by layout).
- ``images``: another method's images from a folder, keyed by layout id (``image_name``).
- ``real``: the benchmark's source images (shard bytes, else the ``uri``), checked against their
  SHA-256: the upper bound, scored the same way.
- ``real-vae``: the same images passed through a base's VAE (encode, the latent mode, decode):
  the bound any generator that decodes through that VAE can reach.

Every layout gets its own generator seeded from (generation seed, layout id), so an image does
not depend on which batch it fell in and a resumed run makes the same images.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt

from annotate.config import ModelRef
from evaluation.benchmark import Benchmark, BenchmarkLayout
from evaluation.protocols import GenerationConfig, Runner
from ifadapter.base_model import check_base
from ifadapter.sampling import default_dtype, generators

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def image_name(layout_id: str) -> str:
    """The file stem of a layout's image: the id itself when it is filename-safe, else the id
    with unsafe characters replaced and an 8-hex digest of the id (so two ids never collide)."""
    if SAFE_NAME.fullmatch(layout_id):
        return layout_id
    digest = hashlib.sha256(layout_id.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', layout_id)}-{digest}"


def layout_seed(seed: int, layout_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{layout_id}".encode()).hexdigest()[:8], 16)


class DiffusionRunner(Runner):
    """Shared by the diffusers runners: dtype, device, progress bars off."""

    def __init__(
        self, settings: BaseModel, device: str, generation: GenerationConfig, benchmark: Benchmark
    ):
        super().__init__(settings, device, generation, benchmark)
        named = generation.dtype
        self.dtype = getattr(torch, named) if named else default_dtype(device)

    def _ready(self, pipe):
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _sampling(self, layouts: Sequence[BenchmarkLayout], seeds: Sequence[int]) -> dict:
        """The keyword arguments every SDXL-family call shares: steps, guidance, negative
        prompt, one generator per layout, size."""
        s = self.settings
        return {
            "num_inference_steps": s.steps,
            "guidance_scale": s.guidance,
            "negative_prompt": [s.negative_prompt] * len(layouts) if s.negative_prompt else None,
            "generator": generators(self.device, seeds),
            "height": self.generation.height,
            "width": self.generation.width,
        }


class IFAdapterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: ModelRef
    adapter: Path  # an IFAdapter checkpoint directory (config.json + ifadapter.safetensors)
    lora: str | None = None  # a LoRA file or directory for the base
    lora_scale: float = 1.0
    steps: PositiveInt = 30
    guidance: NonNegativeFloat = 7.5
    control_ratio: float = Field(1.0, ge=0.0, le=1.0)
    negative_prompt: str | None = None
    # The instance token groups used (ifadapter.adapter.TOKEN_GROUPS); leaving one out is the
    # inference-time ablation of Table 3 on one trained adapter.
    token_groups: list[Literal["appearance", "eot"]] = Field(
        default_factory=lambda: ["appearance", "eot"], min_length=1
    )
    # What guidance's unconditional branch keeps of the layout (IFAdapterSDXLPipeline).
    unconditional_layout: Literal["boxes", "none"] = "boxes"


class IFAdapterRunner(DiffusionRunner):
    Settings = IFAdapterSettings

    def __init__(
        self,
        settings: IFAdapterSettings,
        device: str,
        generation: GenerationConfig,
        benchmark: Benchmark,
    ):
        from ifadapter.adapter import IFAdapter
        from ifadapter.pipeline import IFAdapterSDXLPipeline

        super().__init__(settings, device, generation, benchmark)
        if not (settings.adapter / "config.json").is_file():
            raise ValueError(f"{settings.adapter} is not an IFAdapter checkpoint (no config.json)")
        adapter = IFAdapter.from_pretrained(settings.adapter, dtype=self.dtype)
        pipe = IFAdapterSDXLPipeline.from_pretrained(
            check_base(settings.base), adapter=adapter, dtype=self.dtype
        )
        if settings.lora is not None:
            pipe.load_lora_weights(settings.lora, adapter_name="method")
            pipe.set_adapters(["method"], [settings.lora_scale])
        self.pipe = self._ready(pipe)

    def generate(
        self, layouts: Sequence[BenchmarkLayout], seeds: Sequence[int]
    ) -> list[Image.Image]:
        s = self.settings
        return self.pipe(
            [layout.caption for layout in layouts],
            [
                [{"box": i.box, "caption": i.caption} for i in layout.instances]
                for layout in layouts
            ],
            control_ratio=s.control_ratio,
            token_groups=s.token_groups,
            unconditional_layout=s.unconditional_layout,
            **self._sampling(layouts, seeds),
        ).images


class SDXLSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: ModelRef
    steps: PositiveInt = 30
    guidance: NonNegativeFloat = 7.5
    negative_prompt: str | None = None


class SDXLRunner(DiffusionRunner):
    Settings = SDXLSettings

    def __init__(
        self,
        settings: SDXLSettings,
        device: str,
        generation: GenerationConfig,
        benchmark: Benchmark,
    ):
        from diffusers import StableDiffusionXLPipeline

        super().__init__(settings, device, generation, benchmark)
        pipe = StableDiffusionXLPipeline.from_pretrained(
            check_base(settings.base), dtype=self.dtype
        )
        self.pipe = self._ready(pipe)

    def generate(
        self, layouts: Sequence[BenchmarkLayout], seeds: Sequence[int]
    ) -> list[Image.Image]:
        return self.pipe(
            [layout.caption for layout in layouts], **self._sampling(layouts, seeds)
        ).images


class GLIGENSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: (
        ModelRef  # a StableDiffusionGLIGENPipeline directory (e.g. gligen-1-4-generation-text-box)
    )
    steps: PositiveInt = 50
    guidance: NonNegativeFloat = 7.5
    scheduled_sampling_beta: float = Field(0.3, ge=0.0, le=1.0)
    negative_prompt: str | None = None


class GLIGENRunner(DiffusionRunner):
    Settings = GLIGENSettings

    def __init__(
        self,
        settings: GLIGENSettings,
        device: str,
        generation: GenerationConfig,
        benchmark: Benchmark,
    ):
        from diffusers import StableDiffusionGLIGENPipeline

        super().__init__(settings, device, generation, benchmark)
        pipe = StableDiffusionGLIGENPipeline.from_pretrained(
            settings.model, dtype=self.dtype, safety_checker=None, feature_extractor=None
        )
        self.pipe = self._ready(pipe)

    def generate(
        self, layouts: Sequence[BenchmarkLayout], seeds: Sequence[int]
    ) -> list[Image.Image]:
        images = []
        for layout, seed in zip(layouts, seeds, strict=True):  # the pipeline takes one layout
            images += self.pipe(
                [layout.caption],
                gligen_phrases=[i.caption for i in layout.instances],
                gligen_boxes=[list(i.box) for i in layout.instances],
                gligen_scheduled_sampling_beta=self.settings.scheduled_sampling_beta,
                **self._sampling([layout], [seed]),
            ).images
        return images


def _rgb(data: bytes, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except OSError as error:
        raise ValueError(f"{what} is not a readable image: {error}") from None


class FolderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folder: Path  # <layout image_name>.png / .jpg / .jpeg / .webp


class FolderRunner(Runner):
    """Images another tool made. Every layout must have one: a method scored on part of the
    benchmark would not be comparable, so missing images are an error naming them."""

    Settings = FolderSettings

    def __init__(
        self,
        settings: FolderSettings,
        device: str,
        generation: GenerationConfig,
        benchmark: Benchmark,
    ):
        super().__init__(settings, device, generation, benchmark)
        if not settings.folder.is_dir():
            raise ValueError(f"image folder {settings.folder} does not exist")
        self.files: dict[str, Path] = {}
        missing = []
        for layout in benchmark.layouts:
            stem = image_name(layout.id)
            found = [settings.folder / f"{stem}{s}" for s in IMAGE_SUFFIXES]
            found = [path for path in found if path.is_file()]
            if found:
                self.files[layout.id] = found[0]
            else:
                missing.append(stem)
        if missing:
            raise ValueError(
                f"{settings.folder} has no image for {len(missing)} of {len(benchmark.layouts)} "
                f"layouts (first: {', '.join(missing[:3])}; "
                f"expected <id>{'|'.join(IMAGE_SUFFIXES)})"
            )

    def generate(
        self, layouts: Sequence[BenchmarkLayout], seeds: Sequence[int]
    ) -> list[Image.Image]:
        paths = [self.files[layout.id] for layout in layouts]
        return [_rgb(path.read_bytes(), str(path)) for path in paths]


class RealSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: Path | None = None  # default: the shard directory the benchmark was built from


class RealRunner(Runner):
    """The layouts' own source images: the upper bound of every metric."""

    Settings = RealSettings

    def __init__(
        self,
        settings: RealSettings,
        device: str,
        generation: GenerationConfig,
        benchmark: Benchmark,
    ):
        super().__init__(settings, device, generation, benchmark)
        self.shards = Path(settings.shards or benchmark.source["shards"])

    def _bytes(self, layouts: Sequence[BenchmarkLayout]) -> dict[str, bytes | None]:
        found: dict[str, bytes | None] = {}
        for shard in sorted({layout.source["shard"] for layout in layouts}):
            path = self.shards / shard
            if not path.is_file():
                raise ValueError(f"shard {path} of the benchmark's real images does not exist")
            ids = [x.source["image_id"] for x in layouts if x.source["shard"] == shard]
            table = pq.read_table(path, columns=["image_id", "image"])
            table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(ids, pa.string())))
            found.update(
                zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True)
            )
        return found

    def generate(
        self, layouts: Sequence[BenchmarkLayout], seeds: Sequence[int]
    ) -> list[Image.Image]:
        import fsspec

        stored = self._bytes(layouts)
        images = []
        for layout in layouts:
            data = stored.get(layout.source["image_id"])
            if data is None:
                with fsspec.open(layout.source["uri"], "rb") as handle:
                    data = handle.read()
            if hashlib.sha256(data).hexdigest() != layout.source["sha256"]:
                raise ValueError(
                    f"the real image of layout {layout.id} does not match its SHA-256 "
                    f"({layout.source['uri']})"
                )
            images.append(_rgb(data, layout.source["uri"]))
        return images


class RealVAESettings(RealSettings):
    base: ModelRef  # an SDXL pipeline directory (diffusers layout): its vae/ subfolder is used


class RealVAERunner(RealRunner):
    """The real images through the base's VAE: encode, take the latent distribution's mode,
    decode, each image at its own size. The VAE runs in float32 whatever the base is stored in
    (the toy base is float16) and whatever ``generation.dtype`` says: it is the bound of the VAE,
    not of a precision."""

    Settings = RealVAESettings

    def __init__(
        self,
        settings: RealVAESettings,
        device: str,
        generation: GenerationConfig,
        benchmark: Benchmark,
    ):
        from diffusers import AutoencoderKL

        super().__init__(settings, device, generation, benchmark)
        vae = AutoencoderKL.from_pretrained(
            check_base(settings.base), subfolder="vae", dtype=torch.float32
        )
        self.vae = vae.to(device).eval()
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.inference_mode()
    def _round_trip(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Images of one size, as one batch; a side that is not a multiple of the VAE's factor
        is padded (edge pixels repeated) and the padding cut off again."""
        width, height = images[0].size
        pixels = torch.stack([torch.from_numpy(np.array(image)) for image in images])
        pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
        pad_w, pad_h = -width % self.factor, -height % self.factor
        if pad_w or pad_h:
            pixels = torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h), mode="replicate")
        latents = self.vae.encode(pixels).latent_dist.mode()
        decoded = self.vae.decode(latents).sample[:, :, :height, :width].clamp(-1, 1)
        values = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return [Image.fromarray(array) for array in values.numpy()]

    def generate(
        self, layouts: Sequence[BenchmarkLayout], seeds: Sequence[int]
    ) -> list[Image.Image]:
        real = super().generate(layouts, seeds)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(real):
            by_size.setdefault(image.size, []).append(index)
        images: list[Image.Image | None] = [None] * len(real)
        for indices in by_size.values():
            for index, image in zip(
                indices, self._round_trip([real[k] for k in indices]), strict=True
            ):
                images[index] = image
        return images
