"""JSON-schema-constrained decoding for in-process generation, over bytes.

vLLM enforces ``structured_outputs`` on its server (xgrammar); a model run in-process with
transformers has no such engine, so this module gives it the same guarantee for the schemas this
project sends. A schema compiles to a small byte-level program (a Thompson machine: threads move
through it in lock step); ``annotate.vlm.token_mask`` turns the program's state into the set of
vocabulary tokens that keep the output a valid prefix, so a logits processor can forbid the
rest. Random weights then still produce JSON that parses and validates, and a real model cannot
wander off. Pure Python: HTTP captioners size their token budgets with it without torch.

The subset: objects whose properties are all required (written in the schema's order), strings
with ``maxLength`` (and optional ``minLength``, both in characters) or an ``enum`` of strings,
arrays with ``maxItems`` (and optional ``minItems``). The output is compact JSON in UTF-8;
string contents never hold quotes, backslashes or control characters (no escapes are generated).
Every bound is finite, so ``max_bytes`` bounds the reply and the token budget. Anything else is
a ``ValueError`` naming what is not supported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

# A thread: (program counter, characters in the current string, continuation bytes still due,
# the low and high bound of the next continuation byte). Only string threads use the last four.
Thread = tuple[int, int, int, int, int]
State = frozenset[Thread]

BYTE, STRING, SPLIT, JUMP, MATCH = "byte", "string", "split", "jump", "match"
FORBIDDEN_IN_STRING = {ord('"'), ord("\\"), *range(0x20), 0x7F}
CONTINUATION = (0x80, 0xBF)
# First continuation byte after special lead bytes (no overlongs, no surrogates, <= U+10FFFF).
FIRST_CONTINUATION = {
    0xE0: (0xA0, 0xBF),
    0xED: (0x80, 0x9F),
    0xF0: (0x90, 0xBF),
    0xF4: (0x80, 0x8F),
}
TOKEN_SLACK = 16  # a server's grammar may allow whitespace that the compact bound leaves out
OBJECT_KEYS = {"type", "properties", "required", "additionalProperties", "title", "description"}
STRING_KEYS = {"type", "minLength", "maxLength", "enum", "title", "description"}
ARRAY_KEYS = {"type", "items", "minItems", "maxItems", "title", "description"}


def lead(byte: int) -> tuple[int, tuple[int, int]] | None:
    """Continuation bytes due after a UTF-8 lead byte, and the range of the first one."""
    if 0xC2 <= byte <= 0xDF:
        return 1, CONTINUATION
    if 0xE0 <= byte <= 0xEF:
        return 2, FIRST_CONTINUATION.get(byte, CONTINUATION)
    if 0xF0 <= byte <= 0xF4:
        return 3, FIRST_CONTINUATION.get(byte, CONTINUATION)
    return None


@dataclass
class Grammar:
    """A compiled schema: ``start`` is the state before any output; ``feed`` advances a state
    over bytes (an empty state means the bytes cannot be part of a valid reply)."""

    program: list[tuple]
    max_bytes: int
    key: str  # the schema as canonical JSON: names the grammar in caches
    start: State = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.closure([(0, 0, 0, 0, 0)])

    @classmethod
    def from_schema(cls, schema: dict) -> Grammar:
        compiler = _Compiler()
        compiler.value(schema, "$")
        compiler.emit(MATCH)
        return cls(compiler.program, compiler.max_bytes, json.dumps(schema, sort_keys=True))

    def closure(self, threads: Iterable[Thread]) -> State:
        """The threads plus everything they reach without reading a byte."""
        done: set[Thread] = set()
        stack = list(threads)
        while stack:
            thread = stack.pop()
            if thread in done:
                continue
            done.add(thread)
            pc, count, due = thread[0], thread[1], thread[2]
            op = self.program[pc]
            if op[0] == SPLIT:
                stack += [(op[1], 0, 0, 0, 0), (op[2], 0, 0, 0, 0)]
            elif op[0] == JUMP:
                stack.append((op[1], 0, 0, 0, 0))
            elif op[0] == STRING and due == 0 and count >= op[1]:
                stack.append((pc + 1, 0, 0, 0, 0))
        return frozenset(t for t in done if self.program[t[0]][0] in (BYTE, STRING, MATCH))

    def step(self, state: State, byte: int) -> State:
        moved: list[Thread] = []
        for pc, count, due, low, high in state:
            op = self.program[pc]
            if op[0] == BYTE:
                if op[1] == byte:
                    moved.append((pc + 1, 0, 0, 0, 0))
            elif op[0] == STRING:
                if due:
                    if low <= byte <= high:
                        moved.append((pc, count, due - 1, *CONTINUATION))
                elif count < op[2]:
                    if byte < 0x80:
                        if byte not in FORBIDDEN_IN_STRING:
                            moved.append((pc, count + 1, 0, 0, 0))
                    elif (lead_bytes := lead(byte)) is not None:
                        moved.append((pc, count + 1, lead_bytes[0], *lead_bytes[1]))
        return self.closure(moved) if moved else frozenset()

    def feed(self, state: State, data: bytes) -> State:
        for byte in data:
            state = self.step(state, byte)
            if not state:
                break
        return state

    def accepts(self, state: State) -> bool:
        return any(self.program[t[0]][0] == MATCH for t in state)

    def string_room(self, state: State) -> int:
        """The most characters a string being written may still take (0 outside strings or in
        the middle of a character)."""
        return max(
            (
                self.program[pc][2] - count
                for pc, count, due, _, _ in state
                if self.program[pc][0] == STRING and due == 0
            ),
            default=0,
        )

    def next_bytes(self, state: State, closing: bool = True) -> set[int]:
        """The literal bytes the structure allows next (string contents aside); without the
        quotes that would close a string being written when ``closing`` is false."""
        return {
            self.program[pc][1]
            for pc, *_ in state
            if self.program[pc][0] == BYTE
            and (closing or pc == 0 or self.program[pc - 1][0] != STRING)
        }

    def mid_character(self, state: State) -> bool:
        """Whether a string thread waits for the continuation bytes of a character."""
        return any(self.program[t[0]][0] == STRING and t[2] for t in state)

    def in_string(self, state: State) -> bool:
        return any(self.program[t[0]][0] == STRING for t in state)


def token_budget(schema: dict) -> int:
    """Enough tokens for any reply under ``schema``: a token holds at least one byte."""
    return Grammar.from_schema(schema).max_bytes + TOKEN_SLACK


class _Compiler:
    def __init__(self) -> None:
        self.program: list[tuple] = []
        self.max_bytes = 0

    def emit(self, *op) -> int:
        self.program.append(op)
        return len(self.program) - 1

    def patch(self, index: int, *op) -> None:
        self.program[index] = op

    def literal(self, text: str) -> None:
        data = text.encode()
        self.max_bytes += len(data)
        for byte in data:
            self.emit(BYTE, byte)

    def value(self, schema: dict, where: str) -> None:
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a schema must be an object")
        if "enum" in schema:
            self.enum(schema, where)
        elif schema.get("type") == "object":
            self.object(schema, where)
        elif schema.get("type") == "string":
            self.string(schema, where)
        elif schema.get("type") == "array":
            self.array(schema, where)
        else:
            raise ValueError(
                f"{where}: type {schema.get('type')!r} is not supported (object, string, array)"
            )

    def check_keys(self, schema: dict, allowed: set[str], where: str) -> None:
        extra = set(schema) - allowed
        if extra:
            raise ValueError(f"{where}: schema keywords {sorted(extra)} are not supported")

    def object(self, schema: dict, where: str) -> None:
        self.check_keys(schema, OBJECT_KEYS, where)
        properties = schema.get("properties", {})
        if list(schema.get("required", [])) != list(properties):
            raise ValueError(f"{where}: every property must be required, in order")
        if schema.get("additionalProperties", False) is not False:
            raise ValueError(f"{where}: additionalProperties must be false")
        self.literal("{")
        for index, (name, value) in enumerate(properties.items()):
            self.literal(("," if index else "") + json.dumps(name) + ":")
            self.value(value, f"{where}.{name}")
        self.literal("}")

    def string(self, schema: dict, where: str) -> None:
        self.check_keys(schema, STRING_KEYS, where)
        if "maxLength" not in schema:
            raise ValueError(f"{where}: strings need maxLength (replies must be bounded)")
        low, high = int(schema.get("minLength", 0)), int(schema["maxLength"])
        if not 0 <= low <= high:
            raise ValueError(f"{where}: minLength {low} / maxLength {high}")
        self.literal('"')
        self.emit(STRING, low, high)
        self.max_bytes += 4 * high
        self.literal('"')

    def enum(self, schema: dict, where: str) -> None:
        self.check_keys(schema, STRING_KEYS, where)
        values = schema["enum"]
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}: enum must list strings")
        jumps, longest, before = [], 0, self.max_bytes
        for index, value in enumerate(values):
            encoded = json.dumps(value, ensure_ascii=False)
            if encoded[1:-1] != value:
                raise ValueError(f"{where}: enum value {value!r} needs escapes")
            split = self.emit(SPLIT, 0, 0) if index < len(values) - 1 else None
            self.max_bytes = before
            self.literal(encoded)
            longest = max(longest, self.max_bytes - before)
            jumps.append(self.emit(JUMP, 0))
            if split is not None:
                self.patch(split, SPLIT, split + 1, len(self.program))
        for jump in jumps:
            self.patch(jump, JUMP, len(self.program))
        self.max_bytes = before + longest

    def array(self, schema: dict, where: str) -> None:
        self.check_keys(schema, ARRAY_KEYS, where)
        if "maxItems" not in schema or "items" not in schema:
            raise ValueError(f"{where}: arrays need items and maxItems (replies must be bounded)")
        low, high = int(schema.get("minItems", 0)), int(schema["maxItems"])
        if not 0 <= low <= high:
            raise ValueError(f"{where}: minItems {low} / maxItems {high}")
        self.literal("[")
        splits = []
        for index in range(high):
            if index >= low:
                splits.append(self.emit(SPLIT, 0, 0))
            if index:
                self.literal(",")
            self.value(schema["items"], f"{where}[{index}]")
        for split in splits:
            self.patch(split, SPLIT, split + 1, len(self.program))
        self.literal("]")
