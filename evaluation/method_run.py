"""One method's working directory in an evaluation's output, shared by the run that fills it
(``evaluation.run``) and the report that shows its images (``evaluation.report``).

``methods/<name>/<fingerprint>/``: the fingerprint digests the runner's settings, its weight
files (size and mtime), the generation settings and the benchmark, so changed settings or a
retrained checkpoint get a fresh directory and unchanged ones find their images again.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from evaluation.benchmark import Benchmark, BenchmarkLayout
from evaluation.config import EvaluateConfig, MethodConfig
from evaluation.runners import image_name
from ifadapter.utils.files import json_sha256


def fingerprint_key(data: object) -> str:
    """The 16 hex digits that name cached results (directories, detection and verdict files)
    after what made them; runs already on disk are found by these names."""
    return json_sha256(data)[:16]


class MethodRun:
    """One method's working directory: its images and its cached detections and verdicts."""

    def __init__(
        self, output: Path, method: MethodConfig, config: EvaluateConfig, benchmark: Benchmark
    ):
        self.method = method
        fingerprint = {
            "runner": method.fingerprint(),
            "generation": config.generation.model_dump(mode="json"),
            "benchmark": benchmark.sha256,
        }
        self.directory = output / "methods" / method.name / fingerprint_key(fingerprint)
        self.images = self.directory / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        (self.directory / "fingerprint.json").write_text(
            json.dumps(fingerprint, indent=1, default=str)
        )

    def image_path(self, layout: BenchmarkLayout) -> Path:
        return self.images / f"{image_name(layout.id)}.png"

    def image(self, layout: BenchmarkLayout) -> Image.Image:
        with Image.open(self.image_path(layout)) as image:
            return image.convert("RGB")
