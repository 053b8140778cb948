"""A ``VLMClient`` for vLLM's OpenAI-compatible server (``vllm serve Qwen/Qwen2.5-VL-7B-Instruct``).

Requests go through the ``openai`` client (what vLLM documents for its server), on its aiohttp
transport: chat completions with the images as ``image_url`` data URIs and, when a request has a
schema, ``extra_body={"structured_outputs": {"json": schema}}`` (what current vLLM reads; its old
``guided_json`` was removed in vLLM 0.12). Decoding is greedy (temperature 0), so a rerun asks
the same question the same way.

The client's own options carry the policy: at most ``concurrency`` connections (so requests) in
flight, the others waiting for one; ``timeout_s`` to connect and for each wait on the reply;
``retries`` after timeouts, lost connections and the statuses a busy server gives (408, 409, 429
and 5xx), after the client's jittered exponential back-off, whose first wait here is
``backoff_s`` (a server's ``Retry-After`` of up to two minutes is waited instead; a longer one
ends the retries). Other statuses are final. Whatever happens, each request gets a
``ChatReply``; a failed one says why in ``error`` ("timeout: ...", "connection: ...",
"http: 503 ...", with the attempts made).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import httpx2
from openai import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncOpenAI,
    DefaultAioHttpClient,
)
from openai._constants import INITIAL_RETRY_DELAY

from annotate.vlm.client import ChatReply, ChatRequest
from annotate.vlm.replies import excerpt

NO_KEY = "EMPTY"  # what vLLM's examples send to a server started without --api-key


class _RetryingClient(AsyncOpenAI):
    """The SDK's retries with ``backoff_s`` as the first wait (the SDK's is a fixed 0.5 s)."""

    def __init__(self, *, backoff_s: float = INITIAL_RETRY_DELAY, **options):
        super().__init__(**options)
        self.backoff_s = backoff_s

    def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):
        wait = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
        asked = response_headers is not None and any(
            name in response_headers for name in ("retry-after", "retry-after-ms")
        )
        return wait if asked else wait * self.backoff_s / INITIAL_RETRY_DELAY


def attempts(request: httpx2.Request | None) -> int:
    """Attempts made, from the retry count the client puts on each request it sends."""
    if request is None:
        return 1
    return int(request.headers.get("x-stainless-retry-count", 0)) + 1


def transport_error(error: Exception) -> BaseException:
    """The transport's own exception under the client's (aiohttp's, under httpx2's)."""
    cause = error.__cause__
    if cause is None:
        return error
    return cause.__cause__ or cause


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
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.concurrency = concurrency
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

    def options(self, request: ChatRequest) -> dict:
        """The arguments of ``chat.completions.create`` for one request."""
        options = {
            "model": self.model,
            "messages": request.messages(),
            "max_tokens": request.max_tokens,
            "temperature": 0.0,
        }
        if request.schema is not None:
            options["extra_body"] = {"structured_outputs": {"json": request.schema}}
        return options

    def client(self) -> AsyncOpenAI:
        """An SDK client for one event loop: ``concurrency`` connections, no limit on the wait
        for one (requests queue for the pool, as they did for a semaphore)."""
        return _RetryingClient(
            base_url=self.url,
            api_key=self.api_key or NO_KEY,
            max_retries=self.retries,
            timeout=httpx2.Timeout(self.timeout_s, pool=None),
            http_client=DefaultAioHttpClient(
                limits=httpx2.Limits(max_connections=self.concurrency)
            ),
            backoff_s=self.backoff_s,
        )

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        """Blocking: runs the requests on an event loop of its own (Ray actors are threads)."""
        return asyncio.run(self.chat_async(requests))

    async def chat_async(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        async with self.client() as client:
            return list(await asyncio.gather(*(self.ask(client, r) for r in requests)))

    async def ask(self, client: AsyncOpenAI, request: ChatRequest) -> ChatReply:
        try:
            raw = await client.chat.completions.with_raw_response.create(**self.options(request))
        except APIStatusError as error:
            return ChatReply.failed(
                f"{status_detail(error)} (attempts: {attempts(error.response.request)})"
            )
        except (APITimeoutError, APIConnectionError) as error:
            origin = transport_error(error)
            if isinstance(origin, TimeoutError):
                failure = f"timeout: no reply within {self.timeout_s:g}s"
            else:
                failure = f"connection: {type(origin).__name__}: {origin}"
            return ChatReply.failed(f"{failure} (attempts: {attempts(error.request)})")
        return completion_reply(raw)


def status_detail(error: APIStatusError) -> str:
    """``http: STATUS message`` from an OpenAI-style error body (or the start of the body)."""
    body = error.body
    message = body.get("message") if isinstance(body, dict) else None
    if message is None:
        message = error.response.text
    return f"http: {error.status_code} {excerpt(str(message))}"


def completion_reply(raw) -> ChatReply:
    """A chat completion as a reply; ``bad_response`` when the body is not one, ``refusal`` when
    the server says the model refused (OpenAI's ``message.refusal``)."""
    try:
        completion = raw.parse()
        choice = completion.choices[0]
        message = choice.message
        content, refusal = message.content, message.refusal
    except Exception:  # the body is not a chat completion, however it fails to be one
        return ChatReply.failed(f"bad_response: not a chat completion: {excerpt(raw.text)}")
    if refusal:
        return ChatReply.failed(f"refusal: {excerpt(str(refusal))}")
    if not isinstance(content, str):
        return ChatReply.failed("bad_response: the message has no text content")
    usage = completion.usage
    return ChatReply(
        text=content,
        finish_reason=choice.finish_reason,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )
