"""Strict reading of VLM replies: a reply is used as asked for, or it is ``Unusable`` with a reason.

Nothing is repaired or guessed: no JSON is dug out of surrounding prose, no over-long caption is
cut, no caption in another language is kept. Each reason is ``"code: detail"``, with the code
one of ``REASONS``, so that a dataset's faults can be counted by kind, and the detail quotes
enough of the reply to see what went wrong.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from annotate.vlm.client import ChatReply

REASONS = {
    "timeout": "no reply within the timeout, after every retry",
    "connection": "the server could not be reached, after every retry",
    "http": "the server answered with an error status",
    "bad_response": "the server's answer is not a chat completion",
    "generation_failed": "the in-process model raised",
    "inference_error": "Ray Data's vLLM engine failed on the row",
    "length": "the reply was cut at the token budget",
    "refusal": "the model declined",
    "unparsable": "not JSON, or not the JSON asked for",
    "empty": "an empty caption",
    "too_long": "a caption over the length limit",
    "wrong_language": "a caption mostly outside the language's script",
    "over_limit": "more instances than one request may carry",
}
EXCERPT = 80
MIN_SCRIPT_SHARE = 0.9
# Unicode name prefixes of the letters each language is written in.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "en": ("LATIN",),
    "de": ("LATIN",),
    "fr": ("LATIN",),
    "es": ("LATIN",),
    "it": ("LATIN",),
    "zh": ("CJK",),
    "ja": ("CJK", "HIRAGANA", "KATAKANA"),
    "ko": ("HANGUL",),
    "ru": ("CYRILLIC",),
}
REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i cannot|i can'?t|i am unable|i'?m unable|as an ai\b)",
    re.IGNORECASE,
)


class Unusable(ValueError):
    """A reply, or one caption in it, that cannot be used. ``str()`` is ``"code: detail"``."""

    def __init__(self, code: str, detail: str):
        if code not in REASONS:
            raise ValueError(f"unknown reason code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code = code

    @classmethod
    def from_reason(cls, reason: str) -> Unusable:
        code, _, detail = reason.partition(": ")
        return cls(code, detail)


def excerpt(text: str) -> str:
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= EXCERPT else text[: EXCERPT - 3] + "...")


def reply_json(reply: ChatReply) -> Any:
    """The reply's JSON value; ``Unusable`` for an error, a cut reply, a refusal, or text that is
    not exactly one JSON value."""
    if reply.error is not None:
        raise Unusable.from_reason(reply.error)
    text = (reply.text or "").strip()
    if reply.finish_reason == "length":
        raise Unusable("length", f"cut at the token budget after {excerpt(text)}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if REFUSAL.search(text):
            raise Unusable("refusal", excerpt(text)) from None
        raise Unusable("unparsable", f"not JSON ({error.msg}): {excerpt(text)}") from None


def script_share(text: str, language: str) -> float:
    """The share of the letters of ``text`` written in ``language``'s script (1.0 without
    letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    scripts = SCRIPTS[language]
    inside = sum(unicodedata.name(c, "").startswith(scripts) for c in letters)
    return inside / len(letters)


def check_caption(value: Any, max_chars: int, language: str | None) -> str:
    """A caption as the model wrote it (whitespace runs folded), or ``Unusable``: not a string,
    empty, over ``max_chars``, a refusal, or under 90% of its letters in the language's script
    (the usual failure: Qwen models drifting into Chinese)."""
    if not isinstance(value, str):
        raise Unusable("unparsable", f"a caption must be a string, not {json.dumps(value)}")
    text = " ".join(value.split())
    if not text:
        raise Unusable("empty", "the caption is empty")
    if len(text) > max_chars:
        raise Unusable("too_long", f"{len(text)} characters over {max_chars}: {excerpt(text)}")
    if REFUSAL.search(text):
        raise Unusable("refusal", excerpt(text))
    if language is not None and (share := script_share(text, language)) < MIN_SCRIPT_SHARE:
        raise Unusable(
            "wrong_language",
            f"{share:.0%} of the letters in the {language} script: {excerpt(text)}",
        )
    return text


def expect_keys(value: Any, keys: list[str]) -> dict:
    """A JSON object with exactly ``keys``, else ``Unusable``."""
    if not isinstance(value, dict) or sorted(value) != sorted(keys):
        shown = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise Unusable("unparsable", f"expected an object with keys {keys}, got {shown}")
    return value
