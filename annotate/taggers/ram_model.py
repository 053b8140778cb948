"""The inference model of RAM++ and RAM (recognize-anything), loading their official checkpoints.

The reference package is not on PyPI and breaks on transformers 5, so this is a re-implementation
of its tagging path only (``generate_tag``), which needs neither BERT's vocabulary nor any text
encoder: a Swin image encoder (timm's, whose layout the original Swin keys map onto), a linear
projection to 512, one 512-d embedding per tag (RAM++: 51 per tag, mixed per image by their
similarity to the image's pooled embedding), and a Query2Label head: two BERT-style layers in
which the tag embeddings cross-attend to the image tokens (the self-attention is removed), then
a linear score per tag.

``RamModel.from_checkpoint_state`` takes the official file's state dict unchanged: every size is
read from the tensor shapes, the original Swin layout is renamed to timm's (downsampling moves
from the end of stage i to the start of stage i+1; the recomputed buffers are dropped), and
whatever the tagging path does not use (RAM's captioning decoder, training-only weights) is
left out, as the reference's non-strict load leaves it. Every weight the path needs must be
there.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torch import nn

# The tagging head's attention heads: ram/configs/q2l_config.json of the reference (the shapes
# of the weights do not tell them).
TAGGING_HEADS = 4
LABEL_WIDTH = 512
LAYER_NORM_EPS = 1e-12  # BERT's


class TaggingLayer(nn.Module):
    """One Query2Label layer: tags cross-attend to the image, then a feed-forward, both
    post-norm with residuals (BERT's ``crossattention``, ``intermediate``, ``output``)."""

    def __init__(self, hidden: int, image_width: int, intermediate: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(image_width, hidden)
        self.value = nn.Linear(image_width, hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, tags: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """tags (B, C, hidden), image (B, L, image_width) -> (B, C, hidden)."""
        batch, count, hidden = tags.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, TAGGING_HEADS, hidden // TAGGING_HEADS).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.query(tags)), heads(self.key(image)), heads(self.value(image))
        )
        attended = attended.transpose(1, 2).reshape(batch, count, hidden)
        tags = self.attention_norm(self.attention_out(attended) + tags)
        return self.output_norm(self.output(F.gelu(self.intermediate(tags))) + tags)


class RamModel(nn.Module):
    def __init__(
        self,
        swin: dict,
        vision_width: int,
        num_classes: int,
        descriptions: int,
        hidden: int,
        intermediate: int,
        layers: int,
    ) -> None:
        super().__init__()
        self.visual_encoder = SwinTransformer(num_classes=0, **swin)
        self.image_proj = nn.Linear(vision_width, LABEL_WIDTH)
        self.num_classes, self.descriptions = num_classes, descriptions
        self.label_embed = nn.Parameter(torch.zeros(num_classes * descriptions, LABEL_WIDTH))
        # RAM++ mixes a tag's descriptions with this learned temperature; RAM has one embedding
        self.reweight_scale = nn.Parameter(torch.zeros(())) if descriptions > 1 else None
        self.wordvec_proj = nn.Linear(LABEL_WIDTH, hidden) if hidden != LABEL_WIDTH else None
        self.tagging_head = nn.ModuleList(
            TaggingLayer(hidden, LABEL_WIDTH, intermediate) for _ in range(layers)
        )
        self.fc = nn.Linear(hidden, 1)

    @property
    def plus(self) -> bool:
        return self.reweight_scale is not None

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) -> (B, 1 + tokens, 512): the average-pooled token first."""
        tokens = self.visual_encoder.forward_features(pixels).flatten(1, 2)
        return self.image_proj(torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1))

    def tag_queries(self, image: torch.Tensor) -> torch.Tensor:
        """The tag embeddings the head starts from, (B, C, hidden)."""
        batch = image.shape[0]
        if self.plus:
            pooled = F.normalize(image[:, 0], dim=-1)
            similarity = self.reweight_scale.exp() * pooled @ self.label_embed.T
            weights = similarity.view(batch, self.num_classes, self.descriptions).softmax(-1)
            embeds = self.label_embed.view(self.num_classes, self.descriptions, LABEL_WIDTH)
            labels = torch.einsum("bcd,cde->bce", weights, embeds)
        else:
            labels = self.label_embed.expand(batch, -1, -1)
        if self.wordvec_proj is not None:
            labels = self.wordvec_proj(labels)
        return F.relu(labels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S), ImageNet-normalised -> one logit per tag, (B, C)."""
        image = self.image_embeds(pixels)
        tags = self.tag_queries(image)
        for layer in self.tagging_head:
            tags = layer(tags, image)
        return self.fc(tags).squeeze(-1)

    @classmethod
    def from_checkpoint_state(
        cls, state: dict[str, torch.Tensor], num_classes: int, image_size: int
    ) -> RamModel:
        """The model of an official RAM++ / RAM state dict (the file's ``"model"`` entry)."""
        state = {k.replace("vision_multi", "tagging_head"): v for k, v in state.items()}
        ours = _rename(state)
        config = _config(ours, num_classes, image_size)
        model = cls(**config)
        missing = sorted(set(model.state_dict()) - set(ours))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        model.load_state_dict({k: ours[k] for k in model.state_dict()})
        return model.eval()


_TAGGING_KEY = r"tagging_head\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)"
_HEAD_MODULES = {"image_proj", "label_embed", "reweight_scale", "wordvec_proj", "fc"}
_TAGGING_RULES = [
    (r"crossattention\.self\.(query|key|value)", r"\1"),
    (r"crossattention\.output\.dense", "attention_out"),
    (r"crossattention\.output\.LayerNorm", "attention_norm"),
    (r"intermediate\.dense", "intermediate"),
    (r"output\.dense", "output"),
    (r"output\.LayerNorm", "output_norm"),
]


def _rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> ours, for the tensors of the tagging path (others are dropped)."""
    out = {}
    for key, value in state.items():
        if key.startswith("visual_encoder."):
            if key.endswith(("relative_position_index", "attn_mask")):
                continue  # recomputed from the window size
            key = re.sub(
                r"layers\.(\d+)\.downsample",
                lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
                key,
            )
            out[key] = value
        elif match := re.fullmatch(_TAGGING_KEY, key):
            index, module, kind = match.groups()
            for pattern, target in _TAGGING_RULES:
                if re.fullmatch(pattern, module):
                    out[f"tagging_head.{index}.{re.sub(pattern, target, module)}.{kind}"] = value
        elif key.split(".")[0] in _HEAD_MODULES:
            out[key] = value
    return out


def _config(state: dict[str, torch.Tensor], num_classes: int, image_size: int) -> dict:
    """Every size from the shapes; only the image size is the caller's (the official RAM++ and
    RAM checkpoints are Swin-L at 384)."""
    patch = state["visual_encoder.patch_embed.proj.weight"]
    stages = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.layers."))
    depths, heads = [], []
    for stage in range(stages):
        prefix = f"visual_encoder.layers.{stage}.blocks."
        depths.append(len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}))
        heads.append(state[f"{prefix}0.attn.relative_position_bias_table"].shape[1])
    table = state["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"]
    window = (math.isqrt(table.shape[0]) + 1) // 2
    embed_dim = patch.shape[0]
    fc1 = state["visual_encoder.layers.0.blocks.0.mlp.fc1.weight"]
    rows = state["label_embed"].shape[0]
    if rows % num_classes:
        raise ValueError(
            f"the checkpoint has {rows} tag embeddings, not a multiple of the {num_classes} tags"
        )
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("tagging_head."))
    return dict(
        swin=dict(
            img_size=image_size,
            patch_size=patch.shape[-1],
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(heads),
            window_size=window,
            mlp_ratio=fc1.shape[0] / embed_dim,
        ),
        vision_width=state["visual_encoder.norm.weight"].shape[0],
        num_classes=num_classes,
        descriptions=rows // num_classes,
        hidden=state["fc.weight"].shape[1],
        intermediate=state["tagging_head.0.intermediate.weight"].shape[0],
        layers=layers,
    )
