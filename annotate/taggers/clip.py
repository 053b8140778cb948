"""Open-vocabulary tagging with CLIP: zero-shot over a tag vocabulary (RAM's 4,585 by default).

Every tag is put in a prompt ("a photo of a {tag}.") and encoded once, when the actor starts;
an image's tags are then the vocabulary entries whose prompt embedding is closest to the image
embedding (cosine similarity at least ``min_similarity``, at most ``max_tags``, best first).
Unlike a softmax over 4,585 classes this is multi-label: a scene can have a dog, a sofa and a
lamp at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from annotate.backends import Tagger
from annotate.config import ModelRef
from annotate.engine.records import Record
from annotate.taggers.vocabulary import load_vocabulary

TEXT_BATCH = 256


class ClipTaggerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelRef  # a CLIPModel directory with its processor, or a hub id
    vocabulary: str = "ram"  # a built-in vocabulary or a one-tag-per-line file
    prompt: str = "a photo of a {}."
    max_tags: PositiveInt = 10
    min_similarity: float = Field(0.25, ge=-1.0, le=1.0)  # cosine, image vs prompt


def select_tags(
    similarities: torch.Tensor, tags: Sequence[str], max_tags: int, min_similarity: float
) -> list[list[str]]:
    """Per row of ``similarities`` (images x tags): the best ``max_tags`` tags at or above
    ``min_similarity``, best first."""
    values, indices = similarities.topk(min(max_tags, similarities.shape[-1]), dim=-1)
    return [
        [
            tags[i]
            for value, i in zip(row_values.tolist(), row_indices.tolist(), strict=True)
            if value >= min_similarity
        ]
        for row_values, row_indices in zip(values, indices, strict=True)
    ]


class ClipTagger(Tagger):
    Settings = ClipTaggerSettings
    packages = ("torch", "transformers")

    def __init__(self, settings: ClipTaggerSettings, device: str):
        from transformers import AutoProcessor, CLIPModel

        super().__init__(settings, device)
        self.model = CLIPModel.from_pretrained(settings.model).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(settings.model)
        self.tags = load_vocabulary(settings.vocabulary)
        self.tag_features = self._encode_prompts([settings.prompt.format(t) for t in self.tags])

    @torch.inference_mode()
    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        features = []
        for start in range(0, len(prompts), TEXT_BATCH):
            inputs = self.processor.tokenizer(
                prompts[start : start + TEXT_BATCH],
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            features.append(self.model.get_text_features(**inputs).pooler_output)
        return torch.nn.functional.normalize(torch.cat(features), dim=-1)

    @torch.inference_mode()
    def tag(self, records: Sequence[Record]) -> list[list[str]]:
        if not records:
            return []
        inputs = self.processor(images=[r.rgb() for r in records], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        image_features = self.model.get_image_features(pixel_values=pixels).pooler_output
        similarities = torch.nn.functional.normalize(image_features, dim=-1) @ self.tag_features.T
        return select_tags(
            similarities.float().cpu(),
            self.tags,
            self.settings.max_tags,
            self.settings.min_similarity,
        )
