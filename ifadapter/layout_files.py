"""Layout files: what ``ifadapter generate`` reads and the studio loads and saves.

A file holds one layout object, a JSON list of them, or JSON lines, each
``{"caption": ..., "instances": [{"box": [x0, y0, x1, y1], "caption": ...}]}`` with boxes
normalised to the image.
"""

from __future__ import annotations

import json
from pathlib import Path

from ifadapter.layout import Layout


def json_records(text: str, name: str) -> list:
    """The records of a JSON document (an object or a list of them) or of JSON lines;
    ``ValueError`` naming ``name`` when the text is neither."""
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{name} is neither JSON nor JSON lines: {error}") from None


def read_layouts(path: Path) -> list[Layout]:
    """Every layout of the file at ``path``; the first bad one raises ``ValueError`` naming its
    index and fault (a batch run should not start on a file it cannot finish)."""
    if not path.is_file():
        raise ValueError(f"layout file {path} does not exist")
    layouts = []
    for index, item in enumerate(json_records(path.read_text(), str(path))):
        try:
            layouts.append(Layout.from_dict(item))
        except ValueError as error:
            raise ValueError(f"{path}: layout {index}: {error}") from None
    if not layouts:
        raise ValueError(f"{path} holds no layout")
    return layouts
