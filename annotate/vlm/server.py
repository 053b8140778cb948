"""Serve an in-process transformers VLM with vLLM's chat-completions API (CPU machines, tests).

The same requests the HTTP captioner sends to ``vllm serve`` on a GPU machine work here:
``POST /v1/chat/completions`` with one user turn whose images are ``image_url`` data URIs
(they go before the text, as Qwen's examples put them), ``structured_outputs: {"json": schema}``
(a schema of ``annotate.vlm.bounded_schema``'s subset, decoded under it by the in-process
client with xgrammar), ``max_tokens`` or ``max_completion_tokens``; also
``GET /v1/models`` and ``GET /health``. Requests that arrive while a batch runs are generated
together in the next one (up to ``max_batch``), a small version of vLLM's continuous batching.
Decoding is greedy; what this server cannot honour (streaming, ``n`` > 1, sampling, tools, other
structured-output kinds, the ``guided_*`` and ``response_format`` fields) is refused with 400
rather than ignored. Errors use the OpenAI error body.

Bound to 127.0.0.1 unless told otherwise; ``--api-key-env`` names an environment variable whose
value clients must send as a bearer token:

    python -m annotate.vlm.server out/tiny-models/qwen2-vl --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from aiohttp import web

from annotate.vlm.bounded_schema import reply_bytes
from annotate.vlm.client import ChatReply, ChatRequest, VLMClient

DEFAULT_MAX_TOKENS = 512
REFUSED_FIELDS = (
    "stream",
    "tools",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


class RequestError(ValueError):
    """A request this server cannot serve (answered with 400 and the message)."""


def error_response(message: str, status: int) -> web.Response:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}
    body = {
        "error": {
            "message": message,
            "type": kind.get(status, "InternalServerError"),
            "param": None,
            "code": status,
        }
    }
    return web.json_response(body, status=status)


def decode_data_uri(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise RequestError("images must be data:image/...;base64 URIs (this server fetches none)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise RequestError("an image data URI is not valid base64") from None


def text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise RequestError("message content must be a string or a list of parts")


def chat_request(body: dict) -> ChatRequest:
    """The ``ChatRequest`` a chat-completions body asks for, or ``RequestError``."""
    for name in REFUSED_FIELDS:
        if body.get(name):
            raise RequestError(f"{name!r} is not supported here; use structured_outputs.json")
    if body.get("n", 1) != 1:
        raise RequestError("only n = 1 is supported")
    if body.get("temperature") not in (None, 0, 0.0):
        raise RequestError("this server decodes greedily: temperature must be 0 or absent")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    system = [m for m in messages if isinstance(m, dict) and m.get("role") == "system"]
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if len(users) != 1 or len(system) + 1 != len(messages) or messages[-1] is not users[0]:
        raise RequestError("one user turn (after optional system messages) is supported")
    content = users[0].get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": text_of(content)}]
    images, texts = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            images.append(decode_data_uri(str((part.get("image_url") or {}).get("url", ""))))
        elif kind == "text":
            texts.append(str(part.get("text", "")))
        else:
            raise RequestError(f"content part type {kind!r} is not supported")
    schema = None
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict) or set(structured) != {"json"}:
            raise RequestError("structured_outputs supports exactly one key here: json")
        schema = structured["json"]
        try:
            reply_bytes(schema)
        except ValueError as error:
            raise RequestError(f"structured_outputs.json: {error}") from None
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("max_tokens must be a positive integer")
    return ChatRequest(
        text="".join(texts),
        images=tuple(images),
        system="\n".join(text_of(m.get("content")) for m in system) or None,
        schema=schema,
        max_tokens=max_tokens,
    )


def completion_body(reply: ChatReply, model: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "finish_reason": reply.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    }


class ChatCompletionsServer:
    """The API over ``client`` (one batch at a time on a worker thread)."""

    def __init__(
        self,
        client: VLMClient,
        served_model: str | None = None,
        api_key: str | None = None,
        max_batch: int = 8,
    ):
        self.client = client
        self.served_model = served_model or client.model
        self.api_key = api_key
        self.max_batch = max_batch
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-generate")
        self.queue: asyncio.Queue[tuple[ChatRequest, asyncio.Future]] = asyncio.Queue()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.cleanup_ctx.append(self.batching)
        return app

    async def batching(self, app: web.Application):
        task = asyncio.create_task(self.run_batches())
        yield
        task.cancel()
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            requests = [request for request, _ in batch]
            try:
                replies = await loop.run_in_executor(self.worker, self.client.chat, requests)
            except Exception as error:
                failure = f"generation_failed: {type(error).__name__}: {error}"
                replies = [ChatReply.failed(failure)] * len(batch)
            for (_, future), reply in zip(batch, replies, strict=True):
                if not future.done():
                    future.set_result(reply)

    def authorised(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == (
            f"Bearer {self.api_key}"
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return error_response("missing or wrong API key", 401)
        model = {"id": self.served_model, "object": "model", "owned_by": "ifadapter"}
        return web.json_response({"object": "list", "data": [{**model, "root": self.client.model}]})

    async def completions(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return error_response("missing or wrong API key", 401)
        try:
            body = await request.json()
        except ValueError:
            return error_response("the body is not JSON", 400)
        if not isinstance(body, dict):
            return error_response("the body must be a JSON object", 400)
        return await self.answer(body)

    async def answer(self, body: dict) -> web.Response:
        """The reply to one well-formed, authorised body."""
        if body.get("model") != self.served_model:
            return error_response(f"The model `{body.get('model')}` does not exist.", 404)
        try:
            chat = chat_request(body)
        except RequestError as error:
            return error_response(str(error), 400)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((chat, future))
        reply: ChatReply = await future
        if reply.error is not None:
            return error_response(reply.error, 500)
        return web.json_response(completion_body(reply, self.served_model))


@contextmanager
def running(server: ChatCompletionsServer, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serves on a thread of its own for the duration of the block; yields the base URL
    (``http://host:port/v1``). Port 0 takes a free one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app(), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, name="vlm-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def main(argv: list[str] | None = None) -> None:
    from annotate.vlm.in_process import TransformersChatClient

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="checkpoint directory or hub id (Qwen2-VL, InternVL)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the name clients ask for (default: model)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests generated together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--api-key-env", help="environment variable holding the API key")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is not set")
    client = TransformersChatClient(args.model, args.device, args.max_batch)
    server = ChatCompletionsServer(client, args.served_model_name, api_key, args.max_batch)
    web.run_app(server.app(), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
