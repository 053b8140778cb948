"""The VLM captioners of the data engine: dense global and instance captions from Qwen-VL/InternVL.

Both run the same plan (``annotate.captioners.requests``: crops, request shapes, de-duplication,
strict parsing) over a ``VLMClient``; they differ in where the model runs:

- ``openai_http``: a vLLM server (``vllm serve Qwen/Qwen2.5-VL-7B-Instruct``), or any server of
  the same API such as ``annotate.vlm.server``; the engine's actors only send requests, so they
  need neither torch nor a GPU;
- ``transformers_vlm``: the model in the actor's own process (CPU machines, tests).

``ray_vllm`` (vLLM inside Ray Data) is in ``annotate.captioners.ray_vllm``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from annotate.backends import Captioner
from annotate.captioners.requests import CaptionPlan, CaptionSettings
from annotate.config import ModelRef
from annotate.engine.records import Captions, Record
from annotate.vlm.client import VLMClient


class VLMCaptioner(Captioner):
    """A captioner that asks a VLM client; subclasses say which client."""

    def __init__(self, settings: BaseModel, device: str):
        super().__init__(settings, device)
        self.client = self.connect()

    @abstractmethod
    def connect(self) -> VLMClient:
        """The client this captioner's settings name (models load here, on the actor)."""

    def caption(self, records: Sequence[Record]) -> list[Captions]:
        plan = CaptionPlan(records, self.settings)
        return plan.captions(self.client.chat(plan.requests))


class TransformersVLMSettings(CaptionSettings):
    model: ModelRef  # a Qwen2-VL / Qwen2.5-VL / InternVL checkpoint directory or hub id
    max_batch: PositiveInt = 8  # requests generated together


class TransformersVLMCaptioner(VLMCaptioner):
    Settings: ClassVar[type[BaseModel]] = TransformersVLMSettings
    packages: ClassVar[tuple[str, ...]] = ("torch", "transformers", "xgrammar")

    def connect(self) -> VLMClient:
        from annotate.vlm.in_process import TransformersChatClient

        return TransformersChatClient(self.settings.model, self.device, self.settings.max_batch)


class HTTPVLMSettings(CaptionSettings):
    url: str  # the server's OpenAI base, e.g. http://gpu-node:8000/v1
    model: str  # the served model name (vllm serve's model or --served-model-name)
    api_key_env: str | None = None  # environment variable holding the key, never the key
    concurrency: PositiveInt = 16  # requests in flight per actor
    timeout_s: PositiveFloat = 120.0  # per attempt
    retries: NonNegativeInt = 3
    backoff_s: PositiveFloat = 1.0  # first back-off; doubles, jittered

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r} must start with http:// or https://")
        return url.rstrip("/")


class HTTPVLMCaptioner(VLMCaptioner):
    Settings: ClassVar[type[BaseModel]] = HTTPVLMSettings
    packages: ClassVar[tuple[str, ...]] = ("openai", "aiohttp")

    def connect(self) -> VLMClient:
        from annotate.vlm.http import HTTPChatClient

        return HTTPChatClient.from_settings(self.settings)
