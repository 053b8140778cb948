"""The GPU check: SDXL at 1024 px in fp16 and bf16, real widths, random weights.

Nothing in the project had run at the size its users run it; this script is what to run on the
first GPU machine at hand. It needs PyTorch with CUDA, diffusers, transformers and open_clip's
BPE vocabulary (no network, no weights), finishes in a few minutes on one H100, and measures:

- **steps**: the base UNet step and the adapted step at 1 / 4 / 16 / 64 instances, per dtype
  (float16, bfloat16), at batch 2 (guidance's two branches) on a 128x128 latent: median seconds
  over interleaved rounds, the ratio to the base steps just before and after (same run), the
  allocator's peak and what the step adds over the resident models, and whether the output is
  finite;
- **tokens**: the once-per-generation cost of N instances: both text encoders on the
  descriptions, then the resampler and every ISM layer's key/value projection for guidance's
  two branches (what ``IFAdapterSDXLPipeline.instance_conditioning`` does);
- **levels**: the peak memory of one ISM layer per instance at the 32x32 level (where the
  released adapter acts) and the 64x64 level, against ``B * cells * channels * bytes`` (one
  per-instance map), and from the step figures the instance count at which a 24 GB and an
  80 GB card run out;
- **training**: one optimiser step of the adapter (bf16 autocast over a bf16 UNet, as
  ``training.loop.AdapterTrainer`` runs on a GPU; gradient checkpointing with the adapter's
  conditioning replayed) at batch 1 / 4 / 8 with 8 instances per sample: samples/s, peak
  memory, and whether every adapter gradient is finite.

It prints a table per section and writes every figure to ``--out`` as JSON. ``--smoke`` runs
the same code on the tiny SDXL (16x16 latent, 1 and 4 instances, batch 1 and 2) and takes
seconds on a CPU; the test suite runs it so the script stays runnable between GPU sessions.

    python -m benchmarks.gpu_check --out gpu_check.json          # on the GPU machine
    python -m benchmarks.gpu_check --smoke --out /tmp/smoke.json  # anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from ifadapter import IFAdapter, tiny
from ifadapter.adapter import checkpoint_with_conditioning
from ifadapter.attention_processor import IFAdapterAttnProcessor
from ifadapter.layout import Layout, LayoutTensors
from ifadapter.loss import DiffusionBatch, diffusion_loss, freeze_base
from ifadapter.text import InstanceFeatures, encode_instances

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
GIB = 2**30
MIB = 2**20
CARDS_GB = (24, 80)
# One ISM layer per level: the mid block sits at 1/4 of the latent's side (32x32 at 1024 px,
# where the released adapter acts), up_blocks.1 at 1/2 (64x64).
LEVEL_LAYERS = {
    4: "mid_block.attentions.0.transformer_blocks.0.attn2",
    2: "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
}
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
THINGS = ("ceramic mug", "wooden chair", "striped cat", "glass vase", "leather bag", "bicycle")


@dataclass(frozen=True)
class Profile:
    size: tiny.Size
    latent: int
    counts: tuple[int, ...]
    repeats: int
    train_batches: tuple[int, ...]
    train_instances: int
    train_repeats: int


FULL = Profile("sdxl", 128, (1, 4, 16, 64), 10, (1, 4, 8), 8, 3)
SMOKE = Profile("tiny", 16, (1, 4), 2, (1, 2), 2, 1)
BATCH = 2  # guidance: the unconditional and the conditional branch in one UNet call


class Meter:
    """Seconds and allocator peaks of calls on one device (no memory figures on a CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None

    def __call__(self, fn: Callable[[], object]) -> tuple[float, int | None, int | None]:
        """(seconds, peak bytes, peak bytes above what was allocated before the call)."""
        self.sync()
        before = self.allocated()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        tick = time.perf_counter()
        fn()
        self.sync()
        seconds = time.perf_counter() - tick
        if not self.cuda:
            return seconds, None, None
        peak = torch.cuda.max_memory_allocated()
        return seconds, peak, peak - before


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def build(profile: Profile, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The UNet and an adapter with open gates (an untrained adapter's zero gates would leave
    the ISM's output unused, which hides an overflow), made on the device in float32 and
    cast to ``dtype``: random weights, as a loader with ``dtype=`` would hold real ones."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = tiny.build_unet(profile.size, seed)
        adapter = IFAdapter.for_unet(unet, **tiny.adapter_config(profile.size))
    with torch.no_grad():
        for layer in adapter.ism_layers.values():
            layer.gate.fill_(0.5)
    return unet.to(dtype), adapter.to(dtype).eval()


def unet_inputs(unet, profile: Profile, batch: int, device, dtype) -> dict:
    side, pixels = profile.latent, profile.latent * 8
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * (
        unet.config.addition_time_embed_dim
    )
    return {
        "sample": torch.randn(batch, 4, side, side, device=device, dtype=dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(
            batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype
        ),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor(
                [[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=device, dtype=dtype
            ),
        },
    }


def random_boxes(batch: int, count: int, device, dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch, count, 2, generator=generator) * 0.6
    size = 0.1 + torch.rand(batch, count, 2, generator=generator) * 0.3
    return torch.cat([corner, corner + size], -1).to(device, dtype)


def layouts(count: int) -> list[Layout]:
    boxes = random_boxes(1, count, "cpu", torch.float32, count)[0].tolist()
    return [
        Layout(
            caption="a room full of things",
            instances=[
                {
                    "box": box,
                    "caption": f"a {COLOURS[i % len(COLOURS)]} {THINGS[i % len(THINGS)]} with "
                    f"a {COLOURS[(i + 3) % len(COLOURS)]} pattern, seen from the left",
                }
                for i, box in enumerate(boxes)
            ],
        )
    ]


def layer_shapes(profile: Profile) -> UNet2DConditionModel:
    """The UNet on the meta device: its layer names and widths, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel(**tiny.unet_config(profile.size))


def steps(profile: Profile, device: torch.device, name: str, meter: Meter) -> dict:
    """Base and adapted UNet steps of one dtype, interleaved as in benchmarks.adapter_step."""
    dtype = DTYPES[name]
    unet, adapter = build(profile, device, dtype)
    adapter.install(unet)
    resident = meter.allocated()
    inputs = unet_inputs(unet, profile, BATCH, device, dtype)
    dim = unet.config.cross_attention_dim
    latent = (profile.latent, profile.latent)
    outputs: dict[str, torch.Tensor] = {}

    def run(key: str, conditioning=None) -> Callable[[], None]:
        def call() -> None:
            with adapter.activated(conditioning):
                outputs[key] = unet(**inputs).sample

        return call

    variants = {"base": run("base")}
    with torch.inference_mode():
        for count in profile.counts:
            tokens = torch.randn(
                BATCH, count, adapter.tokens_per_instance, dim, device=device, dtype=dtype
            )
            boxes = random_boxes(BATCH, count, device, dtype, count)
            mask = torch.ones(BATCH, count, dtype=torch.bool, device=device)
            conditioning = adapter.conditioning(tokens, boxes, mask, latent)
            variants[str(count)] = run(str(count), conditioning)
        for call in variants.values():  # warm-up: kernels chosen, allocator grown
            call()
        times: dict[str, list] = {key: [] for key in variants}
        peaks: dict[str, list] = {key: [] for key in variants}
        extras: dict[str, list] = {key: [] for key in variants}
        ratios: dict[str, list] = {key: [] for key in variants if key != "base"}
        before = meter(variants["base"])
        for _ in range(profile.repeats):
            for key in ratios:
                seconds, peak, extra = meter(variants[key])
                after = meter(variants["base"])
                for record, (s, p, e) in ((key, (seconds, peak, extra)), ("base", after)):
                    times[record].append(s)
                    peaks[record].append(p)
                    extras[record].append(e)
                ratios[key].append(seconds / ((before[0] + after[0]) / 2))
                before = after
    rows = [
        {
            "instances": 0 if key == "base" else int(key),
            "step_s": median(times[key]),
            "ratio": 1.0 if key == "base" else median(ratios[key]),
            "peak_bytes": median(peaks[key]),
            "extra_bytes": median(extras[key]),
            "finite": bool(torch.isfinite(outputs[key]).all()),
        }
        for key in variants
    ]
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapter.parameters())
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    return {
        "resident_bytes": resident,
        "unet_bytes": unet_bytes,
        "adapter_bytes": adapter_bytes,
        "rows": rows,
    }


def token_cost(profile: Profile, device: torch.device, name: str, meter: Meter) -> list[dict]:
    """Once per generation: text encoders, resampler and K/V projections for both branches."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dtype = DTYPES[name]
    shape = layer_shapes(profile)
    tokenizers = tiny.clip_tokenizers()
    first, second = tiny.text_encoder_configs(profile.size)
    torch.manual_seed(0)
    with torch.device(device):
        encoders = [
            CLIPTextModel(first).to(dtype).eval(),
            CLIPTextModelWithProjection(second).to(dtype).eval(),
        ]
        adapter = IFAdapter.for_unet(shape, **tiny.adapter_config(profile.size)).to(dtype).eval()
    rows = []
    layer_ids = adapter.config.text_encoder_layers
    latent = (profile.latent, profile.latent)
    with torch.inference_mode():
        for count in profile.counts:
            tensors = LayoutTensors.from_layouts(layouts(count))
            found: dict[str, InstanceFeatures] = {}

            def encode(t=tensors, store=found) -> None:
                store["features"] = encode_instances(tokenizers, encoders, t, layer_ids)

            def project(store=found) -> None:
                features = store["features"]
                drop = torch.zeros(features.batch_size, device=device)
                tokens = torch.cat(
                    [
                        adapter.instance_tokens(features, keep_local=drop),
                        adapter.instance_tokens(features),
                    ]
                )
                boxes, mask = features.boxes, features.mask
                adapter.conditioning(tokens, boxes.repeat(2, 1, 1), mask.repeat(2, 1), latent)

            encode()
            project()  # warm-up
            text = median([meter(encode)[0] for _ in range(3)])
            adapted = median([meter(project)[0] for _ in range(3)])
            rows.append({"instances": count, "text_encoders_s": text, "adapter_s": adapted})
    return rows


def ism_levels(profile: Profile, device: torch.device, meter: Meter) -> list[dict]:
    """Peak memory of one ISM layer (no_grad, float16) per instance at two UNet levels."""
    dtype = torch.float16
    torch.manual_seed(0)
    shape = layer_shapes(profile)
    rows = []
    for divisor, name in LEVEL_LAYERS.items():
        with torch.device(device):
            adapter = IFAdapter.for_unet(shape, [name], **tiny.adapter_config(profile.size))
        adapter = adapter.to(dtype).eval()
        attention = shape.get_submodule(name)
        channels, heads = attention.to_q.out_features, attention.heads
        side = profile.latent // divisor
        cells = side * side
        processor = IFAdapterAttnProcessor(name, adapter.ism_layer(name), adapter)
        query = torch.randn(BATCH, heads, cells, channels // heads, device=device, dtype=dtype)
        dim = adapter.config.cross_attention_dim
        peaks = {}
        for count in (1, *profile.counts[-2:]):
            tokens = torch.randn(
                BATCH, count, adapter.tokens_per_instance, dim, device=device, dtype=dtype
            )
            boxes = random_boxes(BATCH, count, device, dtype, count)
            mask = torch.ones(BATCH, count, dtype=torch.bool, device=device)
            with torch.inference_mode():
                conditioning = adapter.conditioning(tokens, boxes, mask, (side, side))
                conditioning.grid(cells)  # box masks are held for the generation

                def call(c=conditioning, p=processor, q=query, h=heads) -> None:
                    p.instance_semantic_map(c, q, h)

                call()
                peaks[count] = meter(call)[2]
        low, high = profile.counts[-2], profile.counts[-1]
        slope = None if peaks[high] is None else (peaks[high] - peaks[low]) / (high - low)
        one_map = BATCH * cells * channels * torch.finfo(dtype).bits // 8
        rows.append(
            {
                "layer": name,
                "level": f"{side}x{side}",
                "channels": channels,
                "peak_bytes": {str(k): v for k, v in peaks.items()},
                "per_instance_bytes": slope,
                "one_map_bytes": one_map,
                "maps_per_instance": None if slope is None else slope / one_map,
            }
        )
    return rows


def training(profile: Profile, device: torch.device, meter: Meter) -> list[dict]:
    """Adapter optimiser steps at several batch sizes, as AdapterTrainer runs them on a GPU."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        unet = tiny.build_unet(profile.size, 0).to(dtype)
        adapter = IFAdapter.for_unet(unet, **tiny.adapter_config(profile.size))
    with torch.no_grad():  # open gates, so every adapter parameter gets a gradient
        for layer in adapter.ism_layers.values():
            layer.gate.fill_(0.1)
    adapter.install(unet)
    parameters = freeze_base(adapter, unet)
    unet.enable_gradient_checkpointing(checkpoint_with_conditioning(adapter))
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    dim = unet.config.cross_attention_dim
    layers = len(adapter.config.text_encoder_layers)
    rows = []
    for batch_size in profile.train_batches:
        n, words = profile.train_instances, 20
        inputs = unet_inputs(unet, profile, batch_size, device, torch.float32)
        batch = DiffusionBatch(
            latents=inputs["sample"],
            prompt_embeds=inputs["encoder_hidden_states"],
            pooled_prompt_embeds=inputs["added_cond_kwargs"]["text_embeds"],
            time_ids=inputs["added_cond_kwargs"]["time_ids"],
            instances=InstanceFeatures(
                words=torch.randn(batch_size, n, layers, words, dim, device=device),
                word_mask=torch.ones(batch_size, n, words, dtype=torch.bool, device=device),
                eot=torch.randn(batch_size, n, dim, device=device),
                boxes=random_boxes(batch_size, n, device, torch.float32, n),
                mask=torch.ones(batch_size, n, dtype=torch.bool, device=device),
            ),
        )
        finite = [True]

        def step(b=batch, ok=finite) -> None:
            with torch.autocast(device.type, dtype=dtype):
                loss = diffusion_loss(adapter, unet, scheduler, b, timestep_sampling="cubic")
            loss.backward()
            ok[0] = ok[0] and all(
                p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in parameters
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up; AdamW's state is allocated here
        measured = [meter(step) for _ in range(profile.train_repeats)]
        seconds = median([m[0] for m in measured])
        rows.append(
            {
                "batch": batch_size,
                "instances_per_sample": n,
                "step_s": seconds,
                "samples_per_s": batch_size / seconds,
                "peak_bytes": median([m[1] for m in measured]),
                "gradients_finite": finite[0],
            }
        )
    return rows


def fits(result: dict) -> dict:
    """Instances per layout at which a card runs out: the resident models plus the step's
    growth per instance (from the step figures at the two largest counts)."""
    answer = {}
    for name, run in result["steps"].items():
        rows = [r for r in run["rows"] if r["peak_bytes"] is not None]
        if len(rows) < 3:
            return {}
        low, high = rows[-2], rows[-1]
        per_instance = (high["peak_bytes"] - low["peak_bytes"]) / (
            high["instances"] - low["instances"]
        )
        base = rows[0]["peak_bytes"]
        answer[name] = {
            "per_instance_bytes": per_instance,
            **{
                f"{card}GB": int((card * GIB - base) / per_instance) if per_instance > 0 else None
                for card in CARDS_GB
            },
        }
    return answer


def print_tables(result: dict) -> None:
    print(
        f"\n{result['device']} | torch {result['torch']} | latent {result['latent']}x"
        f"{result['latent']} | batch {BATCH} | {result['profile']}"
    )
    print("\nUNet step: medians; ratio = step / mean of the base steps just before and after")
    print(
        f"{'dtype':<10}{'instances':>10}{'step s':>10}{'ratio':>8}{'peak GiB':>10}"
        f"{'+MiB':>8}{'finite':>8}"
    )
    for name, run in result["steps"].items():
        for row in run["rows"]:
            label = row["instances"] or "base"
            print(
                f"{name:<10}{label:>10}{row['step_s']:>10.4f}{row['ratio']:>8.3f}"
                f"{gib(row['peak_bytes']):>10}{mib(row['extra_bytes']):>8}{row['finite']!s:>8}"
            )
    print("\nonce per generation: text encoders, then resampler + K/V of both branches")
    print(f"{'dtype':<10}{'instances':>10}{'encoders s':>12}{'adapter s':>11}{'base steps':>12}")
    for name, rows in result["tokens"].items():
        base = result["steps"][name]["rows"][0]["step_s"]
        for row in rows:
            total = row["text_encoders_s"] + row["adapter_s"]
            print(
                f"{name:<10}{row['instances']:>10}{row['text_encoders_s']:>12.4f}"
                f"{row['adapter_s']:>11.4f}{total / base:>12.2f}"
            )
    print("\none ISM layer, float16, no grad: peak MiB per instance against one instance's map")
    for row in result["levels"]:
        per = row["per_instance_bytes"]
        maps = row["maps_per_instance"]
        print(
            f"{row['level']:>8} ({row['channels']} ch): {mib(per)} MiB/instance, one map "
            f"{row['one_map_bytes'] / MIB:.1f} MiB"
            + ("" if maps is None else f" -> {maps:.1f} maps")
        )
    for name, answer in result["fits"].items():
        cards = ", ".join(f"{k}: {v}" for k, v in answer.items() if k.endswith("GB"))
        print(
            f"{name}: +{answer['per_instance_bytes'] / MIB:.1f} MiB per instance per step; "
            f"instances that fit: {cards}"
        )
    print("\ntraining step: bf16 autocast, bf16 UNet, gradient checkpointing with replay")
    print(f"{'batch':>6}{'step s':>10}{'samples/s':>11}{'peak GiB':>10}{'grads ok':>10}")
    for row in result["training"]:
        print(
            f"{row['batch']:>6}{row['step_s']:>10.3f}{row['samples_per_s']:>11.2f}"
            f"{gib(row['peak_bytes']):>10}{row['gradients_finite']!s:>10}"
        )
    print(f"\nwall time {result['wall_s']:.0f}s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny SDXL: seconds on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="rounds of the step timing")
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    if args.repeats:
        profile = Profile(**{**asdict(profile), "repeats": args.repeats})
    device = torch.device(args.device)
    meter = Meter(device)
    # diffusers warns at every cast of a model built in float32, which is how this script
    # makes its random models in a half precision.
    diffusers_logging.set_verbosity_error()
    tick = time.perf_counter()
    result: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "profile": "smoke" if args.smoke else "full",
        "latent": profile.latent,
        "batch": BATCH,
        "steps": {},
        "tokens": {},
    }
    for name in DTYPES:
        result["steps"][name] = steps(profile, device, name, meter)
        result["tokens"][name] = token_cost(profile, device, name, meter)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["levels"] = ism_levels(profile, device, meter)
    result["fits"] = fits(result)
    result["training"] = training(profile, device, meter)
    result["wall_s"] = time.perf_counter() - tick
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
