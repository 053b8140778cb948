"""Tiny vision-language models of the real architectures (Qwen2-VL, Qwen2.5-VL, InternVL), built
from configs with random weights and saved the way hub checkpoints are.

No model hub is reachable here, so the captioning backends are exercised on these: the model
classes, processors, chat templates and ``from_pretrained`` paths are the real ones; only the
sizes are small and the weights random (the text they write is noise, which the constrained
decoding of ``annotate.vlm.in_process`` still shapes into valid JSON). The tokenizer is a real
byte-level BPE of Qwen2's kind (Qwen2's pre-tokenizer, ``Qwen2Tokenizer``), trained in a blink on
the RAM tag list so that its merges are English words, with the special tokens each model's
processor and chat template need:

    python -m annotate.tiny.vlm out/tiny-models
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, pre_tokenizers, trainers
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from annotate.taggers.vocabulary import load_vocabulary

Architecture = Literal["qwen2_vl", "qwen2_5_vl", "internvl"]
ARCHITECTURES: dict[Architecture, str] = {  # architecture -> directory name
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "internvl": "internvl",
}
VOCAB_SIZE = 1024
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_VISION = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
INTERNVL_VISION = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# Qwen2-VL's chat template (as shipped with Qwen/Qwen2-VL-*-Instruct, Qwen2.5-VL alike).
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL's (the -hf checkpoints'): one <IMG_CONTEXT> per image, expanded by the processor.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(vision_tokens: dict[str, str]) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE of ``VOCAB_SIZE`` tokens trained on the RAM tags, with the chat
    and vision special tokens (named attributes such as ``tokenizer.image_token``)."""
    specials = [ENDOFTEXT, IM_START, IM_END, *vision_tokens.values()]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    scratch = Qwen2Tokenizer()
    scratch.backend_tokenizer.train_from_iterator(load_vocabulary("ram"), trainer=trainer)
    bpe = json.loads(scratch.backend_tokenizer.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(merge) for merge in bpe["merges"]],
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=vision_tokens,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def text_config(tokenizer: Qwen2Tokenizer, **extra) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=ids(ENDOFTEXT),
        eos_token_id=ids(IM_END),
        pad_token_id=ids(ENDOFTEXT),
        **extra,
    )


def build_qwen_vl(version: Literal["qwen2_vl", "qwen2_5_vl"], seed: int = 0):
    """Qwen2-VL or Qwen2.5-VL: 14 px patches merged 2x2, images resized to 56-112 px (1 to 16
    image tokens), a 2-layer vision tower and a 2-layer language model."""
    tokenizer = build_tokenizer(QWEN_VISION)
    ids = tokenizer.convert_tokens_to_ids
    mrope = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
    vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2)
    if version == "qwen2_vl":
        config_class, model_class, processor_class = (
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
            Qwen2VLProcessor,
        )
        vision.update(embed_dim=32, mlp_ratio=2)
    else:
        config_class, model_class, processor_class = (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
        )
        vision.update(intermediate_size=64, out_hidden_size=32, fullatt_block_indexes=[1])
    config = config_class(
        text_config=text_config(tokenizer, rope_parameters=mrope),
        vision_config=vision,
        image_token_id=ids(QWEN_VISION["image_token"]),
        video_token_id=ids(QWEN_VISION["video_token"]),
        vision_start_token_id=ids(QWEN_VISION["vision_bos_token"]),
        vision_end_token_id=ids(QWEN_VISION["vision_eos_token"]),
    )
    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN_VL_TEMPLATE,
    )
    torch.manual_seed(seed)
    return model_class(config).eval(), processor


def build_internvl(seed: int = 0):
    """InternVL (the transformers-native -hf layout): one 28 px tile per image, 14 px patches,
    pixel shuffle 0.5: one image token per tile; a Qwen2 language model."""
    tokenizer = build_tokenizer(INTERNVL_VISION)
    side = 28
    config = InternVLConfig(
        text_config=text_config(tokenizer, model_type="qwen2"),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=side,
            patch_size=14,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_VISION["context_image_token"]),
        image_seq_length=1,
        downsample_ratio=0.5,
    )
    size = {"height": side, "width": side}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, max_patches=1),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=1,
        chat_template=INTERNVL_TEMPLATE,
    )
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config).eval(), processor


def write_tiny_vlm(directory: str | Path, architecture: Architecture, seed: int = 0) -> Path:
    """Model and processor of ``architecture`` under ``directory`` (a checkpoint directory)."""
    if architecture == "internvl":
        model, processor = build_internvl(seed)
    else:
        model, processor = build_qwen_vl(architecture, seed)
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="writes one sub-directory per architecture")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for architecture, name in ARCHITECTURES.items():
        path = write_tiny_vlm(args.directory / name, architecture, args.seed)
        print(f"wrote {architecture} to {path}")


if __name__ == "__main__":
    main()
