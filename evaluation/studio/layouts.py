"""Layouts in the studio: the canvas's pixel boxes, files to load and save, and the notes a
user reads when part of a layout cannot be used.

A bad box or instance never rejects the rest: it is left out (or clipped) with one note naming
it, and everything else goes on. Boxes come back from the canvas as whole pixels; a box that
was loaded from a file and not moved keeps its exact coordinates, so that a loaded layout
generates what ``ifadapter generate`` makes of the same file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from ifadapter.layout import Instance, Layout
from ifadapter.layout_files import json_records

# The released inference code (WUyinwei-hah/IFAdapter infer.py) divides the pixel boxes of its
# dataset/*.json files by its --resolution, 768 by default.
RELEASED_CANVAS = 768
CANVAS_SIDE = 512  # the longer side of a blank canvas on the page, in pixels
MATCH_PIXELS = 1  # a canvas box within this of a loaded box is that box, unmoved


@dataclass
class Checked:
    """A usable layout and one note per box or instance that was left out or changed."""

    layout: Layout
    notes: list[str] = field(default_factory=list)


@dataclass
class Loaded:
    """The layouts of a file and the notes on what in it could not be used."""

    layouts: list[Layout]
    notes: list[str] = field(default_factory=list)


def canvas_size(width: int, height: int, side: int = CANVAS_SIDE) -> tuple[int, int]:
    """A blank canvas of the image's aspect ratio whose longer side is ``side``: drawing on a
    64-pixel toy image at its own size would be drawing on a stamp."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_canvas(layout: Layout, size: tuple[int, int]) -> list[dict]:
    """The layout's instances as the canvas's boxes: whole pixels, labelled by description."""
    width, height = size
    return [
        {
            "xmin": round(x0 * width),
            "ymin": round(y0 * height),
            "xmax": round(x1 * width),
            "ymax": round(y1 * height),
            "label": instance.caption,
        }
        for instance in layout.instances
        for x0, y0, x1, y1 in [instance.box]
    ]


def from_canvas(
    caption: str, boxes: Sequence[dict], size: tuple[int, int], loaded: Layout | None = None
) -> Checked:
    """The layout the canvas shows. ``loaded`` is the layout last put on the canvas: its
    instances whose boxes were not moved keep their exact coordinates and their order; new
    boxes follow in the order they were drawn (the canvas lists the newest first)."""
    width, height = size
    notes: list[str] = []
    placed: list[tuple[int, Instance]] = []
    known = list(loaded.instances) if loaded else []
    drawn = list(reversed(boxes))  # oldest first
    for number, box in enumerate(drawn, start=1):
        label = str(box.get("label") or "").strip()
        name = f"box {number}" + (f" ({label})" if label else "")
        try:
            pixels = [float(box[key]) for key in ("xmin", "ymin", "xmax", "ymax")]
        except (KeyError, TypeError, ValueError):
            notes.append(f"{name}: not a box ({box!r}); left out")
            continue
        if not label:
            notes.append(f"{name}: no description; left out (double-click the box to describe it)")
            continue
        clipped = clip(pixels, width, height)
        if clipped is None:
            notes.append(f"{name}: outside the canvas or of zero size; left out")
            continue
        if clipped != pixels:
            notes.append(f"{name}: reached past the edge of the canvas; clipped to it")
        match = _unmoved(clipped, label, known, size)
        if match is not None:
            placed.append((known.index(match), match))
            continue
        x0, y0, x1, y1 = clipped
        box_01 = (x0 / width, y0 / height, x1 / width, y1 / height)
        placed.append((len(known) + number, Instance(box=box_01, caption=label)))
    placed.sort(key=lambda item: item[0])
    return Checked(Layout(caption=caption.strip(), instances=[i for _, i in placed]), notes)


def clip(pixels: list[float], width: int, height: int) -> list[float] | None:
    """``[x0, y0, x1, y1]`` ordered and clipped to the canvas; None when nothing of it is left
    (outside the canvas, or a line or a point)."""
    x0, x1 = sorted(pixels[0::2])
    y0, y1 = sorted(pixels[1::2])
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return [x0, y0, x1, y1]


def _unmoved(
    pixels: list[float], label: str, known: list[Instance], size: tuple[int, int]
) -> Instance | None:
    width, height = size
    for instance in known:
        x0, y0, x1, y1 = instance.box
        exact = (x0 * width, y0 * height, x1 * width, y1 * height)
        if instance.caption.strip() == label and all(
            abs(a - b) <= MATCH_PIXELS for a, b in zip(pixels, exact, strict=True)
        ):
            return instance
    return None


def read_layouts(text: str, name: str, released_canvas: int = RELEASED_CANVAS) -> Loaded:
    """Every layout of a file: this project's JSON / JSON lines (normalised boxes), or the
    authors' released ``dataset/*.json`` (pixel ``[x, y, w, h]`` boxes on a square canvas of
    ``released_canvas`` pixels, ``annotations`` instead of ``instances``). Bad instances are
    left out with a note; ``ValueError`` when the file holds no layout at all."""
    loaded = Loaded([])
    for index, record in enumerate(json_records(text, name)):
        where = f"layout {index + 1}"
        if isinstance(record, dict) and "annotations" in record:
            checked = released_layout(record, released_canvas)
        elif isinstance(record, dict) and "caption" in record:
            checked = project_layout(record)
        else:
            loaded.notes.append(f"{where}: not a layout (no caption); skipped")
            continue
        loaded.layouts.append(checked.layout)
        loaded.notes += [f"{where}: {note}" for note in checked.notes]
    if not loaded.layouts:
        raise ValueError(f"{name} holds no layout")
    return loaded


def project_layout(record: dict) -> Checked:
    """A layout in this project's format, each bad instance left out with a note."""
    caption = record.get("caption")
    if not isinstance(caption, str):
        caption, notes = "", [f"caption {caption!r} is not text; left empty"]
    else:
        notes = []
    items = record.get("instances", [])
    if not isinstance(items, list):
        return Checked(Layout(caption), [*notes, "instances is not a list; none loaded"])
    instances = []
    for number, item in enumerate(items, start=1):
        try:
            if not isinstance(item, dict) or not {"box", "caption"} <= set(item):
                raise ValueError("needs a 'box' and a 'caption'")
            instances.append(Instance(box=item["box"], caption=item["caption"]))
        except ValueError as error:
            notes.append(f"instance {number}: {error}; left out")
    return Checked(Layout(caption, instances), notes)


def released_layout(record: dict, canvas: int = RELEASED_CANVAS) -> Checked:
    """A layout of the authors' ``dataset/*.json``: ``{"caption", "annotations": [{"box":
    [x, y, w, h], "caption": [text]}]}`` in pixels of a ``canvas``-sided square. Boxes reaching
    past the canvas are clipped (as the released data loader does), each with a note."""
    caption = record.get("caption")
    notes = [] if isinstance(caption, str) else [f"caption {caption!r} is not text; left empty"]
    instances = []
    for number, item in enumerate(record.get("annotations") or [], start=1):
        text = item.get("caption") if isinstance(item, dict) else None
        if isinstance(text, list):
            text = text[0] if text else None
        try:
            x, y, w, h = (float(v) for v in item["box"])
        except (KeyError, TypeError, ValueError):
            notes.append(f"instance {number}: box must be [x, y, w, h] in pixels; left out")
            continue
        clipped = clip([x, y, x + w, y + h], canvas, canvas)
        if clipped is None:
            notes.append(f"instance {number}: outside the {canvas}-px canvas or empty; left out")
            continue
        if clipped != [x, y, x + w, y + h]:
            notes.append(f"instance {number}: reached past the {canvas}-px canvas; clipped")
        try:
            box = tuple(v / canvas for v in clipped)
            instances.append(Instance(box=box, caption=text))
        except ValueError as error:
            notes.append(f"instance {number}: {error}; left out")
    return Checked(Layout(caption if isinstance(caption, str) else "", instances), notes)


def layout_json(layout: Layout) -> str:
    """The layout as a file ``ifadapter generate --layouts`` reads."""
    return json.dumps(layout.to_dict(), indent=2) + "\n"
