"""A ``VLMClient`` that runs Qwen2-VL, Qwen2.5-VL or InternVL in this process with transformers.

For CPU machines, tests, and the small server of ``annotate.vlm.server``. Requests are generated
in batches (left padding, greedy decoding); a request with a JSON schema is decoded under it with
xgrammar, the engine of vLLM's structured outputs on a GPU server, so both backends hand the same
kind of text (compact JSON) to the same parsers. A batch that fails is retried one request at a
time, and a request that still fails comes back with the error as its reason.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xgrammar as xgr
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
)

from annotate.vlm.client import ChatReply, ChatRequest

SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "internvl")
# What xgrammar 0.2.8 lets into JSON strings that is not JSON, or not UTF-8: raw control
# characters in strings with minLength/maxLength (mlc-ai/xgrammar#800), and UTF-16 surrogates
# (U+D800 to U+DFFF: the bytes ED A0..BF ..). DEL is kept out of captions as well.
NOT_IN_REPLIES = re.compile(rb"[\x00-\x1f\x7f]|\xed[\xa0-\xbf]")
SURROGATE_LEAD, SURROGATE_SECOND = b"\xed", re.compile(rb"[\xa0-\xbf]")


def packed(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean mask over the vocabulary as xgrammar's token bitmask: int32 words, token ``j``
    in bit ``j % 32`` of word ``j // 32``."""
    words = -(-allowed.numel() // 32)
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[: allowed.numel()] = allowed.long()
    value = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


@dataclass(frozen=True)
class Exclusions:
    """Tokens that no reply under a schema may take although xgrammar would allow them, over
    the model's vocabulary: ``always`` (raw control characters, a surrogate inside the token,
    added tokens such as ``<|image_pad|>``, which xgrammar reads as text, other than the ends
    of sequence), and ``after_lead``, the tokens that would complete a surrogate after a token
    that ``ends_in_lead``. ``keep`` and ``keep_after_lead``: what may stay, as bitmask words."""

    always: torch.Tensor
    after_lead: torch.Tensor
    ends_in_lead: frozenset[int]
    keep: torch.Tensor
    keep_after_lead: torch.Tensor

    @classmethod
    def of(cls, info: xgr.TokenizerInfo, tokenizer, eos_ids: Sequence[int]) -> Exclusions:
        vocabulary = info.decoded_vocab[: info.vocab_size]

        def over_vocabulary(test) -> torch.Tensor:
            mask = torch.zeros(info.vocab_size, dtype=torch.bool)
            mask[: len(vocabulary)] = torch.tensor([test(data) for data in vocabulary])
            return mask

        always = over_vocabulary(lambda data: NOT_IN_REPLIES.search(data) is not None)
        always[[i for i in tokenizer.added_tokens_decoder if i < info.vocab_size]] = True
        always[list(eos_ids)] = False
        after_lead = over_vocabulary(lambda data: SURROGATE_SECOND.match(data) is not None)
        return cls(
            always=always,
            after_lead=after_lead,
            ends_in_lead=frozenset(
                i for i, data in enumerate(vocabulary) if data.endswith(SURROGATE_LEAD)
            ),
            keep=packed(~always),
            keep_after_lead=packed(~always & ~after_lead),
        )


def compact_json(compiler: xgr.GrammarCompiler, schema: dict) -> xgr.CompiledGrammar:
    """The schema's grammar for compact JSON (the form ``annotate.vlm.bounded_schema`` budgets
    for); the compiler keeps what it compiled, by schema."""
    return compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))


class SchemaLogitsProcessor(LogitsProcessor):
    """Per row of a batch: the tokens its compiled schema allows (rows without one are free)
    less the ``exclusions``, and the end of the sequence once the row's own token budget is
    spent."""

    def __init__(
        self,
        grammars: list[xgr.CompiledGrammar | None],
        budgets: list[int],
        prompt_length: int,
        eos_ids: list[int],
        exclusions: Exclusions,
    ):
        self.matchers = [
            None if grammar is None else xgr.GrammarMatcher(grammar, override_stop_tokens=eos_ids)
            for grammar in grammars
        ]
        self.budgets = budgets
        self.prompt_length = prompt_length
        self.eos_ids = eos_ids
        self.eos = set(eos_ids)
        self.exclusions = exclusions
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), exclusions.always.numel())
        self.eos_bit = packed(torch.arange(32) == eos_ids[0] % 32)[0]
        self.finished = [False] * len(grammars)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        constrained, spent = [], []
        for row, matcher in enumerate(self.matchers):
            if self.finished[row]:
                continue
            token = int(input_ids[row, -1])
            if step > 0 and token in self.eos:
                self.finished[row] = True
                continue
            if step >= self.budgets[row]:
                spent.append(row)
            elif matcher is not None:
                if step > 0:
                    matcher.accept_token(token)
                matcher.fill_next_token_bitmask(self.bitmask, row)
                after_lead = step > 0 and token in self.exclusions.ends_in_lead
                keep = self.exclusions.keep_after_lead if after_lead else self.exclusions.keep
                self.bitmask[row] &= keep
                if not self.bitmask[row].any():  # never a dead end
                    self.bitmask[row, self.eos_ids[0] // 32] = self.eos_bit
                constrained.append(row)
        if constrained:
            bitmask = self.bitmask.to(scores.device)
            xgr.apply_token_bitmask_inplace(scores, bitmask, indices=constrained)
        if spent:
            only_eos = torch.full_like(scores[0], float("-inf"))
            only_eos[self.eos_ids[0]] = 0.0
            scores[spent] = only_eos
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
        self.eos_ids = list(dict.fromkeys([*eos_ids, self.tokenizer.eos_token_id]))
        info = xgr.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=size, stop_token_ids=self.eos_ids
        )
        self.compiler = xgr.GrammarCompiler(info)
        self.exclusions = Exclusions.of(info, self.tokenizer, self.eos_ids)

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

    def constraint(self, requests: Sequence[ChatRequest], prompt_length: int) -> LogitsProcessor:
        grammars = [compact_json(self.compiler, r.schema) if r.schema else None for r in requests]
        budgets = [r.max_tokens for r in requests]
        return SchemaLogitsProcessor(
            grammars, budgets, prompt_length, self.eos_ids, self.exclusions
        )

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
        budgets = [r.max_tokens for r in requests]
        output = self.network.generate(
            **inputs,
            max_new_tokens=max(budgets) + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([self.constraint(requests, prompt_length)]),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        replies = []
        for row, generated in enumerate(output[:, prompt_length:].tolist()):
            ends = [i for i, token in enumerate(generated) if token in self.eos_ids]
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
