"""From records to VLM requests and back: crops, request shapes, de-duplication, strict parsing.

A request asks for the global caption of one image, or for the captions of up to
``instances_per_request`` instance crops of one image, or (``annotate.captioners.ray_vllm``, which
maps one row to one request) for both at once. Each asks for JSON under a schema (vLLM's structured
outputs), and its reply is read strictly (``annotate.vlm.replies``): every caption that cannot be
used becomes a ``Fault`` with its reason, and the record keeps an empty caption in its place.

Identical requests are sent once per batch: the same image twice (duplicate inputs) shares one
global caption, and the same crop with the same label (a box found twice) one instance caption.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from annotate.captioners.prompts import Language, PromptSet
from annotate.engine.records import Captions, Fault, Record
from annotate.vlm.bounded_schema import token_budget
from annotate.vlm.client import ChatReply, ChatRequest, encode_image
from annotate.vlm.crops import crop_box
from annotate.vlm.replies import Unusable, check_caption, expect_keys, reply_json

STAGE = "caption"


class CaptionSettings(BaseModel):
    """What every VLM captioner shares; each backend adds where its model runs."""

    model_config = ConfigDict(extra="forbid")

    prompts: PromptSet = Field(default_factory=PromptSet)
    crop_padding: float = Field(0.15, ge=0, le=1)  # context around a box, times its size per side
    instances_per_request: PositiveInt = 1  # crops described by one request
    max_caption_chars: PositiveInt = 400
    max_instance_chars: PositiveInt = 200
    language: Language | None = "en"  # None: no script check


def caption_property(max_chars: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def reply_schema(with_caption: bool, count: int, settings: CaptionSettings) -> dict:
    """``{"caption": ...}`` and/or ``{"instances": [{"caption": ...}] * count}``."""
    properties: dict[str, dict] = {}
    if with_caption:
        properties["caption"] = caption_property(settings.max_caption_chars)
    if count:
        properties["instances"] = {
            "type": "array",
            "minItems": count,
            "maxItems": count,
            "items": {
                "type": "object",
                "properties": {"caption": caption_property(settings.max_instance_chars)},
                "required": ["caption"],
                "additionalProperties": False,
            },
        }
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def build_request(
    image: bytes | None, crops: Sequence[tuple[bytes, str]], settings: CaptionSettings
) -> ChatRequest:
    """The request for an image's caption, for crops' captions (``(jpeg, label)``), or both."""
    prompts = settings.prompts
    labels = [label for _, label in crops]
    if image is not None and crops:
        text = prompts.joint_text(labels, settings.max_caption_chars, settings.max_instance_chars)
    elif image is not None:
        text = prompts.caption_text(settings.max_caption_chars)
    else:
        text = prompts.instances_text(labels, settings.max_instance_chars)
    schema = reply_schema(image is not None, len(crops), settings)
    images = ((image,) if image is not None else ()) + tuple(data for data, _ in crops)
    return ChatRequest(
        text=text,
        images=images,
        system=prompts.system_text(settings.language),
        schema=schema,
        max_tokens=token_budget(schema),
    )


def parse_reply(
    reply: ChatReply, with_caption: bool, count: int, settings: CaptionSettings
) -> list[str | Unusable]:
    """The global caption (if asked) then each instance caption, or why each cannot be used."""
    size = int(with_caption) + count
    keys = (["caption"] if with_caption else []) + (["instances"] if count else [])
    try:
        value = expect_keys(reply_json(reply), keys)
        items = value.get("instances", [])
        if not isinstance(items, list) or len(items) != count:
            got = len(items) if isinstance(items, list) else type(items).__name__
            raise Unusable("unparsable", f"expected {count} instance captions, got {got}")
    except Unusable as unusable:
        return [unusable] * size
    results: list[str | Unusable] = []
    if with_caption:
        results.append(_checked(value["caption"], settings.max_caption_chars, settings))
    for item in items:
        try:
            text = expect_keys(item, ["caption"])["caption"]
        except Unusable as unusable:
            results.append(unusable)
            continue
        results.append(_checked(text, settings.max_instance_chars, settings))
    return results


def _checked(value: object, max_chars: int, settings: CaptionSettings) -> str | Unusable:
    try:
        return check_caption(value, max_chars, settings.language)
    except Unusable as unusable:
        return unusable


def apply_results(
    captions: Captions, results: Sequence[str | Unusable], slots: Sequence[int | None]
) -> None:
    """Stores each result in its slot (``None``: the global caption, else an instance index)."""
    for result, slot in zip(results, slots, strict=True):
        if isinstance(result, Unusable):
            captions.faults.append(Fault(STAGE, str(result), slot))
        elif slot is None:
            captions.caption = result
        else:
            captions.instances[slot] = result


def record_crops(record: Record, padding: float) -> list[tuple[bytes, str]]:
    """Every instance's crop (JPEG) with its label, in instance order."""
    image = record.rgb()
    return [(encode_image(crop_box(image, d.box, padding)), d.label) for d in record.instances]


@dataclass
class PlannedRequest:
    """One request and where its answers go: per answer (global caption first, if asked), the
    ``(record, instance)`` places that share it (``instance`` None: the global caption)."""

    request: ChatRequest
    with_caption: bool
    places: list[list[tuple[int, int | None]]] = field(default_factory=list)


class CaptionPlan:
    """The requests for a batch of records, and how their replies become ``Captions``."""

    def __init__(self, records: Sequence[Record], settings: CaptionSettings):
        self.settings = settings
        self.counts = [len(r.instances) for r in records]
        self.planned: list[PlannedRequest] = []
        images: dict[str, PlannedRequest] = {}
        crops: dict[tuple[str, str], list[tuple[int, int | None]]] = {}
        first_seen: dict[tuple[str, str], tuple[int, bytes, str]] = {}
        for index, record in enumerate(records):
            image = encode_image(record.rgb())
            key = hashlib.sha256(image).hexdigest()
            if key not in images:
                images[key] = PlannedRequest(build_request(image, [], settings), True, [[]])
                self.planned.append(images[key])
            images[key].places[0].append((index, None))
            for instance, (data, label) in enumerate(record_crops(record, settings.crop_padding)):
                crop_key = (hashlib.sha256(data).hexdigest(), label)
                if crop_key not in crops:
                    crops[crop_key] = []
                    first_seen[crop_key] = (index, data, label)
                crops[crop_key].append((index, instance))
        by_record: dict[int, list[tuple[str, str]]] = {}
        for crop_key, (index, _, _) in first_seen.items():
            by_record.setdefault(index, []).append(crop_key)
        size = settings.instances_per_request
        for keys in by_record.values():
            for start in range(0, len(keys), size):
                chunk = keys[start : start + size]
                request = build_request(None, [first_seen[k][1:] for k in chunk], settings)
                self.planned.append(PlannedRequest(request, False, [crops[k] for k in chunk]))

    @property
    def requests(self) -> list[ChatRequest]:
        return [p.request for p in self.planned]

    def captions(self, replies: Sequence[ChatReply]) -> list[Captions]:
        results = [Captions("", [""] * count) for count in self.counts]
        for planned, reply in zip(self.planned, replies, strict=True):
            count = len(planned.places) - int(planned.with_caption)
            answers = parse_reply(reply, planned.with_caption, count, self.settings)
            for answer, places in zip(answers, planned.places, strict=True):
                for index, slot in places:
                    apply_results(results[index], [answer], [slot])
        for captions in results:
            captions.faults.sort(key=lambda f: -1 if f.instance is None else f.instance)
        return results
