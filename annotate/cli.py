"""``ifadapter annotate``: the data engine from the command line.

``add_parser`` registers the sub-command on the ``ifadapter`` console script's sub-parsers and
``run`` executes it. Bad input (config, input path, an output directory holding another run)
raises a ``ValueError`` whose message is one line, which the console script prints before
exiting with status 2. Heavy imports (Ray, torch) wait until the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "annotate",
        help="annotate images into Parquet shards (Ray Data: tag, detect, caption)",
        description="Runs the data engine over an input (an image folder, a COCO instances "
        ".json, or a .parquet/.csv list of image URIs on any fsspec path) and writes Parquet "
        "shards, a quarantine table and _manifest.json to OUTPUT. Rerunning into the same "
        "OUTPUT resumes: finished shards are kept.",
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML profile (annotate:)")
    parser.add_argument("--input", required=True, help="image folder, COCO .json or URI list")
    parser.add_argument("--output", required=True, type=Path, help="dataset directory")
    parser.add_argument("--images", help="COCO: the image folder (default: beside annotations/)")
    parser.add_argument(
        "--source-name", help="the `source` column and image_id prefix (default: folder/coco/uris)"
    )
    parser.add_argument(
        "--ray-address",
        help="Ray cluster to join: auto, host:port or ray://host:port (default: RAY_ADDRESS, "
        "else a local Ray on this machine)",
    )
    parser.add_argument("--export-coco", type=Path, help="also write the dataset as COCO JSON")
    parser.set_defaults(runner=run)
    return parser


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from annotate.coco_export import export_coco
    from annotate.config import load_config
    from annotate.engine.job import annotate
    from annotate.ray_session import connect, ray_scope, requested_address
    from annotate.sources import open_source

    config = load_config(args.config)
    source = open_source(args.input, images=args.images, name=args.source_name)
    with ray_scope():
        connect(requested_address(args.ray_address))
        bar = tqdm(unit="img", desc="annotate", dynamic_ncols=True)

        def on_plan(inputs: int, done: int) -> None:
            bar.reset(total=inputs)
            bar.update(done)

        try:
            summary = annotate(config, source, args.output, progress=bar.update, on_plan=on_plan)
        finally:
            bar.close()
    for line in summary.lines():
        print(line)
    if args.export_coco:
        counts = export_coco(args.output, args.export_coco)
        print(
            f"COCO JSON: {args.export_coco} ({counts['images']} images, "
            f"{counts['annotations']} annotations, {counts['categories']} categories)"
        )
