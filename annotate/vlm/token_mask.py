"""Which vocabulary tokens may come next under a JSON grammar (``annotate.vlm.json_grammar``).

The logits processor of ``annotate.vlm.in_process`` asks this for every row at every step, so
the vocabulary is sorted once by what a token can ever do, and each step costs little:

- tokens holding a control character or a backslash can never appear (the grammar generates
  compact JSON without escapes) and are never looked at again;
- inside a string, text tokens are allowed by a vectorised length check: "plain" ones (whole
  UTF-8 characters) and "partial" ones (whole characters, then the start of one more); tokens
  that close the string (text, a quote, then more) by the same check on the text before the
  quote, and a mask, computed once per string of the grammar, of the tokens whose rest the
  structure after that string accepts;
- only in the middle of a character are tokens (those that start with a continuation byte) fed
  through the grammar one by one; so are, outside strings, the tokens that start with a byte
  the structure asks for.

Masks of structural states (outside strings) repeat across rows and requests and are cached.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from annotate.vlm.json_grammar import (
    CONTINUATION,
    FIRST_CONTINUATION,
    STRING,
    Grammar,
    State,
    lead,
)

QUOTE = ord('"')
DEAD = {ord("\\"), 0x7F, *range(0x20)}


def partial_characters(data: bytes) -> int:
    """The characters of ``data`` when it is whole UTF-8 characters followed by the valid start
    of one more (counted), else 0."""
    for cut in (1, 2, 3):
        head, tail = data[:-cut], data[-cut:]
        started = lead(tail[0])
        if started is None or started[0] <= len(tail) - 1:
            continue
        low, high = FIRST_CONTINUATION.get(tail[0], CONTINUATION)
        if not all(
            (low if i == 0 else CONTINUATION[0]) <= b <= (high if i == 0 else CONTINUATION[1])
            for i, b in enumerate(tail[1:])
        ):
            continue
        try:
            return len(head.decode("utf-8")) + 1
        except UnicodeDecodeError:
            return 0
    return 0


class TokenMask:
    """The next-token masks of a byte-level BPE vocabulary (``None``: a special token). End of
    sequence tokens are allowed exactly when the reply is complete."""

    def __init__(self, token_bytes: list[bytes | None], eos_ids: Iterable[int]):
        self.token_bytes = token_bytes
        self.size = len(token_bytes)
        self.eos_ids = sorted(set(eos_ids))
        plain = torch.zeros(self.size, dtype=torch.long)
        partial = torch.zeros(self.size, dtype=torch.long)
        closers: list[int] = []  # tokens with whole characters, a quote, then anything
        before_quote: list[int] = []  # their characters before the quote
        self.continuing: list[int] = []
        self.by_first_byte: dict[int, list[int]] = {}
        for index, data in enumerate(token_bytes):
            if not data or DEAD.intersection(data):
                continue
            self.by_first_byte.setdefault(data[0], []).append(index)
            if CONTINUATION[0] <= data[0] <= CONTINUATION[1]:
                self.continuing.append(index)
            if QUOTE in data:
                try:
                    before_quote.append(len(data[: data.index(QUOTE)].decode("utf-8")))
                    closers.append(index)
                except UnicodeDecodeError:
                    pass  # a quote inside a character: never valid in a string
                continue
            try:
                plain[index] = len(data.decode("utf-8"))
            except UnicodeDecodeError:
                partial[index] = partial_characters(data)
        self.plain_length, self.partial_length = plain, partial
        self.plain, self.partial = plain > 0, partial > 0
        self.closers = torch.tensor(closers, dtype=torch.long)
        self.before_quote = torch.tensor(before_quote, dtype=torch.long)
        self.cache: dict[tuple[str, State], torch.Tensor] = {}
        self.closing: dict[tuple[str, int], torch.Tensor] = {}

    def closes(self, grammar: Grammar, pc: int) -> torch.Tensor:
        """Over ``self.closers``: whose bytes after the quote the structure accepts once the
        string at ``pc`` ends (its closing quote is the instruction after it)."""
        key = (grammar.key, pc)
        if key not in self.closing:
            after = grammar.step(grammar.closure([(pc + 1, 0, 0, 0, 0)]), QUOTE)
            rests = [self.token_bytes[i] for i in self.closers.tolist()]
            self.closing[key] = torch.tensor(
                [bool(grammar.feed(after, rest[rest.index(QUOTE) + 1 :])) for rest in rests],
                dtype=torch.bool,
            )
        return self.closing[key]

    def allowed(self, grammar: Grammar, state: State) -> torch.Tensor:
        """A boolean mask over the vocabulary (``self.size``)."""
        cached = self.cache.get((grammar.key, state))
        if cached is not None:
            return cached
        mask = torch.zeros(self.size, dtype=torch.bool)
        room = grammar.string_room(state)
        if room:
            mask |= self.plain & (self.plain_length <= room)
            mask |= self.partial & (self.partial_length <= room)
        for pc, count, due, _, _ in state:
            op = grammar.program[pc]
            if op[0] == STRING and not due:
                characters = count + self.before_quote
                fits = self.closes(grammar, pc) & (characters >= op[1]) & (characters <= op[2])
                mask[self.closers[fits]] = True
        in_string = grammar.in_string(state)
        candidates: list[int] = list(self.continuing) if grammar.mid_character(state) else []
        for byte in grammar.next_bytes(state, closing=False):
            candidates += self.by_first_byte.get(byte, [])
        fed = [i for i in candidates if grammar.feed(state, self.token_bytes[i])]
        mask[fed] = True
        if grammar.accepts(state):
            mask[self.eos_ids] = True
        if not in_string:  # string states rarely repeat: cache the structure
            self.cache[grammar.key, state] = mask
        return mask
