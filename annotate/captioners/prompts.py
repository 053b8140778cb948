"""The words the captioners send: one prompt set for the global caption and one for instance crops.

A ``PromptSet`` is part of a captioner's settings, so the whole set (with its ``version``)
lands in the ``annotator`` provenance of every row it captioned, and two datasets made with
different prompts can be told apart. The defaults ask for dense descriptions (colour, material,
texture, pose, count), which the paper credits for InstanceDiffusion's edge; the length limit
and the language are filled in from the captioner's settings.

Placeholders: ``{language}`` (system), ``{max_chars}`` (caption, instances), ``{crops}`` (the
instance prompt: one ``crop`` line per crop), ``{number}`` and ``{label}`` (crop). The joint
prompt of one request per image (``annotate.captioners.ray_vllm``) puts ``whole`` first, then
the caption prompt, then the instance prompt, with the crops numbered from 2.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

Language = Literal["en", "de", "fr", "es", "it", "zh", "ja", "ko", "ru"]
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "zh": "Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "ru": "Russian",
}


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = "dense-v1"
    system: str = (
        "You describe images for training an image generator. Describe only what is visible, "
        "concretely, in {language}. Answer with the JSON requested and nothing else."
    )
    caption: str = (
        "Describe the whole picture in one or two sentences of at most {max_chars} characters: "
        "the main objects with their colour, material, texture, pose and count, and the setting."
    )
    instances: str = (
        "Each crop is centred on one object, with a margin of context around it.\n{crops}\n"
        "For each crop, in order, describe only its object in one phrase of at most {max_chars} "
        "characters: its colour, material, texture and pose, and how many there are if more "
        "than one. Start with the object's name."
    )
    crop: str = "Image {number}: a crop centred on a {label}."
    whole: str = "Image 1 is the whole picture."

    @model_validator(mode="after")
    def _placeholders_are_known(self) -> PromptSet:
        fields = {
            "system": {"language": ""},
            "caption": {"max_chars": 0},
            "instances": {"max_chars": 0, "crops": ""},
            "crop": {"number": 0, "label": ""},
            "whole": {},
        }
        for name, values in fields.items():
            try:
                getattr(self, name).format(**values)
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    f"prompt {name!r} has a placeholder it cannot fill: {error}"
                ) from None
        return self

    def system_text(self, language: str | None) -> str:
        return self.system.format(language=LANGUAGE_NAMES.get(language or "en", "English"))

    def caption_text(self, max_chars: int) -> str:
        return self.caption.format(max_chars=max_chars)

    def instances_text(self, labels: list[str], max_chars: int, first: int = 1) -> str:
        crops = "\n".join(
            self.crop.format(number=first + i, label=label) for i, label in enumerate(labels)
        )
        return self.instances.format(crops=crops, max_chars=max_chars)

    def joint_text(self, labels: list[str], caption_chars: int, instance_chars: int) -> str:
        parts = [self.whole, self.caption_text(caption_chars)]
        if labels:
            parts.append(self.instances_text(labels, instance_chars, first=2))
        return "\n".join(parts)
