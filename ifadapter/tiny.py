"""SDXL-architecture components built from configs, for tests, benchmarks and the toy world.

No model hub is reachable on the project's machines, so everything here is made locally: the two
CLIP tokenizers from the real CLIP BPE vocabulary that ``open_clip_torch`` ships (real token ids,
SDXL's padding conventions), two CLIP text encoders, a VAE, a ``text_time``-conditioned UNet and
SDXL's Euler scheduler. ``size="tiny"`` is small enough for a CPU test; ``size="sdxl"`` builds the
same classes at SDXL 1.0 widths with random weights (for benchmarks).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import tempfile
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from open_clip.tokenizer import bytes_to_unicode
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

Size = Literal["tiny", "sdxl"]

CLIP_BOS, CLIP_EOS = 49406, 49407
CLIP_VOCAB_SIZE = 49408


def write_clip_bpe(directory: str | Path) -> Path:
    """Converts open_clip's ``bpe_simple_vocab_16e6.txt.gz`` to ``vocab.json`` + ``merges.txt``.

    The id order is the one CLIP was trained with (bytes, bytes + ``</w>``, merges, then the two
    special tokens), so ids match real SDXL tokenizers.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = importlib.resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def clip_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's pair: the first pads with EoT, the second (OpenCLIP bigG) pads with ``!``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_clip_bpe(tmp)
        first = CLIPTokenizer.from_pretrained(path, model_max_length=77)
        second = CLIPTokenizer.from_pretrained(path, model_max_length=77, pad_token="!")
    return first, second


def text_encoder_configs(size: Size) -> tuple[CLIPTextConfig, CLIPTextConfig]:
    common = dict(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
    )
    if size in ("tiny", "toy"):
        # 5 layers so that hidden_states[-6] (the deepest layer the adapter reads) exists.
        width = 32 if size == "tiny" else 64
        small = dict(
            hidden_size=width,
            intermediate_size=37 if size == "tiny" else 4 * width,
            num_attention_heads=4,
            num_hidden_layers=5,
            projection_dim=width,
        )
        return (
            CLIPTextConfig(**common, **small, pad_token_id=CLIP_EOS),
            CLIPTextConfig(**common, **small, pad_token_id=0),
        )
    return (
        CLIPTextConfig(
            **common,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            hidden_act="quick_gelu",
            pad_token_id=CLIP_EOS,
        ),
        CLIPTextConfig(
            **common,
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            projection_dim=1280,
            hidden_act="gelu",
            pad_token_id=0,
        ),
    )


def unet_config(size: Size) -> dict:
    common = dict(
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        addition_embed_type="text_time",
    )
    if size == "tiny":
        return dict(
            common,
            sample_size=16,
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            norm_num_groups=8,
        )
    if size == "toy":
        # SDXL's geometry at toy scale: SDXL attends at 1/16 and 1/32 of the image (64x64 and
        # 32x32 latent cells at 1024 px) and its adapter acts at 32x32, where a box spans 3-19
        # cells. Here the latent is 16x16 (64 px, factor-4 VAE) and cross-attention runs at
        # 16x16 and 8x8 (plus the mid block at 4x4), so the adapter at 16x16 sees a toy box
        # (side 0.25-0.55) as 4-9 cells, its cell mask ~1.35x the box area.
        return dict(
            common,
            sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 1, 1),
            cross_attention_dim=128,
            addition_time_embed_dim=16,
            projection_class_embeddings_input_dim=64 + 6 * 16,
        )
    return dict(
        common,
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256,
    )


def vae_config(size: Size) -> dict:
    if size in ("tiny", "toy"):
        # Factor 4 (64x64 images -> 16x16x4 latents); colours, stripes and dots survive it.
        return dict(
            block_out_channels=(16, 32, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            mid_block_add_attention=False,
            sample_size=64,
            scaling_factor=1.0,
        )
    return dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def scheduler() -> EulerDiscreteScheduler:
    """SDXL 1.0's scheduler configuration."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_unet(size: Size = "tiny", seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(size)).eval()


def components(size: Size = "tiny", seed: int = 0) -> dict:
    """The keyword arguments of ``StableDiffusionXLPipeline``, seeded."""
    first, second = text_encoder_configs(size)
    tokenizer, tokenizer_2 = clip_tokenizers()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(first).eval()
    text_encoder_2 = CLIPTextModelWithProjection(second).eval()
    vae = AutoencoderKL(**vae_config(size)).eval()
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=build_unet(size, seed + 1),
        scheduler=scheduler(),
    )


def adapter_config(size: Size = "tiny") -> dict:
    """Adapter sizes matching ``components(size)``; ``sdxl`` is the released configuration."""
    if size == "sdxl":
        return {}
    if size == "toy":
        return dict(
            resampler_width=128,
            resampler_depth=2,
            resampler_heads=4,
            resampler_dim_head=32,
            resampler_ff_mult=2,
            fourier_freqs=16,
            box_embed_hidden=128,
            fusion_reduction=8,
        )
    return dict(
        resampler_width=32,
        resampler_depth=2,
        resampler_heads=2,
        resampler_dim_head=16,
        resampler_ff_mult=2,
        fourier_freqs=8,
        box_embed_hidden=32,
        fusion_reduction=4,
    )
