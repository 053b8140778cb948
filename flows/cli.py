"""``ifadapter pipeline``: the whole Prefect DAG from the command line.

``add_parser`` registers the sub-command on the console script's sub-parsers. Bad parameters
raise ``ValueError`` before Prefect or Ray start (one line, exit status 2 through
``ifadapter.cli.main``); a stage that fails is reported as one line naming the stage, with exit
status 1. Prefect and Ray are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pipeline",
        help="run the whole pipeline as a Prefect flow: annotate, cache, train, evaluate",
        description="Runs the ifadapter-pipeline Prefect flow on one profile: annotate INPUT "
        "into OUTPUT/shards, cache and train into OUTPUT/train, evaluate into OUTPUT/eval. "
        "Stages whose outputs are complete and unchanged are skipped; a killed run resumes. "
        "Uses the Prefect server of PREFECT_API_URL, else a temporary local one.",
    )
    parser.add_argument("--config", required=True, help="YAML profile (annotate:, train:, ...)")
    parser.add_argument("--input", help="what the annotate stage reads (folder, .json, list)")
    parser.add_argument("--output", required=True, help="pipeline directory")
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster: auto, host:port or ray://host:port to join it, or a job server "
        "http://head:8265 to submit each stage to as a Ray job (default: RAY_ADDRESS, else a "
        "local Ray on this machine)",
    )
    parser.add_argument(
        "--stages",
        help="comma-separated stages to run (default: every stage the profile has a section for)",
    )
    parser.add_argument("--methods", help="comma-separated methods to evaluate (default: profile)")
    parser.add_argument("--shards", help="an existing shard dataset to train on (no annotate)")
    parser.add_argument(
        "--benchmark-input",
        help="inputs to annotate into the benchmark's layouts (default: the evaluate: section's "
        "benchmark files)",
    )
    parser.set_defaults(runner=run)
    return parser


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> None:
    from annotate.ray_session import requested_address
    from flows.params import check_params

    values = {
        "config": args.config,
        "input": args.input,
        "output": args.output,
        "ray_address": requested_address(args.ray_address),
        "methods": _split(args.methods),
        "stages": _split(args.stages),
        "shards": args.shards,
        "benchmark_input": args.benchmark_input,
    }
    check_params(**values)  # before Prefect starts: a bad call costs nothing

    from flows.pipeline import StageFailed, run_pipeline

    try:
        results = run_pipeline(**values)
    except StageFailed as error:
        print(f"ifadapter pipeline: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    for stage, result in results.items():
        shown = {k: v for k, v in result.items() if k not in {"markdown", "table"}}
        print(f"{stage}: {json.dumps(shown, default=str)}")
