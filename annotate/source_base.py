"""What a source is: the interface every input source implements (``annotate.sources`` holds
the folder, COCO and URI-list sources and ``open_source``; ``annotate.toy.source`` the toy
world's), kept apart so that both import it without importing each other."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import fsspec
import pyarrow as pa


class SourceError(ValueError):
    """A source that cannot be listed (missing file, unknown format, no URI column)."""


class TooLarge(Exception):
    """An input with more bytes than the engine accepts."""


@dataclass(frozen=True)
class Item:
    uri: str
    caption: str | None = None
    extras: dict = field(default_factory=dict)


class Source(ABC):
    """Lists inputs and reads their bytes; must pickle (decode tasks call ``read`` on workers)."""

    name: str
    extra_schema: ClassVar[pa.Schema] = pa.schema([])

    @abstractmethod
    def items(self) -> Iterator[Item]:
        """Every input, in a deterministic order."""

    @abstractmethod
    def describe(self) -> dict:
        """What this source reads (kind, paths): the identity a rerun is checked against."""

    def read(self, uri: str, max_bytes: int) -> bytes:
        """The item's bytes through fsspec (local paths, ``file://``, ``s3://``, ``http://``...).

        Raises ``TooLarge`` past ``max_bytes`` without reading further, ``OSError`` and
        friends when the bytes cannot be had."""
        with fsspec.open(uri, "rb") as handle:
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLarge(f"more than {max_bytes} bytes")
        return data
