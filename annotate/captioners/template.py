"""Captioners that need no model. The vision-language backends (Qwen2-VL, Qwen2.5-VL, InternVL)
are in ``annotate.captioners.vlm`` and ``annotate.captioners.ray_vllm``."""

from __future__ import annotations

from collections.abc import Sequence

from annotate.backends import Captioner
from annotate.engine.records import Captions, Record


class TemplateCaptioner(Captioner):
    """The source's own caption (COCO's first caption, a URI list's text) or else the tags
    joined; each instance described by its label ("a cat"). Honest placeholders until a VLM
    describes what it sees, and named as such in the provenance."""

    def caption(self, records: Sequence[Record]) -> list[Captions]:
        return [
            Captions(
                caption=record.source_caption or ", ".join(record.tags),
                instances=[f"a {d.label}" for d in record.instances],
            )
            for record in records
        ]
