"""The JSON schemas this project asks VLMs for: a bounded subset, and the token budget it gives.

Every reply has an upper bound in bytes, so a request's ``max_tokens`` can cover any valid
reply (a cut reply is a fault, ``length``, never a silently shorter caption). The subset: objects
whose properties are all required (written in the schema's order, no others), strings with
``maxLength`` (and optional ``minLength``, in characters) or an ``enum`` of strings, arrays with
``maxItems`` (and optional ``minItems``). Anything else is a ``ValueError`` naming what is not
supported. Decoding under a schema is xgrammar's (vLLM's engine on a GPU server, the in-process
client of ``annotate.vlm.in_process`` here), both writing compact JSON; pure Python, so HTTP
captioners size their budgets without torch.
"""

from __future__ import annotations

import json

TOKEN_SLACK = 16  # a server's grammar may allow whitespace that the compact bound leaves out
BYTES_PER_CHARACTER = 4  # UTF-8
OBJECT_KEYS = {"type", "properties", "required", "additionalProperties", "title", "description"}
STRING_KEYS = {"type", "minLength", "maxLength", "enum", "title", "description"}
ARRAY_KEYS = {"type", "items", "minItems", "maxItems", "title", "description"}


def token_budget(schema: dict) -> int:
    """Enough tokens for any reply under ``schema``: a token holds at least one byte."""
    return reply_bytes(schema) + TOKEN_SLACK


def reply_bytes(schema: dict, where: str = "$") -> int:
    """The most bytes a compact JSON reply under ``schema`` takes (``ValueError`` outside the
    subset)."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a schema must be an object")
    if "enum" in schema:
        return _enum(schema, where)
    kind = schema.get("type")
    if kind == "object":
        return _object(schema, where)
    if kind == "string":
        return _string(schema, where)
    if kind == "array":
        return _array(schema, where)
    raise ValueError(f"{where}: type {kind!r} is not supported (object, string, array)")


def _check_keys(schema: dict, allowed: set[str], where: str) -> None:
    extra = set(schema) - allowed
    if extra:
        raise ValueError(f"{where}: schema keywords {sorted(extra)} are not supported")


def _bounds(schema: dict, low_key: str, high_key: str, where: str) -> int:
    low, high = int(schema.get(low_key, 0)), int(schema[high_key])
    if not 0 <= low <= high:
        raise ValueError(f"{where}: {low_key} {low} / {high_key} {high}")
    return high


def _object(schema: dict, where: str) -> int:
    _check_keys(schema, OBJECT_KEYS, where)
    properties = schema.get("properties", {})
    if list(schema.get("required", [])) != list(properties):
        raise ValueError(f"{where}: every property must be required, in order")
    if schema.get("additionalProperties", False) is not False:
        raise ValueError(f"{where}: additionalProperties must be false")
    size = len("{}") + max(len(properties) - 1, 0)  # braces and commas
    for name, value in properties.items():
        size += len(json.dumps(name).encode()) + len(":") + reply_bytes(value, f"{where}.{name}")
    return size


def _string(schema: dict, where: str) -> int:
    _check_keys(schema, STRING_KEYS, where)
    if "maxLength" not in schema:
        raise ValueError(f"{where}: strings need maxLength (replies must be bounded)")
    return len('""') + BYTES_PER_CHARACTER * _bounds(schema, "minLength", "maxLength", where)


def _enum(schema: dict, where: str) -> int:
    _check_keys(schema, STRING_KEYS, where)
    values = schema["enum"]
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: enum must list strings")
    longest = 0
    for value in values:
        encoded = json.dumps(value, ensure_ascii=False)
        if encoded[1:-1] != value:
            raise ValueError(f"{where}: enum value {value!r} needs escapes")
        longest = max(longest, len(encoded.encode()))
    return longest


def _array(schema: dict, where: str) -> int:
    _check_keys(schema, ARRAY_KEYS, where)
    if "maxItems" not in schema or "items" not in schema:
        raise ValueError(f"{where}: arrays need items and maxItems (replies must be bounded)")
    high = _bounds(schema, "minItems", "maxItems", where)
    if not high:
        return len("[]")
    return len("[]") + (high - 1) + high * reply_bytes(schema["items"], f"{where}[0]")
