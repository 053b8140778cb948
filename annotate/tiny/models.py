"""Tiny CLIP and Grounding-DINO models built from configs, saved the way real checkpoints are.

No model hub is reachable on the project's machines, so the engine's real backends are exercised
on random-weight models of the real architectures: a CLIP whose tokenizer is CLIP's own BPE
vocabulary (``ifadapter.tiny.write_clip_bpe``) and a ``GroundingDinoForObjectDetection`` with a
Swin backbone (patch size 2 at 64 px, two decoder layers) and a small WordPiece vocabulary that
holds every word of the tag vocabulary and puts ``[CLS]``, ``[SEP]``, ``.`` and ``?`` at the ids
the model code expects (101, 102, 1012, 1029). Both load through ``from_pretrained`` exactly like
downloaded checkpoints, which is what ``configs/tiny.yaml`` points at:

    python -m annotate.tiny.models out/tiny-models
"""

from __future__ import annotations

import argparse
import re
import string
import tempfile
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)

from annotate.taggers.vocabulary import load_vocabulary
from ifadapter.tiny import CLIP_BOS, CLIP_EOS, CLIP_VOCAB_SIZE, write_clip_bpe

CLIP_DIR = "clip"
GROUNDING_DINO_DIR = "grounding-dino"
IMAGE_SIDE = 64

# Ids that GroundingDinoModel hard-codes (SPECIAL_TOKENS in its modeling code) and that BERT's
# tokenizer needs; every other slot is free.
FIXED_IDS = {
    0: "[PAD]",
    100: "[UNK]",
    101: "[CLS]",
    102: "[SEP]",
    103: "[MASK]",
    1012: ".",
    1029: "?",
}


def wordpiece_vocab(words: list[str]) -> list[str]:
    """A WordPiece vocabulary: the fixed ids, every printable character alone and as a suffix
    piece (so that any text tokenizes), then ``words``; free slots below 1030 are ``[unusedN]``."""
    characters = [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces = characters + ["##" + c for c in characters if c.isalnum()]
    fixed = set(FIXED_IDS.values())
    tokens = [t for t in dict.fromkeys(pieces + words) if t not in fixed]
    size = max(len(tokens) + len(FIXED_IDS), max(FIXED_IDS) + 1)
    vocab: list[str] = []
    queue = iter(tokens)
    for index in range(size):
        if index in FIXED_IDS:
            vocab.append(FIXED_IDS[index])
        elif 0 < index < 100:
            vocab.append(f"[unused{index}]")
        else:
            vocab.append(next(queue, f"[unused{index}]"))
    return vocab


def tag_words(tags: list[str]) -> list[str]:
    """The words BERT's basic tokenizer makes of the tags (lower case, split at punctuation)."""
    return sorted({w for tag in tags for w in re.findall(r"[a-z0-9]+", tag.lower())})


# The text tower of every tiny CLIP here: CLIP's real vocabulary and special tokens.
TINY_CLIP_TEXT = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    bos_token_id=CLIP_BOS,
    eos_token_id=CLIP_EOS,
    pad_token_id=CLIP_EOS,
)


def build_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIP of the real architecture at 32 px with CLIP's real BPE tokenizer."""
    config = CLIPConfig(
        text_config=TINY_CLIP_TEXT,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_bpe(tmp), model_max_length=77)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_grounding_dino(
    vocabulary: list[str], seed: int = 0
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """A Grounding-DINO of the real architecture at 64 px whose tokenizer knows ``vocabulary``."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab = wordpiece_vocab(tag_words(vocabulary))
        vocab_file.write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer.from_pretrained(tmp, do_lower_case=True)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=IMAGE_SIDE,
            patch_size=2,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=128,
        ),
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        d_model=32,
        max_text_len=128,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": IMAGE_SIDE, "longest_edge": IMAGE_SIDE}
    )
    return model, GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def write_tiny_models(directory: str | Path, vocabulary: str = "ram", seed: int = 0) -> Path:
    """Writes ``clip/`` and ``grounding-dino/`` (model + processor each) under ``directory``."""
    directory = Path(directory)
    for name, (model, processor) in (
        (CLIP_DIR, build_clip(seed)),
        (GROUNDING_DINO_DIR, build_grounding_dino(load_vocabulary(vocabulary), seed)),
    ):
        model.save_pretrained(directory / name)
        processor.save_pretrained(directory / name)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where to write clip/ and grounding-dino/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote tiny models to {write_tiny_models(args.directory, seed=args.seed)}")


if __name__ == "__main__":
    main()
