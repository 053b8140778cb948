"""A ``VLMClient`` for vLLM's OpenAI-compatible server (``vllm serve Qwen/Qwen2.5-VL-7B-Instruct``).

POST ``{url}/chat/completions`` with the images as ``image_url`` data URIs and, when a request
has a schema, ``"structured_outputs": {"json": schema}`` (what current vLLM reads; the old
``guided_json`` is silently ignored by it). Decoding is greedy (temperature 0), so a rerun asks
the same question the same way.

At most ``concurrency`` requests are in flight; each attempt has ``timeout_s``; timeouts, lost
connections and the statuses a busy server gives (408, 429, 500, 502, 503, 504) are retried up
to ``retries`` times after a jittered exponential back-off (``backoff_s``, doubling; a server's
``Retry-After`` is honoured). Other statuses are final. Whatever happens, each request gets a
``ChatReply``; a failed one says why in ``error`` ("timeout: ...", "http: 503 ...").
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Sequence

import aiohttp

from annotate.vlm.client import ChatReply, ChatRequest
from annotate.vlm.replies import excerpt

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0


def completion_reply(raw: bytes) -> ChatReply:
    """A chat-completion body as a reply; ``bad_response`` when it is not one, ``refusal`` when
    the server says the model refused (OpenAI's ``message.refusal``)."""
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        message = choice["message"]
        content = message.get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = raw.decode("utf-8", "replace")
        return ChatReply.failed(f"bad_response: not a chat completion: {excerpt(text)}")
    if message.get("refusal"):
        return ChatReply.failed(f"refusal: {excerpt(str(message['refusal']))}")
    if not isinstance(content, str):
        return ChatReply.failed("bad_response: the message has no text content")
    usage = body.get("usage") or {}
    return ChatReply(
        text=content,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def error_detail(status: int, raw: bytes) -> str:
    """``http: STATUS message`` from an OpenAI-style error body (or the start of the body)."""
    try:
        body = json.loads(raw)
        message = body["error"]["message"] if "error" in body else body["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace")
    return f"http: {status} {excerpt(str(message))}"


class HTTPChatClient:
    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
    ):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    @classmethod
    def from_settings(cls, settings) -> HTTPChatClient:
        """From a config section with ``url``, ``model``, ``api_key_env`` (the environment
        variable holding the key, never the key), ``concurrency``, ``timeout_s``, ``retries``
        and ``backoff_s``: the captioner's and the judges' HTTP backends alike."""
        api_key = None
        if settings.api_key_env is not None:
            api_key = os.environ.get(settings.api_key_env)
            if not api_key:
                raise ValueError(f"api_key_env: {settings.api_key_env} is not set")
        return cls(
            settings.url,
            settings.model,
            api_key=api_key,
            concurrency=settings.concurrency,
            timeout_s=settings.timeout_s,
            retries=settings.retries,
            backoff_s=settings.backoff_s,
        )

    def payload(self, request: ChatRequest) -> dict:
        body = {
            "model": self.model,
            "messages": request.messages(),
            "max_tokens": request.max_tokens,
            "temperature": 0.0,
        }
        if request.schema is not None:
            body["structured_outputs"] = {"json": request.schema}
        return body

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        """Blocking: runs the requests on an event loop of its own (Ray actors are threads)."""
        return asyncio.run(self.chat_async(requests))

    async def chat_async(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        gate = asyncio.Semaphore(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=self.timeout) as session:
            return list(await asyncio.gather(*(self.ask(session, gate, r) for r in requests)))

    def backoff(self, attempt: int, retry_after: str | None) -> float:
        """Jittered exponential back-off before retry ``attempt`` (1, 2, ...)."""
        delay = self.backoff_s * 2 ** (attempt - 1)
        delay = delay / 2 + random.uniform(0, delay / 2)
        try:
            asked = float(retry_after) if retry_after is not None else 0.0
        except ValueError:
            asked = 0.0
        return max(delay, min(asked, MAX_RETRY_AFTER_S))

    async def ask(
        self, session: aiohttp.ClientSession, gate: asyncio.Semaphore, request: ChatRequest
    ) -> ChatReply:
        body = self.payload(request)
        failure, retry_after = "", None
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff(attempt, retry_after))
            retry_after = None
            async with gate:
                try:
                    async with session.post(self.endpoint, json=body, headers=self.headers) as got:
                        status, raw = got.status, await got.read()
                        retry_after = got.headers.get("Retry-After")
                except TimeoutError:
                    failure = f"timeout: no reply within {self.timeout_s:g}s"
                    continue
                except aiohttp.ClientError as error:
                    failure = f"connection: {type(error).__name__}: {error}"
                    continue
            if status == 200:
                return completion_reply(raw)
            failure = error_detail(status, raw)
            if status not in RETRY_STATUSES:
                attempts = attempt + 1
                break
        return ChatReply.failed(f"{failure} (attempts: {attempts})")
