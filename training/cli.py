"""``ifadapter train``: the argparse sub-command and its runner.

``ifadapter/cli.py`` registers it with ``add_parser(commands)`` and dispatches ``"train"`` to
``run_train``; its ``main`` turns ``ValueError`` (``ConfigError``, ``SchemaError``) and
``FileNotFoundError`` into one line and exit status 2. Nothing heavy is imported until it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train the adapter on annotated shards (Ray Train)",
        description="Caches VAE latents and text-encoder outputs of the shards once, then trains "
        "the IFAdapter on the frozen SDXL base with Ray Train. Running it again with the same "
        "run name resumes the run from its latest checkpoint.",
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="YAML profile with a 'train:' section"
    )
    parser.add_argument("--base", help="override train.base (SDXL pipeline directory)")
    parser.add_argument("--data", help="override train.data (shard dataset directory)")
    parser.add_argument("--output", help="override train.output (runs, checkpoints, cache)")
    parser.add_argument("--name", help="override train.name (the run to start or resume)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--num-workers", type=int, help="override train.num_workers")
    return parser


def run_train(args: argparse.Namespace) -> None:
    from annotate.ray_session import ray_scope
    from training.config import load_train_config
    from training.run import train

    config = load_train_config(
        args.config,
        base=args.base,
        data=args.data,
        output=args.output,
        name=args.name,
        max_steps=args.max_steps,
        num_workers=args.num_workers,
    )
    with ray_scope():  # train() checks the base before it starts Ray: a missing one is one line
        result = train(config, progress=True)
    summary = {
        "adapter": str(result.adapter_dir),
        "run": str(result.run_dir),
        "steps": result.steps,
        "metrics": result.metrics,
        "images": result.cache.images,
        "quarantined": result.cache.quarantined,
        "resumed_from": result.resumed_from,
    }
    print(json.dumps(summary, indent=2))
