"""The ``ifadapter`` console script.

Every sub-command prints a one-line reason and exits non-zero on bad input instead of a
traceback; ``IFADAPTER_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ifadapter import __version__


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def _generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5)")
    parser.add_argument(
        "--control-ratio",
        type=float,
        default=1.0,
        help="fraction of steps the adapter acts in (default 1.0)",
    )
    parser.add_argument(
        "--unconditional-layout",
        choices=("boxes", "none"),
        default="boxes",
        help="what guidance's unconditional branch keeps of the layout: the box embeddings "
        "(the released code's choice, default) or nothing (guidance then amplifies the layout)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generator for the whole file (default 0)"
    )
    parser.add_argument("--num-images", type=int, default=1, help="images per layout (default 1)")
    parser.add_argument(
        "--height", type=int, default=None, help="image height in pixels (default: the base's)"
    )
    parser.add_argument(
        "--width", type=int, default=None, help="image width in pixels (default: the base's)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ifadapter",
        description="IFAdapter: instance feature control for a frozen SDXL.",
    )
    parser.add_argument("--version", action="version", version=f"ifadapter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline on the embedded default, the toy world",
        description="Runs the ifadapter-pipeline Prefect flow on configs/demo.yaml: generates a "
        "toy world and a held-out benchmark world, annotates them (oracle), trains the adapter "
        "on the frozen toy base shipped in models/toy-base, and evaluates the base, the adapter "
        "and its ablations with the world's exact verifiers. Writes OUT/report.html and "
        "OUT/metrics.json; about 25 minutes on two cores (README: 'Set-up'). Rerunning resumes.",
    )
    demo.add_argument("--out", type=Path, required=True, help="output directory")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="the short configuration (small worlds, a few steps): checks the mechanics in "
        "minutes, measures nothing",
    )
    demo.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the demo profile's)"
    )
    demo.add_argument(
        "--export",
        type=Path,
        default=None,
        help="also write the trained adapter with its profile and benchmark results here "
        "(how models/toy-adapter is made)",
    )

    generate = commands.add_parser(
        "generate",
        help="generate images for layouts with an adapter checkpoint",
        description="Reads layouts (a JSON object or a list of them, or JSON lines) and writes "
        "PNG images plus copies with the boxes drawn.",
    )
    generate.add_argument(
        "--base", required=True, help="SDXL pipeline directory (e.g. models/toy-base) or hub id"
    )
    generate.add_argument(
        "--adapter", required=True, type=Path, help="IFAdapter checkpoint directory"
    )
    generate.add_argument("--layouts", required=True, type=Path, help="layout JSON / JSONL file")
    generate.add_argument("--out", required=True, type=Path, help="output directory")
    generate.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    _generation_args(generate)

    convert = commands.add_parser(
        "convert-released",
        help="convert the authors' released spd_adapter.bin into an adapter checkpoint",
        description="Reads spd_adapter.bin with torch.load(weights_only=True) and writes "
        "config.json + ifadapter.safetensors in the released-compatibility mode, which "
        "reproduces the released inference code.",
    )
    convert.add_argument("weights", type=Path, help="the released spd_adapter.bin")
    convert.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    convert.add_argument(
        "--base",
        help="SDXL pipeline directory (or hub id) whose UNet the weights are for; default: the "
        "SDXL 1.0 architecture",
    )

    from annotate.cli import add_parser as add_annotate_parser

    add_annotate_parser(commands)

    from training.cli import add_parser as add_train_parser

    add_train_parser(commands)

    from flows.cli import add_parser as add_pipeline_parser

    add_pipeline_parser(commands)

    from evaluation.cli import add_parser as add_evaluate_parser

    add_evaluate_parser(commands)
    return parser


def read_layouts(path: Path) -> list:
    from ifadapter.layout import Layout

    if not path.is_file():
        raise UsageError(f"layout file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} is neither JSON nor JSON lines: {error}") from None
    layouts = []
    for index, item in enumerate(items):
        try:
            layouts.append(Layout.from_dict(item))
        except ValueError as error:
            raise UsageError(f"{path}: layout {index}: {error}") from None
    if not layouts:
        raise UsageError(f"{path} holds no layout")
    return layouts


def save_images(images, layouts, out: Path, num_images: int) -> list[Path]:
    from ifadapter.visualize import draw_layout

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        layout = layouts[index // num_images]
        stem = f"{index // num_images:05d}_{index % num_images}"
        image.save(out / f"{stem}.png")
        draw_layout(image, layout).save(out / f"{stem}_boxes.png")
        written.append(out / f"{stem}.png")
    return written


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from ifadapter.adapter import IFAdapter
    from ifadapter.base_model import check_base
    from ifadapter.pipeline import IFAdapterSDXLPipeline

    layouts = read_layouts(args.layouts)
    base = check_base(args.base)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (args.adapter / "config.json").is_file():
        raise UsageError(f"{args.adapter} is not an IFAdapter checkpoint (no config.json)")
    # One dtype for the whole pipeline: float32 on the CPU (half-precision matmuls are slow or
    # missing there), float16 elsewhere; a float16 checkpoint would otherwise load its text
    # encoders in float16 (transformers keeps the stored dtype) beside a float32 UNet.
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    adapter = IFAdapter.from_pretrained(args.adapter, dtype=dtype)
    pipe = IFAdapterSDXLPipeline.from_pretrained(base, adapter=adapter, dtype=dtype)
    pipe = pipe.to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = pipe(
        [layout.caption for layout in layouts],
        [layout.instances for layout in layouts],
        control_ratio=args.control_ratio,
        unconditional_layout=args.unconditional_layout,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        height=args.height,
        width=args.width,
        generator=generator,
    ).images
    written = save_images(images, layouts, args.out, args.num_images)
    print(f"wrote {len(written)} images to {args.out}")


def run_convert_released(args: argparse.Namespace) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from ifadapter import tiny
    from ifadapter.released import load_released_state, released_adapter

    if not args.weights.is_file():
        raise UsageError(f"{args.weights} does not exist")
    if args.base is None:
        config = tiny.unet_config("sdxl")
    else:
        config = UNet2DConditionModel.load_config(args.base, subfolder="unet")
    with torch.device("meta"):  # only the processor order and layer widths are needed
        unet = UNet2DConditionModel.from_config(config)
    adapter = released_adapter(load_released_state(args.weights), unet)
    adapter.save_pretrained(args.out)
    print(f"wrote {len(adapter.config.layers)}-layer released-compatible adapter to {args.out}")


def run_demo(args: argparse.Namespace) -> None:
    from flows.demo import run_demo as run
    from flows.pipeline import StageFailed

    started = time.perf_counter()
    try:
        if args.steps is not None and args.steps <= 0:
            raise UsageError(f"--steps must be positive, got {args.steps}")
        results = run(args.out, quick=args.quick, steps=args.steps, export=args.export)
    except StageFailed as error:
        print(f"ifadapter demo: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(results["evaluate"]["markdown"])
    minutes = (time.perf_counter() - started) / 60
    print(f"report: {args.out / 'report.html'}  metrics: {args.out / 'metrics.json'}")
    print(f"demo finished in {minutes:.1f} min")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from annotate.cli import run as run_annotate
    from evaluation.cli import run_evaluate
    from flows.cli import run as run_pipeline
    from training.cli import run_train

    runners = {
        "demo": run_demo,
        "generate": run_generate,
        "annotate": run_annotate,
        "train": run_train,
        "evaluate": run_evaluate,
        "convert-released": run_convert_released,
        "pipeline": run_pipeline,
    }
    try:
        runners[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as error:
        if os.environ.get("IFADAPTER_DEBUG"):
            raise
        print(f"ifadapter {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
