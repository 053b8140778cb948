"""YAML profiles: one file with a section per stage (``annotate:``, ``train:``, ``evaluate:``).

Each stage reads and validates its own section only, so the sections load independently. Every
fault is a ``ConfigError`` whose message is one line naming the file and, for a value that does
not validate, each faulty field under its section (``train.max_steps: ...``): the console
script prints it and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A profile that cannot be used; the message is one line naming the file and the fields."""


def read_profile(path: str | Path) -> dict[str, Any]:
    """The profile at ``path`` as a mapping of sections; ``ConfigError`` when the file is
    missing, is not YAML or is not a mapping. An empty file is a profile without sections."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not YAML: {_yaml_fault(error)}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config {path} is not a YAML mapping of sections")
    return document


def _yaml_fault(error: yaml.YAMLError) -> str:
    """The parser's complaint and where (one line), e.g. "expected ',' or ']' (line 2, column
    1)"."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def sections(profile: dict[str, Any]) -> set[str]:
    """The names of the sections a profile has (keys whose value is a mapping)."""
    return {name for name, value in profile.items() if isinstance(value, dict)}


def profile_section(path: str | Path, section: str) -> dict[str, Any]:
    """The ``section:`` mapping of the profile at ``path``; ``ConfigError`` without one."""
    profile = read_profile(path)
    if section not in sections(profile):
        raise ConfigError(f"config {path} has no '{section}:' section")
    return profile[section]


def one_line(error: ValidationError, section: str | None = None) -> str:
    """A validation error as one line naming each faulty field (under ``section``, when the
    model is a profile section)."""
    faults = []
    for fault in error.errors():
        where = ".".join(str(part) for part in ([section] if section else []) + list(fault["loc"]))
        message = str(fault["msg"]).removeprefix("Value error, ")
        faults.append(f"{where}: {message}" if where else message)
    return "; ".join(faults)


def parse_section(model: type[M], section: str, data: dict, origin: str = "config") -> M:
    """``data`` (a profile's ``section:``) validated as ``model``; ``ConfigError`` in one line
    that starts with ``origin`` (the file)."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {one_line(error, section)}") from None


def load_section(model: type[M], section: str, path: str | Path, **overrides: Any) -> M:
    """The ``section:`` of the profile at ``path`` as ``model``; ``overrides`` that are not None
    replace the section's keys (command-line options). ``ConfigError`` (one line) when the file
    is missing, is not YAML, lacks the section or does not validate."""
    data = profile_section(path, section)
    data = {**data, **{key: value for key, value in overrides.items() if value is not None}}
    return parse_section(model, section, data, str(path))
