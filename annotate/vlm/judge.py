"""VLM judges: a yes/no question about a crop, asked through any ``VLMClient``.

The IFG benchmark's instance feature success (docs/design.md) asks a VLM whether the crop
of a generated instance shows its description, with several judges (Qwen-VL, InternVL, ...).
A judge here is only a question and a parser on top of the captioners' clients: the same HTTP
client with its retries and timeouts, the same in-process backend for tests. The answer is
constrained to ``{"answer": "yes" | "no"}`` (structured outputs) and read strictly; a reply that
cannot be read is a ``Verdict`` without an answer but with the reason, never a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from annotate.vlm.bounded_schema import token_budget
from annotate.vlm.client import ChatReply, ChatRequest, VLMClient, encode_image
from annotate.vlm.replies import Unusable, expect_keys, reply_json

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
QUESTION = (
    "Does this image show {description}? Judge the object's kind and every attribute the "
    "description names (colour, material, texture, pose, count). Answer yes only if all hold."
)
SYSTEM = "You check images against descriptions. Answer with the JSON requested and nothing else."


@dataclass(frozen=True)
class Verdict:
    """``answer`` True (yes) or False (no); None with ``reason`` when the reply was unusable.
    ``attributes``: what a judge that checks attributes one by one saw of each (e.g. the toy
    world's exact judge: colour, shape, texture); None for a judge that answers only yes or no."""

    answer: bool | None
    reason: str | None = None
    attributes: dict[str, bool] | None = None


def parse_verdict(reply: ChatReply) -> Verdict:
    try:
        answer = expect_keys(reply_json(reply), ["answer"])["answer"]
        if answer not in ("yes", "no"):
            raise Unusable("unparsable", f"answer {answer!r} is neither yes nor no")
    except Unusable as unusable:
        return Verdict(None, str(unusable))
    return Verdict(answer == "yes")


class Judge:
    """Asks ``question`` (with ``{description}``) about each image through ``client``."""

    def __init__(self, client: VLMClient, question: str = QUESTION, system: str = SYSTEM):
        if "{description}" not in question:
            raise ValueError("the question must hold {description}")
        self.client = client
        self.question = question
        self.system = system

    def request(self, image: Image.Image, description: str) -> ChatRequest:
        return ChatRequest(
            text=self.question.format(description=description),
            images=(encode_image(image),),
            system=self.system,
            schema=ANSWER_SCHEMA,
            max_tokens=token_budget(ANSWER_SCHEMA),
        )

    def ask(self, items: Sequence[tuple[Image.Image, str]]) -> list[Verdict]:
        """One verdict per ``(image, description)``, in order."""
        replies = self.client.chat([self.request(image, text) for image, text in items])
        return [parse_verdict(reply) for reply in replies]
