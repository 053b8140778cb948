"""Which vocabulary tokens may come next under a JSON grammar (``annotate.json_grammar``).

The logits processor of ``annotate.vlm_transformers`` asks this for every row at every step, so
the work is split by what is cheap: most tokens are plain text, allowed inside a string by one
vectorised length check; only the few others, and the tokens that start with a byte the JSON
structure asks for, are fed through the grammar one by one. Masks of structural states (outside
strings) repeat across rows and requests and are cached.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from annotate.json_grammar import FORBIDDEN_IN_STRING, Grammar, State


class TokenMask:
    """Which tokens of a byte-level BPE vocabulary may come next, given a grammar state.

    Tokens are sorted once: "plain" ones (complete UTF-8 characters, nothing a JSON string may
    not hold) are allowed inside a string by a vectorised length check; the others, and every
    token that starts with a byte the structure asks for, are checked by feeding their bytes.
    End-of-sequence tokens are allowed exactly when the reply is complete."""

    def __init__(self, token_bytes: list[bytes | None], eos_ids: Iterable[int]):
        self.token_bytes = token_bytes
        self.size = len(token_bytes)
        self.eos_ids = sorted(set(eos_ids))
        plain_length = torch.zeros(self.size, dtype=torch.long)
        self.others: list[int] = []
        self.by_first_byte: dict[int, list[int]] = {}
        for index, data in enumerate(token_bytes):
            if not data:
                continue
            self.by_first_byte.setdefault(data[0], []).append(index)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None and not any(ord(c) in FORBIDDEN_IN_STRING for c in text):
                plain_length[index] = len(text)
            else:
                self.others.append(index)
        self.plain_length = plain_length
        self.plain = plain_length > 0
        self.cache: dict[tuple[str, State], torch.Tensor] = {}

    def allowed(self, grammar: Grammar, state: State) -> torch.Tensor:
        """A boolean mask over the vocabulary (``self.size``)."""
        cached = self.cache.get((grammar.key, state))
        if cached is not None:
            return cached
        mask = torch.zeros(self.size, dtype=torch.bool)
        room = grammar.string_room(state)
        if room:
            mask |= self.plain & (self.plain_length <= room)
        candidates: list[int] = list(self.others) if grammar.in_string(state) else []
        for byte in grammar.next_bytes(state):
            candidates += self.by_first_byte.get(byte, [])
        for index in candidates:
            if not mask[index] and grammar.feed(state, self.token_bytes[index]):
                mask[index] = True
        if grammar.accepts(state):
            mask[self.eos_ids] = True
        if not grammar.in_string(state):  # string states rarely repeat: cache the structure
            self.cache[grammar.key, state] = mask
        return mask
