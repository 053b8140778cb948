"""Constrained decoding before and after: the hand-written JSON-grammar masks against xgrammar.

Both decoders run in one process, interleaved over ``--rounds`` so that machine noise hits them
alike (median of the rounds reported), each through its own logits processor:

- ``mask``: the cost of masking one row of logits, over one token path (a valid reply under the
  caption schema, from greedy choices on random logits) that both decoders walk, on the tiny
  Qwen2-VL's 1,024-token byte-level BPE and on a synthetic byte-level vocabulary of Qwen2's size
  (151,643 tokens: bytes, letter n-grams with and without a leading space, CJK characters and
  their partial bytes, digits, JSON punctuation, whitespace); also whether the two allow the
  same tokens at every step, the first walk under the schema from cold (xgrammar compiles the
  schema for the vocabulary, the hand-written masks fill their caches), and what building each
  decoder for the vocabulary costs;
- ``generate``: the tiny Qwen2-VL answering ``--requests`` caption and yes/no requests in one
  batch in process with each decoder: seconds, completion tokens/s, and whether the replies are
  identical.

The hand-written decoder is no longer in the tree; it is read from git (``--baseline``, by
default the commit before the one that removed ``annotate/vlm/token_mask.py``), so this needs
the repository's history.

    python -m benchmarks.constrained_decoding [--rounds 3] [--requests 8] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
import types
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import xgrammar as xgr
from PIL import Image

from annotate.captioners.requests import CaptionSettings, reply_schema
from annotate.tiny.vlm import write_tiny_vlm
from annotate.vlm.bounded_schema import token_budget
from annotate.vlm.client import ChatRequest, encode_image
from annotate.vlm.in_process import (
    Exclusions,
    SchemaLogitsProcessor,
    TransformersChatClient,
    compact_json,
)
from annotate.vlm.judge import ANSWER_SCHEMA

REPO = Path(__file__).resolve().parents[1]
HAND_WRITTEN = {  # module -> its path in the baseline commit
    "json_grammar": "annotate/vlm/json_grammar.py",
    "token_mask": "annotate/vlm/token_mask.py",
    "in_process": "annotate/vlm/in_process.py",
}
QWEN2_VOCABULARY = 151_643  # Qwen2's byte-level BPE, without its added tokens


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout


def baseline_commit() -> str:
    """The last commit that has the hand-written token masks."""
    path = HAND_WRITTEN["token_mask"]
    last = git("rev-list", "-n", "1", "HEAD", "--", path).strip()
    present = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{last}:{path}"], capture_output=True
    )
    return last if present.returncode == 0 else f"{last}^"


def load_hand_written(commit: str, folder: Path) -> types.SimpleNamespace:
    """The baseline's modules as the package ``hand_written`` (their imports of each other
    pointed there)."""
    package = folder / "hand_written"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, path in HAND_WRITTEN.items():
        source = git("show", f"{commit}:{path}")
        for other, other_path in HAND_WRITTEN.items():
            module = other_path.removesuffix(".py").replace("/", ".")
            source = source.replace(f"from {module} import", f"from hand_written.{other} import")
        (package / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    from hand_written import in_process, json_grammar, token_mask

    return types.SimpleNamespace(
        Grammar=json_grammar.Grammar,
        TokenMask=token_mask.TokenMask,
        Processor=in_process.SchemaLogitsProcessor,
        token_bytes=in_process.token_bytes,
    )


def synthetic_vocabulary(size: int) -> list[bytes]:
    """Distinct byte strings, shaped like a byte-level BPE vocabulary (deterministic)."""
    seen: dict[bytes, None] = {bytes([b]): None for b in range(256)}

    def add(text: str | bytes) -> None:
        seen.setdefault(text if isinstance(text, bytes) else text.encode(), None)

    for text in ['{"', '":"', '","', '"}', '"},{"', '"}]', '"}]}', ' "', '",', '":', '[{"', '"]']:
        add(text)
    for text in ["\n", "\n\n", " \n", ".\n", ".\n\n", "\t", "\t\t", "  ", "    ", "\r\n"]:
        add(text)
    for number in range(1000):
        add(str(number))
    for code in range(0xC0, 0x180):  # accented Latin letters, two bytes each
        add(chr(code))
        add(" " + chr(code))
    for code in range(0x4E00, 0xA000):  # CJK characters, three bytes each
        add(chr(code))
    for lead, second in itertools.product(range(0xE4, 0xEA), range(0x80, 0xC0)):
        add(bytes([lead, second]))  # the start of a CJK character: a partial token
    letters = string.ascii_lowercase
    for length in (2, 3, 4):
        for chars in itertools.product(letters, repeat=length):
            word = "".join(chars)
            for form in (word, " " + word, word.capitalize(), " " + word.capitalize()):
                add(form)
                if len(seen) >= size:
                    return list(seen)[:size]
    return list(seen)[:size]


class Decoders:
    """Both decoders built for one vocabulary (``None``: a special token; ``eos`` ends)."""

    def __init__(self, old, table: list[bytes | None], eos: int, info, tokenizer):
        started = time.perf_counter()
        self.old_mask = old.TokenMask(table, [eos])
        self.old_build_s = time.perf_counter() - started
        started = time.perf_counter()
        self.compiler = xgr.GrammarCompiler(info)
        self.exclusions = Exclusions.of(info, tokenizer, [eos])
        self.new_build_s = time.perf_counter() - started
        self.old, self.eos, self.size = old, eos, len(table)

    def clear(self) -> None:
        """Back to cold: no mask or compiled schema kept from an earlier walk."""
        self.old_mask.cache.clear()
        self.old_mask.closing.clear()
        self.compiler.clear_cache()

    def processor(self, which: str, schema: dict, budget: int, prompt: int):
        if which == "hand-written":
            return self.old.Processor(
                self.old_mask, [self.old.Grammar.from_schema(schema)], [budget], prompt
            )
        grammar = compact_json(self.compiler, schema)
        return SchemaLogitsProcessor([grammar], [budget], prompt, [self.eos], self.exclusions)


def token_path(decoders: Decoders, schema: dict, budget: int, seed: int = 0) -> list[torch.Tensor]:
    """Random logits per step and the token greedy decoding takes under the schema."""
    generator = torch.Generator().manual_seed(seed)
    processor = decoders.processor("xgrammar", schema, budget, 1)
    ids, steps = [0], []
    while True:
        logits = torch.randn(1, decoders.size, generator=generator)
        token = int(processor(torch.tensor([ids]), logits.clone()).argmax())
        steps.append(logits)
        if token == decoders.eos:
            return steps
        ids.append(token)


def walk(decoders: Decoders, which: str, schema: dict, budget: int, steps) -> tuple[float, list]:
    """Seconds per step over the path, and the allowed tokens at each step."""
    processor = decoders.processor(which, schema, budget, 1)
    ids, allowed, spent = [0], [], 0.0
    for logits in steps:
        scores = logits.clone()
        started = time.perf_counter()
        scores = processor(torch.tensor([ids]), scores)
        spent += time.perf_counter() - started
        finite = torch.isfinite(scores[0])
        allowed.append(finite)
        ids.append(int(torch.where(finite, scores[0], float("-inf")).argmax()))
    return spent / len(steps), allowed


def mask_figures(decoders: Decoders, schema: dict, rounds: int) -> dict:
    budget = token_budget(schema)
    steps = token_path(decoders, schema, budget)
    per_step: dict[str, list[float]] = {"hand-written": [], "xgrammar": []}
    cold: dict[str, list[float]] = {"hand-written": [], "xgrammar": []}
    masks = {}
    for _ in range(rounds):
        for which in per_step:  # cold: the schema compiled, the masks' caches filled
            decoders.clear()
            started = time.perf_counter()
            walk(decoders, which, schema, budget, steps)
            cold[which].append(time.perf_counter() - started)
        for which in per_step:  # warm, as for every later request under the same schema
            seconds, masks[which] = walk(decoders, which, schema, budget, steps)
            per_step[which].append(seconds)
    same = all(
        torch.equal(a, b) for a, b in zip(masks["hand-written"], masks["xgrammar"], strict=True)
    )
    return {
        "steps": len(steps),
        "same_masks": same,
        "build_s": {"hand-written": decoders.old_build_s, "xgrammar": decoders.new_build_s},
        "ms_per_step": {k: 1000 * statistics.median(v) for k, v in per_step.items()},
        "first_walk_s": {k: statistics.median(v) for k, v in cold.items()},
    }


class HandWrittenClient(TransformersChatClient):
    """The in-process client with the baseline's logits processor."""

    def __init__(self, old, *args, **kwargs):
        super().__init__(*args, **kwargs)
        size = self.network.get_output_embeddings().weight.shape[0]
        self.old = old
        self.old_mask = old.TokenMask(old.token_bytes(self.tokenizer, size), self.eos_ids)

    def constraint(self, requests, prompt_length):
        grammars = [self.old.Grammar.from_schema(r.schema) if r.schema else None for r in requests]
        budgets = [r.max_tokens for r in requests]
        return self.old.Processor(self.old_mask, grammars, budgets, prompt_length)


def generation_requests(count: int) -> list[ChatRequest]:
    settings = CaptionSettings(max_caption_chars=48, max_instance_chars=32)
    requests = []
    for index in range(count):
        image = encode_image(Image.new("RGB", (80, 60), (40 * index % 255, 90, 200)))
        if index % 2:
            budget = token_budget(ANSWER_SCHEMA)
            requests.append(ChatRequest("A red ball?", (image,), None, ANSWER_SCHEMA, budget))
        else:
            schema = reply_schema(True, 2, settings)
            requests.append(
                ChatRequest("Describe.", (image, image), "Be dense.", schema, token_budget(schema))
            )
    return requests


def generate_figures(clients: dict, count: int, rounds: int) -> dict:
    requests = generation_requests(count)
    for client in clients.values():  # warm-up: first calls compile and allocate
        client.chat(requests[:2])
    seconds: dict[str, list[float]] = {name: [] for name in clients}
    replies = {}
    for _ in range(rounds):
        for name, client in clients.items():
            started = time.perf_counter()
            replies[name] = client.chat(requests)
            seconds[name].append(time.perf_counter() - started)
    tokens = {name: sum(r.completion_tokens for r in got) for name, got in replies.items()}
    texts = [[r.text for r in got] for got in replies.values()]
    return {
        "requests": count,
        "completion_tokens": tokens,
        "same_replies": all(t == texts[0] for t in texts),
        "s": {name: statistics.median(v) for name, v in seconds.items()},
        "tokens_per_s": {name: tokens[name] / statistics.median(v) for name, v in seconds.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8, help="one batch, in process")
    parser.add_argument("--baseline", help="commit with the hand-written decoder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    baseline = args.baseline or baseline_commit()
    schema = reply_schema(True, 2, CaptionSettings())  # 400 + 2 x 200 characters
    figures: dict = {"baseline": git("rev-parse", "--short", baseline).strip()}
    with tempfile.TemporaryDirectory() as tmp:
        old = load_hand_written(baseline, Path(tmp))
        model = write_tiny_vlm(Path(tmp) / "qwen2-vl", "qwen2_vl")
        new = TransformersChatClient(str(model), max_batch=args.requests)
        hand = HandWrittenClient(old, str(model), max_batch=args.requests)
        size = new.exclusions.always.numel()
        tiny = Decoders(
            old,
            old.token_bytes(new.tokenizer, size),
            new.eos_ids[0],
            xgr.TokenizerInfo.from_huggingface(
                new.tokenizer, vocab_size=size, stop_token_ids=[new.eos_ids[0]]
            ),
            new.tokenizer,
        )
        figures["mask, tiny Qwen2-VL vocabulary (1,024)"] = mask_figures(tiny, schema, args.rounds)
        vocabulary = synthetic_vocabulary(QWEN2_VOCABULARY)
        eos = len(vocabulary)
        large = Decoders(
            old,
            [*vocabulary, None],
            eos,
            xgr.TokenizerInfo([*vocabulary, b"<|im_end|>"], stop_token_ids=[eos]),
            types.SimpleNamespace(added_tokens_decoder={eos: None}),
        )
        figures[f"mask, synthetic vocabulary ({eos:,})"] = mask_figures(large, schema, args.rounds)
        figures["generate, tiny Qwen2-VL"] = generate_figures(
            {"hand-written": hand, "xgrammar": new}, args.requests, args.rounds
        )
    print(
        f"Constrained decoding, hand-written (git {figures['baseline']}) against xgrammar "
        f"{version('xgrammar')}; {args.threads} torch thread(s), median of {args.rounds} rounds"
    )
    print("| measurement | hand-written | xgrammar | before/after | same output |")
    print("|---|---|---|---|---|")
    for name, f in figures.items():
        if name.startswith("mask"):
            old_ms, new_ms = f["ms_per_step"]["hand-written"], f["ms_per_step"]["xgrammar"]
            print(
                f"| {name}: ms per step ({f['steps']} steps) | {old_ms:.3f} | {new_ms:.3f} | "
                f"{old_ms / new_ms:.1f}x | {'masks equal' if f['same_masks'] else 'MASKS DIFFER'} |"
            )
            old_s, new_s = f["first_walk_s"]["hand-written"], f["first_walk_s"]["xgrammar"]
            print(
                f"| {name}: s for the first reply under the schema (compiled, cold caches) | "
                f"{old_s:.2f} | {new_s:.2f} | {old_s / new_s:.2f}x | |"
            )
            old_s, new_s = f["build_s"]["hand-written"], f["build_s"]["xgrammar"]
            print(
                f"| {name}: s to build for the vocabulary | {old_s:.2f} | {new_s:.2f} | "
                f"{old_s / new_s:.1f}x | |"
            )
        elif name.startswith("generate"):
            old_s, new_s = f["s"]["hand-written"], f["s"]["xgrammar"]
            same = "replies equal" if f["same_replies"] else "REPLIES DIFFER"
            print(
                f"| {name}: s for {f['requests']} requests "
                f"({f['completion_tokens']['xgrammar']} tokens) | {old_s:.2f} | {new_s:.2f} | "
                f"{old_s / new_s:.1f}x | {same} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **figures}))


if __name__ == "__main__":
    main()
