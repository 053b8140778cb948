"""One request per instance against several instances per request, side by side in one run.

The instance captions of the same images go through the real HTTP path (``HTTPChatClient`` ->
``annotate.vlm.server`` on 127.0.0.1 -> the tiny random-weight Qwen2-VL in process, batching
the requests that wait), once per instance and once with ``--group`` crops per request,
interleaved over ``--rounds`` so that machine noise hits both alike. Reported per mode (median
of the rounds): requests, wall seconds, requests/s, instance captions/s, completion tokens per
caption, and the share of captions that passed the strict checks (the tiny model's text is noise
shaped by the JSON grammar, so this share measures the mechanics, not caption quality; compare
quality on a real model with the judges of ``annotate.vlm.judge``).

    python -m benchmarks.caption_requests [--images 16] [--instances 4] [--group 4] [--rounds 3]
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

import torch
from PIL import Image, ImageDraw

from annotate.captioners.requests import CaptionPlan, CaptionSettings
from annotate.engine.records import Detection, Record
from annotate.tiny.vlm import write_tiny_vlm
from annotate.vlm.http import HTTPChatClient
from annotate.vlm.in_process import TransformersChatClient
from annotate.vlm.server import ChatCompletionsServer, running

LABELS = ["red ball", "blue box", "green cup", "yellow chair", "purple lamp", "grey stone"]


def scene_records(count: int, instances: int) -> list[Record]:
    """Scenes of coloured shapes (128x96), each with ``instances`` distinct boxes and labels."""
    records = []
    for index in range(count):
        image = Image.new("RGB", (128, 96), (235, 235, 230))
        draw = ImageDraw.Draw(image)
        boxes = []
        for k in range(instances):
            x, y = (17 * index + 29 * k) % 90, (11 * index + 23 * k) % 60
            colour = ((60 * index + 40 * k) % 255, (90 * k) % 255, 200)
            draw.ellipse((x, y, x + 36, y + 30), colour)
            boxes.append(
                Detection((x / 128, y / 96, (x + 36) / 128, (y + 30) / 96), LABELS[k], 0.9)
            )
        record = Record(uri=f"scene-{index}", source="bench", partition=0, position=index)
        record.pixels, record.pixels_size = image.tobytes(), image.size
        record.instances = boxes
        records.append(record)
    return records


def run_mode(client: HTTPChatClient, records: list[Record], settings: CaptionSettings) -> dict:
    """Instance captions only: the global captions are the same requests in both modes."""
    plan = CaptionPlan(records, settings)
    plan.planned = [p for p in plan.planned if not p.with_caption]
    started = time.perf_counter()
    replies = client.chat(plan.requests)
    seconds = time.perf_counter() - started
    results = plan.captions(replies)
    captions = sum(len(r.instances) for r in results)
    usable = sum(bool(text) for r in results for text in r.instances)
    return {
        "requests": len(plan.requests),
        "seconds": seconds,
        "requests_per_s": len(plan.requests) / seconds,
        "captions_per_s": captions / seconds,
        "tokens_per_caption": sum(r.completion_tokens for r in replies) / captions,
        "usable": usable / captions,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--instances", type=int, default=4, help="per image (at most 6)")
    parser.add_argument("--group", type=int, default=4, help="instances per grouped request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="client requests in flight")
    parser.add_argument("--max-batch", type=int, default=8, help="server generation batch")
    parser.add_argument("--max-chars", type=int, default=48, help="per instance caption")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (two contend badly with other jobs on the shared 2-core machine)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    records = scene_records(args.images, args.instances)
    modes = {
        "one per instance": CaptionSettings(
            instances_per_request=1, max_instance_chars=args.max_chars
        ),
        f"{args.group} per request": CaptionSettings(
            instances_per_request=args.group, max_instance_chars=args.max_chars
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = TransformersChatClient(str(write_tiny_vlm(Path(tmp) / "qwen2-vl", "qwen2_vl")))
        server = ChatCompletionsServer(model, served_model="tiny", max_batch=args.max_batch)
        with running(server) as url:
            client = HTTPChatClient(url, "tiny", concurrency=args.concurrency, timeout_s=600)
            for settings in modes.values():  # warm-up: first calls of each shape are slow
                run_mode(client, records, settings)
            rounds: dict[str, list[dict]] = {name: [] for name in modes}
            for _ in range(args.rounds):
                for name, settings in modes.items():
                    rounds[name].append(run_mode(client, records, settings))
    figures = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in rounds.items()
    }
    print(
        f"{args.images} images x {args.instances} instances, tiny Qwen2-VL behind the HTTP "
        f"server (max batch {args.max_batch}, {args.threads} torch thread(s)), client "
        f"concurrency {args.concurrency}, median of {args.rounds} rounds"
    )
    print("| mode | requests | s | requests/s | instance captions/s | tokens/caption | usable |")
    print("|---|---|---|---|---|---|---|")
    for name, f in figures.items():
        print(
            f"| {name} | {f['requests']:.0f} | {f['seconds']:.2f} | {f['requests_per_s']:.1f} | "
            f"{f['captions_per_s']:.1f} | {f['tokens_per_caption']:.1f} | {f['usable']:.0%} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **figures}))


if __name__ == "__main__":
    main()
