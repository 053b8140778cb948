"""Files a reader never sees half-written, and the SHA-256 digests of files and JSON values.

Every write goes to a hidden temporary beside its target, ``.<name>.<random>.tmp``, and is then
renamed over the target with ``os.replace`` (atomic within one file system): a reader finds the
old file or the new one, never a part. The name is hidden (dot-prefixed), so readers that glob a
dataset (``*.parquet``, ``*.png``) never pick one up, and random, so two writers of the same
target never share one. A directory is swapped in the same way (``atomic_directory``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(target: str | os.PathLike) -> Path:
    """A hidden, unique name beside ``target``: ``.<name>.<random>.tmp``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Removes the temporaries killed writers left in ``folder`` (``*.tmp``, hidden or not:
    ``Path.glob`` matches dot-files too)."""
    for leftover in Path(folder).glob(f"*{TEMPORARY_SUFFIX}"):
        _remove(leftover)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path for the block to write ``target``'s content to (for writers that take
    a path; ``atomic_open`` gives an open file instead); renamed over ``target`` when the block
    ends without error, removed when it raises. The target's folder is created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        _remove(temporary)
        raise


@contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb", sync: bool = False) -> Iterator[IO]:
    """A file open for writing whose content becomes ``target`` when the block ends without
    error (``atomic_path``); ``sync`` flushes it to the disk first (what a manifest will list
    must survive a crash once listed)."""
    with atomic_path(target) as temporary, open(temporary, mode) as handle:
        yield handle
        if sync:
            handle.flush()
            os.fsync(handle.fileno())


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(target, "wb") as handle:
        handle.write(data)
    return Path(target)


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    with atomic_open(target, "w") as handle:
        handle.write(text)
    return Path(target)


def write_json_atomic(target: str | os.PathLike, value: Any, **dumps: Any) -> Path:
    """``value`` as JSON (``dumps``: ``json.dumps``'s options, e.g. ``indent``)."""
    return write_text_atomic(target, json.dumps(value, **dumps))


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A hidden temporary path beside ``target`` (not yet created: ``mkdir`` it, or let a
    writer such as ``save_pretrained`` or ``copytree`` create it) that becomes ``target`` when
    the block ends without error. An existing ``target`` is removed first; with ``overwrite``
    False it is kept instead and the new directory dropped (another writer of the same content
    placed it first). The temporary is removed in every case."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target)
    try:
        yield temporary
        if overwrite:
            _remove(target)
        try:
            os.replace(temporary, target)
        except OSError:
            if overwrite or not target.is_dir():
                raise
    finally:
        _remove(temporary)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value: Any, compact: bool = False) -> str:
    """SHA-256 (hex) of ``value``'s canonical JSON: keys sorted, ASCII only, values JSON cannot
    hold written as ``str()``; ``", "`` and ``": "`` between items, or ``","`` and ``":"`` when
    ``compact``. These digests name caches, runs and records already on disk: the encoding must
    never change."""
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(value, sort_keys=True, default=str, separators=separators)
    return hashlib.sha256(text.encode()).hexdigest()
