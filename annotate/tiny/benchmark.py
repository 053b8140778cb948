"""Tiny models for the benchmark's own parts, built from configs (no hub, random weights):

- ``gligen/``: a ``StableDiffusionGLIGENPipeline`` whose UNet has gated (GLIGEN) attention, as
  diffusers' own GLIGEN tests build it, with CLIP's real BPE tokenizer;
- ``clip/``: the data engine's tiny CLIP (``annotate.tiny.models.build_clip``) for CLIP score;
- ``inception.pth``: a random-weight Inception-v3 state dict in torch-fidelity's layout, the
  format of the real ``pt_inception-2015-12-05`` FID weights.

    python -m annotate.tiny.benchmark out/tiny-eval
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionGLIGENPipeline,
    UNet2DConditionModel,
)
from torchvision.models import inception_v3
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from annotate.tiny.models import TINY_CLIP_TEXT, build_clip
from ifadapter.tiny import write_clip_bpe

GLIGEN_DIR = "gligen"
CLIP_DIR = "clip"
INCEPTION_FILE = "inception.pth"
FIDELITY_CLASSES = 1008  # torch-fidelity's Inception keeps the 1008 logits of the TF graph


def build_gligen(seed: int = 0) -> StableDiffusionGLIGENPipeline:
    """A GLIGEN pipeline of the real architecture with 32-wide layers (factor-2 VAE)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_type="gated",
        norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_bpe(tmp), model_max_length=77)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return StableDiffusionGLIGENPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_inception(path: str | Path, seed: int = 0) -> Path:
    """A random Inception-v3 (torchvision's layers, which torch-fidelity's mirror name for name)
    saved as a plain state dict of tensors.

    Random convolutions with batch-norm statistics of 0 and 1 make activations grow layer after
    layer until the covariances of FID overflow; the statistics are therefore measured on noise
    images first (one pass in training mode, cumulative averages), as trained weights would
    have them, which keeps the pool features of order one."""
    torch.manual_seed(seed)
    network = inception_v3(
        weights=None, aux_logits=False, init_weights=True, num_classes=FIDELITY_CLASSES
    )
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    network.train()
    with torch.no_grad():
        network(torch.rand(2, 3, 299, 299) * 2 - 1)
    network.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


def write_tiny_eval_models(directory: str | Path, seed: int = 0) -> Path:
    directory = Path(directory)
    build_gligen(seed).save_pretrained(directory / GLIGEN_DIR)
    model, processor = build_clip(seed)
    model.save_pretrained(directory / CLIP_DIR)
    processor.save_pretrained(directory / CLIP_DIR)
    write_inception(directory / INCEPTION_FILE, seed)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_eval_models(args.directory, args.seed))


if __name__ == "__main__":
    main()
