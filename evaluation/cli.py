"""``ifadapter evaluate``: the argparse sub-command and its runner.

``ifadapter/cli.py`` registers it with ``add_parser(commands)`` and dispatches ``"evaluate"`` to
``run_evaluate``; its ``main`` turns ``ValueError`` (``ConfigError``, ``BenchmarkError``,
``SchemaError``) and ``FileNotFoundError`` into one line and exit status 2. Nothing heavy is
imported until it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="score methods on the IFG benchmark (IFS, AP, CLIP, FID) and write a report",
        description="Builds the benchmark file from annotated shards when it is missing, "
        "generates one image per layout for every method, scores them and writes metrics.json "
        "and a self-contained report.html. Running it again skips every image and every "
        "detection or judge answer already made with the same settings.",
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="YAML profile with an 'evaluate:' section"
    )
    parser.add_argument("--output", required=True, type=Path, help="output directory")
    return parser


def run_evaluate(args: argparse.Namespace) -> None:
    from evaluation.run import evaluate

    result = evaluate(args.config, args.output, progress=True)
    print(result.markdown)
    print(f"metrics: {result.metrics_path}\nreport: {result.report_path}")
