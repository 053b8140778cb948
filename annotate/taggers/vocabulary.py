"""Tag vocabularies for open-vocabulary tagging.

``ram`` is the 4,585-tag list of the Recognize Anything Model (RAM/RAM++), shipped as data in
``annotate/data/ram_tag_list.txt`` (see ``annotate/data/README.md`` for its source and licence);
any other name is a path to a text file with one tag per line.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

BUILTIN = {"ram": "ram_tag_list.txt"}


def load_vocabulary(name: str) -> list[str]:
    """The tags of a built-in vocabulary or a one-tag-per-line file; blank lines and repeats
    dropped, order kept (it is the order tags are prompted in)."""
    if name in BUILTIN:
        text = importlib.resources.files("annotate.data").joinpath(BUILTIN[name]).read_text()
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"tag vocabulary {name!r} is neither built in ({', '.join(BUILTIN)}) nor a file"
            )
        text = path.read_text()
    tags = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not tags:
        raise ValueError(f"tag vocabulary {name!r} holds no tag")
    return tags
