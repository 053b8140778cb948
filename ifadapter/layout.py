"""Layout types: what the user asks for, validated once at the edge.

Boxes are normalised ``(x0, y0, x1, y1)`` in [0, 1] so that one layout serves every resolution
and aspect ratio; the attention layers turn them into masks at their own grid size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Instance:
    """One instance to generate: where (``box``) and what it looks like (``caption``)."""

    box: tuple[float, float, float, float]
    caption: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", _check_box(self.box))
        object.__setattr__(self, "caption", _check_text(self.caption, "caption"))

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


@dataclass(frozen=True)
class Layout:
    """A global caption and any number of instances (zero means plain text-to-image)."""

    caption: str
    instances: list[Instance] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_text(self.caption, "layout caption", allow_empty=True)
        if isinstance(self.instances, (str, bytes)) or not isinstance(self.instances, Sequence):
            raise ValueError(
                f"layout instances must be a list of Instance, got {type(self.instances).__name__}"
            )
        checked = []
        for index, instance in enumerate(self.instances):
            try:
                checked.append(_as_instance(instance))
            except ValueError as error:
                raise ValueError(f"instance {index}: {error}") from None
        object.__setattr__(self, "instances", checked)

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        """Reads ``{"caption": ..., "instances": [{"box": [x0, y0, x1, y1], "caption": ...}]}``."""
        if not isinstance(data, dict) or "caption" not in data:
            raise ValueError("a layout must be an object with a 'caption' and an 'instances' list")
        return cls(caption=data["caption"], instances=list(data.get("instances", [])))

    def to_dict(self) -> dict:
        return {
            "caption": self.caption,
            "instances": [{"box": list(i.box), "caption": i.caption} for i in self.instances],
        }


def _as_instance(value: Instance | dict) -> Instance:
    if isinstance(value, Instance):
        return value
    if isinstance(value, dict) and set(value) >= {"box", "caption"}:
        return Instance(box=value["box"], caption=value["caption"])
    raise ValueError(f"expected an Instance or a dict with 'box' and 'caption', got {value!r}")


def _check_text(text: object, what: str, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text, got {type(text).__name__}")
    if not allow_empty and not text.strip():
        raise ValueError(f"{what} is empty")
    return text


def _check_box(box: object) -> tuple[float, float, float, float]:
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1), got {box!r}")
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1), got {box!r}") from None
    if any(math.isnan(v) or math.isinf(v) for v in values):
        raise ValueError(f"box {values} has a NaN or infinite coordinate")
    if any(v < 0.0 or v > 1.0 for v in values):
        raise ValueError(f"box {values} is outside [0, 1]; boxes are normalised to the image size")
    x0, y0, x1, y1 = values
    if x0 >= x1 or y0 >= y1:
        raise ValueError(f"box {values} is inverted or has zero area (needs x0 < x1 and y0 < y1)")
    return values


@dataclass
class LayoutTensors:
    """Layouts of one batch padded to the largest instance count.

    ``mask`` is False on padding slots; every consumer must treat those slots as absent.
    """

    boxes: torch.Tensor  # (B, N, 4) float
    mask: torch.Tensor  # (B, N) bool
    captions: list[list[str]]  # per layout, without padding

    @classmethod
    def from_layouts(cls, layouts: Sequence[Layout]) -> LayoutTensors:
        count = max((len(layout.instances) for layout in layouts), default=0)
        boxes = torch.zeros(len(layouts), count, 4)
        mask = torch.zeros(len(layouts), count, dtype=torch.bool)
        for row, layout in enumerate(layouts):
            for col, instance in enumerate(layout.instances):
                boxes[row, col] = torch.tensor(instance.box)
                mask[row, col] = True
        return cls(boxes, mask, [[i.caption for i in layout.instances] for layout in layouts])
