"""Per-run metrics: ``metrics.jsonl`` (one line per optimiser step) and TensorBoard when
tensorboardX is installed. Written by rank 0 only.

A restored run recomputes the steps after its checkpoint, so on restore the lines and TensorBoard
events past the checkpoint are dropped first: the file always reads as one uninterrupted curve,
and ``events.jsonl`` records where the run was resumed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ifadapter.utils.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class StepMetrics:
    step: int  # optimiser steps completed
    epoch: int
    loss: float  # mean over the global batch
    lr: float  # the learning rate this step used
    grad_norm: float  # before clipping
    samples_per_s: float  # global batch over the step's wall time

    def as_dict(self) -> dict:
        return asdict(self)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_events(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, run_dir: Path, start_step: int, world_size: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
        write_text_atomic(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        if start_step:
            event = {"event": "resumed", "step": start_step, "world_size": world_size}
            with open(run_dir / EVENTS_FILE, "a") as events:
                events.write(json.dumps({**event, "time": time.time()}) + "\n")
        self.handle = open(self.path, "a")  # noqa: SIM115 - held for the whole run
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(
                str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
            )

    def write(self, metrics: StepMetrics) -> None:
        self.handle.write(json.dumps(metrics.as_dict()) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for name in ("loss", "lr", "grad_norm", "samples_per_s"):
                self.tensorboard.add_scalar(f"train/{name}", getattr(metrics, name), metrics.step)

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
