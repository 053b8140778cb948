"""The toy world (``annotate.toy.world``) as a data-engine source: scenes rendered on read, with
the generator's ground truth travelling beside each image for the oracle annotators."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import ClassVar

import pyarrow as pa

from annotate.source_base import Item, Source, SourceError, TooLarge
from annotate.toy.world import render, scenes
from annotate.toy.world import scene as toy_scene

TOY_INSTANCE_TYPE = pa.struct(
    [
        ("shape", pa.string()),
        ("colour", pa.string()),
        ("texture", pa.string()),
        ("box", pa.list_(pa.float32(), 4)),  # normalised xyxy
    ]
)


class ToySource(Source):
    """The toy world (``annotate.toy.world``) as an input: ``count`` scenes of the world named
    by ``seed``, rendered to PNG when read. Each item carries the generator's ground truth in
    ``toy_instances`` for the oracle annotator; the world's caption is its source caption.

    Named on the command line as ``toy:seed=7,count=2000`` (``size`` defaults to 64 px)."""

    extra_schema: ClassVar[pa.Schema] = pa.schema([("toy_instances", pa.list_(TOY_INSTANCE_TYPE))])

    def __init__(self, seed: int, count: int, size: int = 64, name: str = "toy"):
        if count < 1 or size < 16:
            raise SourceError(f"a toy world needs count >= 1 and size >= 16, not {count}/{size}")
        self.seed, self.count, self.size, self.name = seed, count, size, name

    @classmethod
    def parse(cls, spec: str, name: str | None = None) -> ToySource:
        fields = {"seed": 0, "count": 1000, "size": 64}
        for part in filter(None, spec.removeprefix("toy:").split(",")):
            key, _, value = part.partition("=")
            if key not in fields or not value.strip().isdigit():
                raise SourceError(f"toy source {spec!r}: expected seed=N,count=N[,size=N]")
            fields[key] = int(value)
        return cls(**fields, **({"name": name} if name else {}))

    def items(self) -> Iterator[Item]:
        for index, scene in enumerate(scenes(self.seed, self.count)):
            yield Item(
                uri=f"toy:seed={self.seed},size={self.size}/{index}",
                caption=scene.caption,
                extras={
                    "toy_instances": [
                        {"shape": i.shape, "colour": i.colour, "texture": i.texture, "box": i.box}
                        for i in scene.instances
                    ]
                },
            )

    def read(self, uri: str, max_bytes: int) -> bytes:
        index = int(uri.rsplit("/", 1)[1])
        buffer = io.BytesIO()
        render(toy_scene(self.seed, index), self.size).save(buffer, "PNG")
        if buffer.tell() > max_bytes:
            raise TooLarge(f"more than {max_bytes} bytes")
        return buffer.getvalue()

    def describe(self) -> dict:
        return {
            "kind": "toy",
            "name": self.name,
            "seed": self.seed,
            "count": self.count,
            "size": self.size,
        }
