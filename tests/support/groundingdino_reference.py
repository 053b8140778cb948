"""What the Grounding-DINO comparison shares between the two environments.

``tests/fixtures/groundingdino_py.*`` holds the outputs of the original Grounding-DINO code
(``groundingdino-py`` 0.4.0 under transformers 4.57, in the environment of
``scripts/gdino_env.sh``) for a tiny model of the SwinT-OGC architecture (``TINY_CONFIG``: the
real Swin-T backbone, smaller transformer and BERT) with the weights ``random_state`` makes from
the key layout and seed stored in the fixture. The main environment converts the same weights to
``GroundingDinoForObjectDetection`` and must reproduce those outputs; the original environment
runs ``annotate.detectors.groundingdino_py`` against them. Only torch, numpy and PIL are used
here, so both environments import it.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPT = "cat. dog house. red lamp."
TINY_CONFIG = """
batch_size = 1
modelname = "groundingdino"
backbone = "swin_T_224_1k"
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
return_interm_indices = [1, 2, 3]
backbone_freeze_keywords = None
enc_layers = 1
dec_layers = 2
pre_norm = False
dim_feedforward = 64
hidden_dim = 256  # the original code fixes 256 in its text position embedding
dropout = 0.0
nheads = 8
num_queries = 30
query_dim = 4
num_patterns = 0
num_feature_levels = 4
enc_n_points = 4
dec_n_points = 4
two_stage_type = "standard"
two_stage_bbox_embed_share = False
two_stage_class_embed_share = False
transformer_activation = "relu"
dec_pred_bbox_embed_share = True
dn_box_noise_scale = 1.0
dn_label_noise_ratio = 0.5
dn_label_coef = 1.0
dn_bbox_coef = 1.0
embed_init_tgt = True
dn_labelbook_size = 2000
max_text_len = 256
text_encoder_type = "bert-base-uncased"
use_text_enhancer = True
use_fusion_layer = True
use_checkpoint = False
use_transformer_ckpt = False
use_text_cross_attention = True
text_dropout = 0.0
fusion_dropout = 0.0
fusion_droppath = 0.0
sub_sentence_present = True
"""
BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=128,
)
# GroundingDINO's code fixes these ids ([CLS], [SEP], ".", "?")
FIXED_IDS = {
    0: "[PAD]",
    100: "[UNK]",
    101: "[CLS]",
    102: "[SEP]",
    103: "[MASK]",
    1012: ".",
    1029: "?",
}


def vocabulary() -> list[str]:
    """A WordPiece vocabulary with the fixed ids, every character, and the prompt's words."""
    words = sorted(set(PROMPT.replace(".", " ").split()))
    pieces = list(string.ascii_lowercase + string.digits) + [
        "##" + c for c in string.ascii_lowercase
    ]
    queue = iter([w for w in dict.fromkeys(pieces + words) if w not in FIXED_IDS.values()])
    return [FIXED_IDS.get(i) or next(queue, f"[unused{i}]") for i in range(1030)]


def write_text_encoder(directory: Path) -> Path:
    """A tiny BERT directory for ``text_encoder_type`` (its weights are replaced on load)."""
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
    BertModel(BertConfig(vocab_size=1030, **BERT)).save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return directory


def random_state(layout: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Original-layout weights: N(0, 1/fan_in) matrices, N(1, 0.2) norm scales, N(0, 0.2)
    other vectors."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(layout):
        shape = layout[key]
        if len(shape) > 1:
            std, mean = 1 / math.sqrt(math.prod(shape[1:])), 0.0
        else:
            std, mean = 0.2, 1.0 if "norm" in key.lower() and key.endswith("weight") else 0.0
        state[key] = torch.randn(shape, generator=generator) * std + mean
    return state


def sample_image() -> Image.Image:
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((160, 120), Image.Resampling.BILINEAR)
