"""What every vision-language client speaks: chat requests in, replies out, nothing raised.

Captioners and judges (the evaluation's yes/no questions on crops) are prompts and parsers on top of
one ``VLMClient``; the clients differ only in where the model runs: in this process
(``annotate.vlm.in_process``), behind vLLM's OpenAI-compatible server (``annotate.vlm.http``), or in
Ray Data's vLLM engines (``annotate.captioners.ray_vllm``, which reuses the messages built here). A
client answers every request with a ``ChatReply``; a request that could not be answered carries the
reason in ``error`` instead of raising, so one bad reply never costs a batch.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

JPEG_QUALITY = 95


def encode_image(image: Image.Image) -> bytes:
    """JPEG at quality 95: what VLMs were trained on, and a tenth of PNG's bytes on the wire."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def image_mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    raise ValueError("images travel as JPEG or PNG bytes")


def data_uri(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass(frozen=True)
class ChatRequest:
    """One user turn: its images (encoded, in the order the text refers to them) and text, an
    optional system text, the JSON schema the reply must follow (vLLM's structured outputs),
    and a token budget."""

    text: str
    images: tuple[bytes, ...] = ()
    system: str | None = None
    schema: dict | None = None
    max_tokens: int = 256

    def digest(self) -> str:
        """Identical requests (the same crop asked the same question) share a digest."""
        digest = hashlib.sha256()
        head = [self.text, self.system, self.schema, self.max_tokens]
        digest.update(json.dumps(head, sort_keys=True).encode())
        for image in self.images:
            digest.update(hashlib.sha256(image).digest())
        return digest.hexdigest()

    def messages(self) -> list[dict]:
        """OpenAI chat messages: images as ``image_url`` data URIs before the text."""
        content = [{"type": "image_url", "image_url": {"url": data_uri(i)}} for i in self.images]
        content.append({"type": "text", "text": self.text})
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": content}]


@dataclass(frozen=True)
class ChatReply:
    """The model's text, or ``error`` ("code: detail") when there is none to use.

    ``finish_reason`` is "stop" or "length" (the budget ran out: JSON would be cut). Token
    counts are as the model's tokenizer saw them (0 where a server does not say)."""

    text: str | None
    error: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def failed(cls, error: str) -> ChatReply:
        return cls(text=None, error=error)


class VLMClient(Protocol):
    """Where a model answers chat requests. ``model`` names it for provenance."""

    model: str

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        """One reply per request, in order; never raises for one request's failure."""
        ...
