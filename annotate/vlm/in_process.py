"""A ``VLMClient`` that runs Qwen2-VL, Qwen2.5-VL or InternVL in this process with transformers.

For CPU machines, tests, and the small server of ``annotate.vlm.server``. Requests are generated
in batches (left padding, greedy decoding); a request with a JSON schema is decoded under it
(``annotate.vlm.json_grammar``), which is what vLLM's structured outputs do on a GPU server, so both
backends hand the same kind of text to the same parsers. A batch that fails is retried one
request at a time, and a request that still fails comes back with the error as its reason.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from tokenizers import decoders
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from annotate.vlm.client import ChatReply, ChatRequest
from annotate.vlm.json_grammar import Grammar, State
from annotate.vlm.token_mask import TokenMask

SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "internvl")


def token_bytes(tokenizer, size: int) -> list[bytes | None]:
    """The bytes each token id stands for (``None`` for special and added tokens and for ids
    past the tokenizer, which the model's padded vocabulary may have)."""
    if not isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):
        raise ValueError("constrained decoding needs a byte-level BPE tokenizer (Qwen2's kind)")
    to_byte = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    added = set(tokenizer.added_tokens_decoder)
    table: list[bytes | None] = [None] * size
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if index < size and index not in added and token is not None:
            try:
                table[index] = bytes(to_byte[symbol] for symbol in token)
            except KeyError:
                continue
    return table


class SchemaLogitsProcessor(LogitsProcessor):
    """Per row of a batch: the tokens its schema allows (rows without one are free), and the
    end of the sequence once the row's own token budget is spent."""

    def __init__(
        self,
        mask: TokenMask,
        grammars: list[Grammar | None],
        budgets: list[int],
        prompt_length: int,
    ):
        self.mask = mask
        self.grammars = grammars
        self.budgets = budgets
        self.prompt_length = prompt_length
        self.states: list[State | None] = [g.start if g else None for g in grammars]
        self.finished = [False] * len(grammars)
        self.eos = set(mask.eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        forbidden = torch.full_like(scores[0], float("-inf"))
        for row, grammar in enumerate(self.grammars):
            if self.finished[row]:
                continue
            if step > 0:
                token = int(input_ids[row, -1])
                if token in self.eos:
                    self.finished[row] = True
                    continue
                if grammar is not None:
                    self.states[row] = grammar.feed(self.states[row], self.mask.token_bytes[token])
            if step >= self.budgets[row]:
                allowed = torch.zeros_like(scores[row], dtype=torch.bool)
                allowed[self.mask.eos_ids[0]] = True
            elif grammar is not None:
                allowed = self.mask.allowed(grammar, self.states[row])
                if not allowed.any():  # a dead end cannot happen with a byte-level vocabulary
                    allowed[self.mask.eos_ids[0]] = True
            else:
                continue
            scores[row] = torch.where(allowed, scores[row], forbidden)
        return scores


class TransformersChatClient:
    """Greedy chat generation with a local (or hub) Qwen2-VL / Qwen2.5-VL / InternVL checkpoint.

    ``max_batch`` requests share one ``generate`` call; float32 on the CPU, bfloat16 on CUDA."""

    def __init__(self, model: str, device: str = "cpu", max_batch: int = 8):
        config = AutoConfig.from_pretrained(model)
        if config.model_type not in SUPPORTED:
            raise ValueError(
                f"{model} is a {config.model_type!r} model; supported: {', '.join(SUPPORTED)}"
            )
        self.model = model
        self.device = device
        self.max_batch = max_batch
        self.processor = AutoProcessor.from_pretrained(model)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.network = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
        self.network.to(device).eval()
        size = self.network.get_output_embeddings().weight.shape[0]
        eos = self.network.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        eos_ids.append(self.tokenizer.eos_token_id)
        self.mask = TokenMask(token_bytes(self.tokenizer, size), eos_ids)
        self.grammars: dict[str, Grammar] = {}

    def grammar(self, schema: dict) -> Grammar:
        compiled = Grammar.from_schema(schema)
        return self.grammars.setdefault(compiled.key, compiled)

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        replies: list[ChatReply] = []
        for start in range(0, len(requests), self.max_batch):
            replies += self.chat_batch(requests[start : start + self.max_batch])
        return replies

    def chat_batch(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        try:
            return self.generate(requests)
        except Exception as error:
            if len(requests) == 1:
                return [ChatReply.failed(f"generation_failed: {type(error).__name__}: {error}")]
        return [reply for request in requests for reply in self.chat_batch([request])]

    def conversation(self, request: ChatRequest) -> list[dict]:
        content: list[dict] = [
            {"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")}
            for data in request.images
        ]
        content.append({"type": "text", "text": request.text})
        system = [{"role": "system", "content": [{"type": "text", "text": request.system}]}]
        return [*(system if request.system else []), {"role": "user", "content": content}]

    @torch.inference_mode()
    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        inputs = self.processor.apply_chat_template(
            [self.conversation(r) for r in requests],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        ).to(self.device)
        prompt_length = inputs["input_ids"].shape[1]
        grammars = [self.grammar(r.schema) if r.schema else None for r in requests]
        budgets = [r.max_tokens for r in requests]
        constraint = SchemaLogitsProcessor(self.mask, grammars, budgets, prompt_length)
        output = self.network.generate(
            **inputs,
            max_new_tokens=max(budgets) + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([constraint]),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.mask.eos_ids,
        )
        replies = []
        for row, generated in enumerate(output[:, prompt_length:].tolist()):
            ends = [i for i, token in enumerate(generated) if token in constraint.eos]
            length = ends[0] if ends else len(generated)
            cut = not ends or length >= budgets[row]
            replies.append(
                ChatReply(
                    text=self.tokenizer.decode(generated[:length], skip_special_tokens=True),
                    finish_reason="length" if cut else "stop",
                    prompt_tokens=int(inputs["attention_mask"][row].sum()),
                    completion_tokens=length,
                )
            )
        return replies
