"""Boxes for an image's tags: Grounding-DINO through ``GroundingDinoForObjectDetection``.

The tags become the text prompt ("cat. dog house. lamp."), cut into several prompts when they
do not fit the model's text length. Each query of the model scores every text token; a query's
label is the tag whose tokens it scores highest, its score that tag's best token, and it is kept
when the score passes ``box_threshold`` and the tag's mean token score passes
``text_threshold`` (0.25 / 0.20 by default). The labels are therefore always whole tags, never
the token fragments that thresholding tokens alone can produce. The detections of all prompts
of an image then go through class-wise NMS, a minimum box size and a cap on their number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from annotate.backends import Detector
from annotate.config import ModelRef
from annotate.detectors.selection import select_detections
from annotate.engine.records import Detection, Record

SPECIAL_TOKENS = 2  # [CLS] and [SEP] around every prompt


class GroundingDinoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelRef  # a GroundingDinoForObjectDetection directory with its processor, or hub id
    box_threshold: float = Field(0.25, ge=0.0, le=1.0)
    text_threshold: float = Field(0.20, ge=0.0, le=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    min_box_size: float = Field(0.02, ge=0.0, lt=1.0)  # shortest side, normalised
    max_instances: PositiveInt = 16
    max_text_tokens: PositiveInt | None = None  # default: the model's max_text_len


def prompt_text(tag: str) -> str:
    """A tag as Grounding-DINO reads it: lower case, no dots (they separate phrases)."""
    return " ".join(tag.lower().replace(".", " ").split())


def chunk_tags(
    tags: Sequence[str], token_counts: Sequence[int], max_tokens: int
) -> list[list[str]]:
    """Consecutive groups of tags whose prompt ("a. b. c.") fits ``max_tokens`` tokens with
    [CLS] and [SEP]; each tag costs its tokens plus one for its dot. A tag that cannot fit even
    alone is left out."""
    chunks: list[list[str]] = []
    current: list[str] = []
    used = SPECIAL_TOKENS
    for tag, count in zip(tags, token_counts, strict=True):
        cost = count + 1
        if cost + SPECIAL_TOKENS > max_tokens:
            continue
        if used + cost > max_tokens:
            chunks.append(current)
            current, used = [], SPECIAL_TOKENS
        current.append(tag)
        used += cost
    if current:
        chunks.append(current)
    return chunks


def build_prompt(tags: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The prompt for ``tags`` and each tag's character span in it."""
    parts, spans, position = [], [], 0
    for tag in tags:
        text = prompt_text(tag)
        spans.append((position, position + len(text)))
        parts.append(text)
        position += len(text) + 2  # ". "
    return ". ".join(parts) + ".", spans


def token_map(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(tags, tokens) boolean: which tokens (by character offsets) belong to which tag."""
    mapping = torch.zeros(len(spans), len(offsets), dtype=torch.bool)
    for t, (start, end) in enumerate(spans):
        for k, (token_start, token_end) in enumerate(offsets):
            if token_end > token_start and start <= token_start and token_end <= end:
                mapping[t, k] = True
    return mapping


def decode_queries(
    probabilities: torch.Tensor,
    boxes: torch.Tensor,
    mapping: torch.Tensor,
    tags: Sequence[str],
    box_threshold: float,
    text_threshold: float,
) -> list[Detection]:
    """Detections from one prompt's queries: ``probabilities`` (queries, tokens) after the
    sigmoid, ``boxes`` (queries, 4) normalised cxcywh, ``mapping`` (tags, tokens)."""
    masked = probabilities[:, None, :] * mapping[None].to(probabilities.dtype)  # (q, tags, tok)
    best = masked.amax(dim=-1)  # (queries, tags)
    mean = masked.sum(dim=-1) / mapping.sum(dim=-1).clamp(min=1)
    scores, labels = best.max(dim=-1)
    label_means = mean.gather(1, labels[:, None])[:, 0]
    keep = (scores > box_threshold) & (label_means > text_threshold)
    cx, cy, w, h = boxes.unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0.0, 1.0)
    return [
        Detection(
            box=tuple(float(v) for v in corners[q].tolist()),
            label=tags[int(labels[q])],
            score=float(scores[q]),
        )
        for q in keep.nonzero()[:, 0].tolist()
    ]


class GroundingDinoDetector(Detector):
    Settings = GroundingDinoSettings
    packages = ("torch", "transformers")

    def __init__(self, settings: GroundingDinoSettings, device: str):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        super().__init__(settings, device)
        self.model = GroundingDinoForObjectDetection.from_pretrained(settings.model)
        self.model = self.model.to(device).eval()
        self.processor = AutoProcessor.from_pretrained(settings.model)
        self.tokenizer = self.processor.tokenizer
        text_config = self.model.config.text_config
        self.max_tokens = min(
            settings.max_text_tokens or self.model.config.max_text_len,
            self.model.config.max_text_len,
            text_config.max_position_embeddings,
        )
        self._token_counts: dict[str, int] = {}

    def token_count(self, tag: str) -> int:
        if tag not in self._token_counts:
            ids = self.tokenizer(prompt_text(tag), add_special_tokens=False)["input_ids"]
            self._token_counts[tag] = len(ids)
        return self._token_counts[tag]

    @torch.inference_mode()
    def _run(self, images: list, tag_groups: list[list[str]]) -> list[list[Detection]]:
        prompts = [build_prompt(tags) for tags in tag_groups]
        text = self.tokenizer(
            [p for p, _ in prompts],
            padding="longest",
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        offsets = text.pop("offset_mapping").tolist()
        probabilities, boxes = self._forward(images, [p for p, _ in prompts], text)
        return [
            decode_queries(
                probabilities[i],
                boxes[i],
                token_map(offsets[i], spans),
                tags,
                self.settings.box_threshold,
                self.settings.text_threshold,
            )
            for i, (tags, (_, spans)) in enumerate(zip(tag_groups, prompts, strict=True))
        ]

    def _forward(
        self, images: list, prompts: list[str], text: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token probabilities (B, queries, tokens) and normalised cxcywh boxes, on the CPU."""
        pixels = self.processor.image_processor(images, return_tensors="pt")
        outputs = self.model(
            pixel_values=pixels["pixel_values"].to(self.device, self.model.dtype),
            pixel_mask=pixels["pixel_mask"].to(self.device),
            **text.to(self.device),
        )
        length = text["input_ids"].shape[1]
        return outputs.logits[
            :, :, :length
        ].sigmoid().float().cpu(), outputs.pred_boxes.float().cpu()

    def detect(self, records: Sequence[Record]) -> list[list[Detection]]:
        """Records without tags have nothing to look for (and may carry no pixels): empty."""
        tagged = [index for index, record in enumerate(records) if record.tags]
        found = self.detect_tags(
            [records[i].rgb() for i in tagged], [records[i].tags for i in tagged]
        )
        out: list[list[Detection]] = [[] for _ in records]
        for index, detections in zip(tagged, found, strict=True):
            out[index] = detections
        return out

    def detect_tags(
        self, images: Sequence[Image.Image], tag_lists: Sequence[Sequence[str]]
    ) -> list[list[Detection]]:
        """Instances per image, prompted by that image's own tags (the engine passes a record's
        tags; the benchmark passes the labels of a layout's instances), after selection."""
        jobs = [
            (index, chunk)
            for index, tags in enumerate(tag_lists)
            for chunk in chunk_tags(tags, [self.token_count(t) for t in tags], self.max_tokens)
        ]
        found: list[list[Detection]] = [[] for _ in images]
        step = max(1, len(images))
        for start in range(0, len(jobs), step):
            batch = jobs[start : start + step]
            results = self._run([images[i] for i, _ in batch], [tags for _, tags in batch])
            for (index, _), detections in zip(batch, results, strict=True):
                found[index].extend(detections)
        s = self.settings
        return [select_detections(d, s.nms_iou, s.min_box_size, s.max_instances) for d in found]
