"""The real chat-completions server with faults injected, for the HTTP client's tests.

A rule fires for requests whose user text holds its trigger (the instance prompt names the
crop's label, so a record's instance label picks its fault); everything else is answered by the
real model behind the server. ``times`` limits how often a rule fires (None: always).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from annotate.vlm.client import ChatReply
from annotate.vlm.server import ChatCompletionsServer, completion_body, error_response, text_of


@dataclass
class Rule:
    kind: str  # slow, status, malformed, prose, apology, refusal
    times: int | None = None
    status: int = 500
    delay_s: float = 0.0
    fired: int = 0


class FaultyServer(ChatCompletionsServer):
    def __init__(self, client, rules: dict[str, Rule], **options):
        super().__init__(client, **options)
        self.rules = rules
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests = 0

    async def answer(self, body: dict) -> web.Response:
        self.requests += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.faulty(body)
        finally:
            self.in_flight -= 1

    async def faulty(self, body: dict) -> web.Response:
        text = " ".join(text_of(m.get("content")) for m in body.get("messages", []))
        for trigger, rule in self.rules.items():
            if trigger not in text or (rule.times is not None and rule.fired >= rule.times):
                continue
            rule.fired += 1
            if rule.kind == "slow":
                await asyncio.sleep(rule.delay_s)
            elif rule.kind == "status":
                return error_response("injected fault", rule.status)
            elif rule.kind == "malformed":
                return web.Response(text='{"choices": [{"mess', content_type="application/json")
            elif rule.kind == "prose":
                reply = ChatReply(text="Sure! The object is a red ball.", finish_reason="stop")
                return web.json_response(completion_body(reply, self.served_model))
            elif rule.kind == "apology":
                reply = ChatReply(
                    text="I'm sorry, but I can't describe this.", finish_reason="stop"
                )
                return web.json_response(completion_body(reply, self.served_model))
            elif rule.kind == "refusal":
                reply = ChatReply(text=None, finish_reason="stop")
                body = completion_body(reply, self.served_model)
                body["choices"][0]["message"]["refusal"] = "I can't help with that image."
                return web.json_response(body)
        return await super().answer(body)
