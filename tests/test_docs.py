"""The docs as a new user meets them: every shell block of the README and of ``docs/`` runs as
written, in document order, in a fresh directory that holds the repository but none of its
outputs; every path, document and section they cite exists.

Each shell block carries a marker on the line above it: ``<!-- doc-test: run -->``, or
``<!-- doc-test: skip: REASON -->`` for what cannot run here (a GPU, a cluster, weights that
are not distributable, a server that runs until stopped); the reason shows in the test report.
A block without a marker fails the first test, so a command cannot enter the docs untested.
The docs' placeholders for the user's own files are filled with generated photographs:
``path/to/images`` (20 JPEGs of camera sizes and a folder of awkward files: CMYK, 16-bit grey,
EXIF-rotated, truncated, empty, a decompression bomb) and ``path/to/held-out-images``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.annotate_inputs import write_bad_inputs, write_photos
from tests.support.flows import flow_env
from tests.support.paths import REPO

DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "infra").rglob("*.md")])
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(run|skip:\s*(?P<reason>.+?))\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\w*)\s*$")
SHELLS = {"bash", "sh", "shell", "console"}
# Where the outputs of a new user's first hour live: left out of the fresh directory.
LEFT_OUT = {".git", ".venv", ".venv-gdino", "out", ".pytest_cache", ".ruff_cache"}
BLOCK_TIMEOUT_S = 1500


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    text: str
    marker: str | None  # "run", "skip", or None when the block has no marker
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def shell_blocks(path: Path) -> list[Block]:
    """The fenced shell blocks of one Markdown file, each with the marker above it."""
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence or fence["lang"] == "":
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if fence["lang"] in SHELLS:
            indent = len(fence["indent"])
            text = "\n".join(line[indent:] for line in lines[index + 1 : end])
            previous = next((lines[k] for k in range(index - 1, -1, -1) if lines[k].strip()), "")
            marker = MARKER.match(previous)
            kind = None if marker is None else ("run" if marker[1] == "run" else "skip")
            reason = (marker["reason"] or "") if marker else ""
            blocks.append(Block(path, index + 1, text, kind, reason))
        index = end + 1
    return blocks


BLOCKS = [block for path in DOCS for block in shell_blocks(path)]
RAN: dict[str, bool] = {}  # where -> whether the block ran and passed


def test_every_shell_block_is_marked_run_or_skip():
    unmarked = [block.where for block in BLOCKS if block.marker is None]
    assert not unmarked, (
        "shell blocks without a <!-- doc-test: run --> or <!-- doc-test: skip: REASON --> "
        f"marker on the line above: {unmarked}"
    )
    assert any(block.marker == "run" for block in BLOCKS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh directory that holds the repository (linked) without its outputs, and the user's
    photographs."""
    root = tmp_path_factory.mktemp("first-hour")
    for entry in REPO.iterdir():
        if entry.name not in LEFT_OUT:
            (root / entry.name).symlink_to(entry)
    photos = root / "my-photos"
    write_photos(photos, 20)
    write_bad_inputs(photos / "odd")
    write_photos(root / "my-held-out-photos", 18, start=100)
    return root


def _environment(root: Path) -> dict[str, str]:
    env = flow_env(PREFECT_HOME=str(root / ".prefect"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env.pop("PREFECT_API_URL", None)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_documented_commands_run(block: Block, workspace: Path):
    if block.marker != "run":
        pytest.skip(f"{block.where}: {block.reason or 'not marked'}")
    text = block.text.replace("path/to/held-out-images", str(workspace / "my-held-out-photos"))
    text = text.replace("path/to/images", str(workspace / "my-photos"))
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text],
        cwd=workspace,
        env=_environment(workspace),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    output = (result.stdout + result.stderr)[-6000:]
    RAN[block.where] = result.returncode == 0
    assert result.returncode == 0, f"{block.where} failed:\n{text}\n--- output (end) ---\n{output}"


def test_the_first_hour_ends_in_reports(workspace: Path):
    """What the runnable blocks promise a new user: shards with their quarantine beside them,
    a trained adapter, two reports (the tiny evaluation and the whole pipeline on photographs)
    and images from the shipped toy adapter."""
    runnable = [block.where for block in BLOCKS if block.marker == "run"]
    if not all(RAN.get(where) for where in runnable):
        pytest.skip("runs after every runnable block has passed")
    import pandas as pd

    shards = workspace / "out/tiny/shards"
    rows = pd.read_parquet(shards)  # the dataset alone: the quarantine is not read with it
    assert "instances" in rows and len(rows) == 23  # 20 photographs, CMYK, 16-bit, EXIF
    assert len(pd.read_parquet(shards / "_quarantine")) == 5
    assert (workspace / "out/tiny/train/tiny/adapter/ifadapter.safetensors").is_file()
    for report in ("out/tiny/eval/report.html", "out/pipeline/eval/report.html"):
        page = (workspace / report).read_text()
        assert "How to read this table" in page and "ifadapter" in page
    assert len(list((workspace / "out/generated").glob("*_boxes.png"))) == 8


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {
        _slug(line.lstrip("#"))
        for line in path.read_text().splitlines()
        if re.match(r"^#{1,6} ", line)
    }


TOP_LEVEL = {entry.name for entry in REPO.iterdir() if entry.name not in LEFT_OUT}
PATH_TOKEN = re.compile(r"`([A-Za-z0-9_.*/-]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
MARKDOWN_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def _cited_paths(text: str) -> set[str]:
    """Backticked tokens that name a file or folder of the repository: their first component is
    a top-level entry (``annotate/engine/plan.py``, ``configs/tiny.yaml``, ``Makefile``)."""
    cited = set()
    for token in PATH_TOKEN.findall(text):
        token = token.rstrip("/.,:")
        if "/" not in token and token not in TOP_LEVEL:
            continue
        if token.split("/")[0] in TOP_LEVEL and "NNNNN" not in token:
            cited.add(token)
    return cited


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_cited_paths_documents_and_sections_exist(doc: Path):
    text = doc.read_text()
    missing = [p for p in sorted(_cited_paths(text)) if not list(REPO.glob(p))]
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file).resolve() if file else doc
        if not linked.exists():
            missing.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            missing.append(f"{target} (no such section)")
    for name in MARKDOWN_NAME.findall(text):
        if not ((doc.parent / name).exists() or (REPO / name).exists()):
            missing.append(name)
    for section in re.findall(r'see "([^"]+)"', text):
        if not any(anchor.startswith(_slug(section)) for anchor in _anchors(doc)):
            missing.append(f'"{section}" (no such section in {doc.name})')
    assert not missing, f"{doc.relative_to(REPO)} cites what does not exist: {missing}"


def test_code_cites_only_documents_that_exist():
    """Docstrings and profiles point into the docs (the design brief beside the repository is
    not part of it): every Markdown file they name exists."""
    listed = subprocess.run(
        ["git", "ls-files", "*.py", "*.yaml", "*.toml", "*.sh", "Makefile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    missing = []
    for name in listed:
        path = REPO / name
        for cited in MARKDOWN_NAME.findall(path.read_text()):
            if not ((REPO / cited).exists() or (path.parent / cited).exists()):
                missing.append(f"{name}: {cited}")
    assert not missing, missing
