"""Where a base SDXL pipeline comes from, checked before anything loads it.

diffusers treats any string it cannot find on disk as a hub id and, offline or for a path that
was never created, ends in a long traceback about connecting to the hub. Users mean a local
directory far more often than not, so a missing one is named as such, in one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` switches the model hub off (the values huggingface_hub reads
    as true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_base(base: str | os.PathLike, local_only: bool = False) -> str:
    """``base`` as given, after checking that it is a pipeline directory (``model_index.json``)
    or, unless ``local_only`` or ``HF_HUB_OFFLINE`` is set, something shaped like a hub id."""
    text = os.fspath(base)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"base {text} is not an SDXL pipeline directory (no model_index.json); "
                "give a directory written by save_pretrained, e.g. models/toy-base"
            )
        return text
    if path.exists():
        raise FileNotFoundError(f"base {text} is a file, not an SDXL pipeline directory")
    offline = hub_offline()
    if local_only or offline or not _HUB_ID.match(text):
        where = "no such directory"
        if offline:
            where += " (and HF_HUB_OFFLINE is set: no hub ids)"
        raise FileNotFoundError(
            f"base {text}: {where}; give an SDXL pipeline directory, e.g. models/toy-base"
        )
    return text
