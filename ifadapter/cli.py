"""The ``ifadapter`` console script.

Every sub-command prints a one-line reason and exits non-zero on bad input instead of a
traceback; ``IFADAPTER_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ifadapter import __version__

MODELS = Path(__file__).resolve().parent.parent / "models"  # the shipped toy models


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
        "--seed",
        type=int,
        default=0,
        help="seed of the first image; image k of the run (layout by layout) gets seed + k "
        "(default 0)",
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
        "on the frozen toy base shipped in models/toy-base, and evaluates the base and the adapter "
        "with the world's exact verifiers. Writes OUT/report.html and "
        "OUT/metrics.json; about 11 minutes on two cores (README: 'Set-up'). Rerunning resumes.",
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
    demo.add_argument(
        "--ablation",
        choices=("no-appearance", "no-eot"),
        default=None,
        help="train the paper's ablation instead of the full adapter: without the appearance "
        "tokens (the EoT token only) or without the EoT token (docs/toy-world.md)",
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
    generate.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="layouts per pipeline call (default 8); each image keeps its seed whatever the "
        "batches",
    )
    _generation_args(generate)

    studio = commands.add_parser(
        "studio",
        help="compose layouts in the browser and generate them",
        description="Starts a local web app: draw boxes on a canvas (or over a reference "
        "image), describe each, generate with the adapter and the base beside it on the same "
        "seed, and see each instance's verdict where a judge exists (the toy world's exact "
        "verifiers). Layouts load and save as the files `ifadapter generate` reads; the "
        "authors' released dataset/*.json files import too. docs/studio.md",
    )
    studio.add_argument(
        "--base",
        default=str(MODELS / "toy-base"),
        help="SDXL pipeline directory or hub id (default: the toy base in models/)",
    )
    studio.add_argument(
        "--adapter",
        type=Path,
        default=MODELS / "toy-adapter",
        help="IFAdapter checkpoint directory (default: the toy adapter in models/)",
    )
    studio.add_argument(
        "--judges",
        type=Path,
        help="a profile whose evaluate: section's detector and VLM judges judge each instance "
        "(real models; default: the toy world's exact verifiers)",
    )
    studio.add_argument("--lora", help="a LoRA for the base (file, directory or hub id)")
    studio.add_argument(
        "--lora-scale", type=float, default=1.0, help="the LoRA's weight (default 1.0)"
    )
    studio.add_argument("--port", type=int, default=7860, help="local port (default 7860)")
    studio.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )

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


def save_images(images, layouts, out: Path, num_images: int, first: int = 0) -> list[Path]:
    """Each image as ``LLLLL_J.png`` (layout ``first + L``, image J) and a copy with the boxes
    drawn (``_boxes.png``)."""
    from ifadapter.visualize import draw_layout

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        layout = layouts[index // num_images]
        stem = f"{first + index // num_images:05d}_{index % num_images}"
        image.save(out / f"{stem}.png")
        draw_layout(image, layout).save(out / f"{stem}_boxes.png")
        written.append(out / f"{stem}.png")
    return written


def run_generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from ifadapter.layout_files import read_layouts
    from ifadapter.sampling import Sampling, default_device, generate, load_pipeline

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    layouts = read_layouts(args.layouts)
    sampling = Sampling(
        steps=args.steps,
        guidance=args.guidance,
        control_ratio=args.control_ratio,
        unconditional_layout=args.unconditional_layout,
        seed=args.seed,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
    )
    pipe = load_pipeline(args.base, args.adapter, args.device or default_device())
    written = []
    with tqdm(total=len(layouts) * args.num_images, unit="image", desc="generate") as bar:
        for first in range(0, len(layouts), args.batch_size):
            batch = layouts[first : first + args.batch_size]
            images = generate(pipe, batch, sampling, first=first)
            written += save_images(images, batch, args.out, args.num_images, first)
            bar.update(len(images))
    print(f"wrote {len(written)} images to {args.out}")


def run_studio(args: argparse.Namespace) -> None:
    from evaluation.studio.app import serve

    serve(
        args.base,
        args.adapter,
        port=args.port,
        device=args.device,
        judges=args.judges,
        lora=args.lora,
        lora_scale=args.lora_scale,
    )


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
        results = run(
            args.out,
            quick=args.quick,
            steps=args.steps,
            export=args.export,
            ablation=args.ablation,
        )
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
    from flows.cli import run as run_pipeline_command
    from training.cli import run_train

    runners = {
        "demo": run_demo,
        "generate": run_generate,
        "studio": run_studio,
        "annotate": run_annotate,
        "train": run_train,
        "evaluate": run_evaluate,
        "convert-released": run_convert_released,
        "pipeline": run_pipeline_command,
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
