"""Training throughput on the tiny models: samples/s with 1 and 2 Ray Train workers.

Builds the tiny SDXL-architecture base and a synthetic shard dataset, caches it once, then runs
``training.run.train`` (the tiny profile) for each variant, side by side and interleaved over
rounds so that machine noise hits every variant alike:

- ``1 worker x 1 thread``: the baseline;
- ``2 workers x 1 thread``: data parallel on gloo, each worker with the same per-worker batch
  (so twice the global batch);
- ``1 worker x 2 threads``: the same two cores spent on one worker instead.

Reported per variant: the median over rounds of each run's median step throughput (global
samples per second, the first steps dropped as warm-up), and the median ratio to the baseline of
the same round. The machine and its load are printed with the figures.

    python -m benchmarks.training_throughput [--steps 30] [--rounds 3] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "1 worker x 1 thread": {"num_workers": 1, "cpus_per_worker": 1},
    "2 workers x 1 thread": {"num_workers": 2, "cpus_per_worker": 1},
    "1 worker x 2 threads": {"num_workers": 1, "cpus_per_worker": 2},
}
PROFILE = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="samples per worker per step")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from diffusers import StableDiffusionXLPipeline

    from annotate.ray_session import connect
    from ifadapter import tiny
    from tests.support.shards import default_rows, write_dataset
    from training.cache import build_cache
    from training.config import load_train_config
    from training.metrics import read_metrics
    from training.run import train

    cpus = os.cpu_count() or 1
    variants = {
        k: v for k, v in VARIANTS.items() if v["num_workers"] * v["cpus_per_worker"] <= cpus
    }
    workdir = Path(tempfile.mkdtemp(prefix="training-throughput-"))
    StableDiffusionXLPipeline(**tiny.components(seed=0)).save_pretrained(workdir / "base")
    write_dataset(workdir / "shards", [default_rows(args.images)])
    connect(None, num_cpus=cpus)  # a local Ray on this machine's CPUs

    def config(name: str, **overrides):
        return load_train_config(
            PROFILE,
            base=str(workdir / "base"),
            data=str(workdir / "shards"),
            output=str(workdir / "runs"),
            name=name,
            max_steps=args.steps,
            batch_size=args.batch_size,
            checkpoint_every=args.steps,
            log_every=args.steps,
            **overrides,
        )

    tick = time.perf_counter()
    cache = build_cache(config("cache"))
    print(
        f"cache: {cache.images} images, {cache.views} views in {time.perf_counter() - tick:.1f}s; "
        f"{cpus} CPUs, load average {os.getloadavg()[0]:.1f} before the runs"
    )

    throughput = {name: [] for name in variants}
    ratios = {name: [] for name in variants}
    fit_seconds = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, overrides in variants.items():
            tick = time.perf_counter()
            result = train(config(f"{name.replace(' ', '-')}-{round_index}", **overrides))
            fit_seconds[name].append(time.perf_counter() - tick)
            steps = [m["samples_per_s"] for m in read_metrics(result.run_dir)][args.warmup :]
            throughput[name].append(statistics.median(steps))
        baseline = throughput["1 worker x 1 thread"][-1]
        for name in variants:
            ratios[name].append(throughput[name][-1] / baseline)
        print(
            f"round {round_index + 1}: "
            + ", ".join(f"{name} {throughput[name][-1]:.1f}/s" for name in variants)
        )

    print(
        f"\nmedians of {args.rounds} interleaved rounds; {args.steps} steps per run, the first "
        f"{args.warmup} left out; batch {args.batch_size} per worker"
    )
    print(f"{'variant':<24}{'global batch':>13}{'samples/s':>11}{'ratio':>8}{'run s':>8}")
    rows = []
    for name, overrides in variants.items():
        row = {
            "variant": name,
            "global_batch": args.batch_size * overrides["num_workers"],
            "samples_per_s": statistics.median(throughput[name]),
            "ratio": statistics.median(ratios[name]),
            "run_s": statistics.median(fit_seconds[name]),
        }
        rows.append(row)
        print(
            f"{name:<24}{row['global_batch']:>13}{row['samples_per_s']:>11.1f}"
            f"{row['ratio']:>8.2f}{row['run_s']:>8.1f}"
        )
    print(f"load average after the runs: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
