"""Stage records: what lets a rerun of the pipeline skip a stage whose outputs are complete and
unchanged, and redo the rest.

When a stage finishes, the pipeline writes ``<output>/_flows/<stage>.json``: a digest of
everything the stage's result depends on (``ifadapter.utils.files.json_sha256`` of its settings
and the checksums of its inputs), the checksum of every file it produced, and a summary
(locations, counts) that a skipped stage returns instead of running. A stage is skipped only
when its record exists, the digest of its inputs is the same now, and every output file still
has its checksum; anything else (a changed profile, new shards upstream, a deleted or edited
output, a run killed before the record was written) runs the stage again, and the stage itself
resumes from what it finds on disk.

Checksums are SHA-256 of the file's bytes. A file whose size and modification time are the
ones recorded is not read again (the same shortcut make and rsync take), so a rerun over a
large dataset costs a ``stat`` per file; any other file is hashed in full.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ifadapter.utils.files import file_sha256, write_json_atomic

RECORDS_DIR = "_flows"


@dataclass
class FileStamp:
    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        stat = path.stat()
        return cls(sha256=file_sha256(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)

    def matches(self, path: Path) -> bool:
        if not path.is_file():
            return False
        stat = path.stat()
        if stat.st_size == self.size and stat.st_mtime_ns == self.mtime_ns:
            return True
        return stat.st_size == self.size and file_sha256(path) == self.sha256


@dataclass
class StageRecord:
    """One finished stage: the digest of its inputs, its output files, its summary."""

    stage: str
    inputs: str
    outputs: dict[str, FileStamp]  # absolute path -> stamp
    summary: dict[str, Any]
    finished: float = field(default_factory=time.time)

    @classmethod
    def make(
        cls, stage: str, inputs: str, files: list[Path], summary: dict[str, Any]
    ) -> StageRecord:
        stamps = {str(Path(p).resolve()): FileStamp.of(Path(p)) for p in files}
        return cls(stage=stage, inputs=inputs, outputs=stamps, summary=summary)

    def unchanged(self, inputs: str) -> bool:
        """Same inputs, and every output still on disk with its checksum."""
        return self.inputs == inputs and all(
            stamp.matches(Path(path)) for path, stamp in self.outputs.items()
        )

    @staticmethod
    def path(output: Path, stage: str) -> Path:
        return Path(output) / RECORDS_DIR / f"{stage}.json"

    def write(self, output: Path) -> Path:
        """Atomic (temporary file, then rename): a record on disk is a whole record."""
        target = self.path(output, self.stage)
        return write_json_atomic(target, asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def read(cls, output: Path, stage: str) -> StageRecord | None:
        path = cls.path(output, stage)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            data["outputs"] = {k: FileStamp(**v) for k, v in data["outputs"].items()}
            return cls(**data)
        except (ValueError, TypeError, KeyError):
            return None  # unreadable: treated as absent, the stage runs again

    @classmethod
    def clear(cls, output: Path, stage: str) -> None:
        cls.path(output, stage).unlink(missing_ok=True)
