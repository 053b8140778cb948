"""VLM judges of instance feature success: ``annotate.vlm.judge.Judge`` over the VLM clients.

The question is versioned: ``question_version`` picks the text from ``QUESTIONS``, and results are
cached and reported under it, so a reworded question never mixes with old answers. Replies are
parsed strictly (``{"answer": "yes" | "no"}``); an unusable one is a failure that keeps its
reason. Two backends: ``vlm_transformers`` runs the model in this process (CPU machines, tests),
``vlm_http`` asks an OpenAI-compatible server (vLLM, or ``annotate.vlm.server``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt

from annotate.config import ModelRef
from annotate.vlm.client import VLMClient
from annotate.vlm.judge import QUESTION, SYSTEM, Judge, Verdict
from evaluation.protocols import InstanceJudge

QUESTIONS: dict[str, tuple[str, str]] = {"ifs-v1": (QUESTION, SYSTEM)}
QuestionVersion = Literal["ifs-v1"]


class VLMJudge(InstanceJudge):
    """A question version asked through a ``VLMClient``."""

    def __init__(self, settings: BaseModel, device: str, client: VLMClient):
        super().__init__(settings, device)
        self.question_version = settings.question_version
        question, system = QUESTIONS[self.question_version]
        self.judge = Judge(client, question, system)

    def ask(self, items: Sequence[tuple[Image.Image, str]]) -> list[Verdict]:
        return self.judge.ask(items)


class TransformersJudgeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelRef  # Qwen2-VL / Qwen2.5-VL / InternVL checkpoint directory
    question_version: QuestionVersion = "ifs-v1"
    max_batch: PositiveInt = 8


class TransformersVLMJudge(VLMJudge):
    Settings = TransformersJudgeSettings

    def __init__(self, settings: TransformersJudgeSettings, device: str):
        from annotate.vlm.in_process import TransformersChatClient

        client = TransformersChatClient(settings.model, device, settings.max_batch)
        super().__init__(settings, device, client)


class HTTPJudgeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str  # the server's /v1 base URL
    model: str  # the served model name
    question_version: QuestionVersion = "ifs-v1"
    api_key_env: str | None = None  # the environment variable holding the key (never the key)
    concurrency: PositiveInt = 16
    timeout_s: PositiveFloat = 120.0
    retries: int = 3
    backoff_s: PositiveFloat = 1.0


class HTTPVLMJudge(VLMJudge):
    Settings = HTTPJudgeSettings

    @classmethod
    def model_paths(cls, settings: BaseModel) -> list[str | None]:
        return []  # served elsewhere: the settings (url, model name) identify it

    def __init__(self, settings: HTTPJudgeSettings, device: str):
        from annotate.vlm.http import HTTPChatClient

        client = HTTPChatClient.from_settings(settings)
        super().__init__(settings, device, client)
