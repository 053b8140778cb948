"""Throughput of the data engine on the tiny models, and what each stage costs.

One run, side by side:

- ``stages``: each stage as a plain function on one thread (no Ray), the way an actor runs it:
  read + decode, CLIP tagging, Grounding-DINO detection, captioning, shard writing, in
  milliseconds per image (median of ``--repeats``), and the seconds each backend takes to load;
- ``engine``: the whole Ray Data job on a local Ray with two CPUs, with 1 and with 2 actors
  (workers) per model stage, each over a small and a large image set, interleaved over
  ``--rounds`` so that machine noise hits every variant alike. Reported: the large run's wall
  time and images/s (actor start-up included), and from the two runs a line ``t = s + n / r``:
  the start-up ``s`` (actors, imports, model loading, the tagger's vocabulary) and the rate
  ``r`` once running.

The CPU share of each actor is set so that the actors plus one decode task fit the two CPUs
(Ray gives each actor one torch thread).

    python -m benchmarks.annotate_engine [--small 256] [--large 4096] [--rounds 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray
import torch
from PIL import Image, ImageDraw

from annotate.config import AnnotateConfig, parse_config
from annotate.engine.decode import decode_record
from annotate.engine.job import annotate
from annotate.engine.operators import annotate_records
from annotate.engine.records import Record
from annotate.engine.writer import ShardWriter
from annotate.ray_session import connect
from annotate.sources import FolderSource
from annotate.tiny.models import CLIP_DIR, GROUNDING_DINO_DIR, write_tiny_models

CPUS = 2
BATCH = 8


def write_images(directory: Path, count: int) -> None:
    """Scenes of coloured shapes at 128x96 (the tiny models see them at 64 px)."""
    directory.mkdir(parents=True)
    for index in range(count):
        image = Image.new("RGB", (128, 96), (235, 235, 230))
        draw = ImageDraw.Draw(image)
        for k in range(1 + index % 3):
            x, y = (17 * index + 40 * k) % 90, (11 * index + 25 * k) % 60
            colour = ((60 * index) % 255, (90 * k) % 255, 200)
            (draw.ellipse if (index + k) % 2 else draw.rectangle)((x, y, x + 36, y + 30), colour)
        image.save(directory / f"{index:04d}.png")


def profile(models: Path, workers: int) -> AnnotateConfig:
    """The tiny profile with ``workers`` actors for tagging and detection."""
    share = 1.6 / (2 * workers)
    stage = {"workers": workers, "num_cpus": share, "batch_size": BATCH}
    return parse_config(
        {
            "decode": {"min_side": 16, "working_side": 64, "num_cpus": 0.2, "batch_size": 32},
            "tagger": {
                "model": str(models / CLIP_DIR),
                "max_tags": 8,
                "min_similarity": -1.0,
                **stage,
            },
            "detector": {"model": str(models / GROUNDING_DINO_DIR), **stage},
            "captioner": {"workers": 1, "num_cpus": 0.2, "batch_size": 16},
            "output": {"rows_per_shard": 32},
        }
    )


def stage_costs(
    config: AnnotateConfig, images: Path, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per image of each stage run as plain code on one thread, and the seconds
    each backend takes to load (once per actor: the CLIP tagger encodes its vocabulary)."""
    torch.set_num_threads(1)
    source = FolderSource(images)
    items = list(source.items())
    backends, loads = {}, {}
    for name, stage in config.stages().items():
        tick = time.perf_counter()
        backends[name] = stage.build("cpu")
        loads[name] = time.perf_counter() - tick
    times: dict[str, list[float]] = {s: [] for s in ("decode", *backends, "write")}
    for _ in range(repeats):
        records = [
            Record(uri=item.uri, source=source.name, partition=0, position=i)
            for i, item in enumerate(items)
        ]
        tick = time.perf_counter()
        for record in records:
            decode_record(record, source, config.decode, embed=False)
        times["decode"].append(time.perf_counter() - tick)
        for name, backend in backends.items():
            tick = time.perf_counter()
            for start in range(0, len(records), BATCH):
                annotate_records(name, backend, records[start : start + BATCH])
            times[name].append(time.perf_counter() - tick)
        with tempfile.TemporaryDirectory() as out:
            writer = ShardWriter(Path(out), source.extra_schema, config.provenance())
            tick = time.perf_counter()
            for start in range(0, len(records), config.output.rows_per_shard):
                writer.write(start, records[start : start + config.output.rows_per_shard])
            times["write"].append(time.perf_counter() - tick)
    costs = {name: 1000 * statistics.median(t) / len(items) for name, t in times.items()}
    return costs, loads


def engine_run(config: AnnotateConfig, images: Path, out: Path) -> float:
    """Seconds for the whole job; its actors start anew for every run."""
    tick = time.perf_counter()
    annotate(config, FolderSource(images), out)
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=256, help="images in the small run")
    parser.add_argument("--large", type=int, default=4096, help="images in the large run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = write_tiny_models(root / "models")
        sets = {size: root / f"images-{size}" for size in (args.small, args.large)}
        for size, directory in sets.items():
            write_images(directory, size)
        costs, loads = stage_costs(profile(models, 1), sets[args.small], args.repeats)
        total = sum(costs.values())
        print(f"{args.small} images 128x96, tiny models, one thread per stage (no Ray)")
        print(f"{'stage':<10}{'ms/image':>10}{'share':>8}{'load s':>8}")
        for name, ms in costs.items():
            load = f"{loads[name]:>8.2f}" if name in loads else f"{'-':>8}"
            print(f"{name:<10}{ms:>10.2f}{ms / total:>8.1%}{load}")
        print(f"{'sum':<10}{total:>10.2f}   -> {1000 / total:.0f} images/s on one core\n")

        connect(None, num_cpus=CPUS)
        seconds: dict[tuple[int, int], list[float]] = {
            (w, n): [] for w in (1, 2) for n in (args.small, args.large)
        }
        for round_index in range(args.rounds):
            for (workers, size), results in seconds.items():
                out = root / f"out-{workers}-{size}-{round_index}"
                results.append(engine_run(profile(models, workers), sets[size], out))
        ray.shutdown()

    print(
        f"engine on Ray with {CPUS} CPUs, {args.small} and {args.large} images, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'workers':<9}{'run s':>7}{'images/s':>10}{'start-up s':>12}{'images/s running':>18}")
    rows = {}
    for workers in (1, 2):
        small = statistics.median(seconds[workers, args.small])
        large = statistics.median(seconds[workers, args.large])
        rate = (args.large - args.small) / (large - small)
        rows[workers] = {
            "small_run_s": small,
            "large_run_s": large,
            "images_per_s": args.large / large,
            "start_up_s": small - args.small / rate,
            "running_images_per_s": rate,
        }
        row = rows[workers]
        print(
            f"{workers:<9}{large:>7.1f}{row['images_per_s']:>10.1f}"
            f"{row['start_up_s']:>12.1f}{rate:>18.1f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "images": {"small": args.small, "large": args.large},
                    "stage_ms_per_image": costs,
                    "backend_load_s": loads,
                    "engine": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
