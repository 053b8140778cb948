"""Cost of one denoising step of the adapted SDXL UNet against the base UNet.

Real SDXL 1.0 widths (random weights), a small latent so it runs on a CPU. For 1, 4, 16 and 64
instances it times, side by side in one run and interleaved so that machine noise hits every
variant alike:

- ``base``: the stock UNet;
- ``ifadapter``: the 13 appearance + EoT tokens per instance, projected once per generation;
- ``per-step``: the same, but the instance tokens projected again at every step;
- ``77 tokens``: every token of every description fed to the ISM instead (the paper's motivation
  for the resampler).

Reported: median step time and ratio to the base step measured in the same round, and the peak
memory a step adds over the resident model (CUDA allocator peak on a GPU; on the CPU the peak
resident set sampled every millisecond, with glibc told to return freed blocks at once).

    python -m benchmarks.adapter_step [--latent 32] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    # glibc must hand freed blocks back at once for resident-set peaks to mean anything.
    os.environ.update(MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.adapter_step", *sys.argv[1:]])

import torch  # noqa: E402

from ifadapter import IFAdapter, tiny  # noqa: E402

COUNTS = (1, 4, 16, 64)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """Seconds and peak extra bytes of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        tick = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - tick, torch.cuda.max_memory_allocated() - start_bytes
    start_bytes = resident_bytes()
    peak = [start_bytes]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tick = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - tick
    done.set()
    sampler.join()
    return elapsed, max(peak[0], resident_bytes()) - start_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (128 = 1024 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    tick = time.perf_counter()
    unet = tiny.build_unet("sdxl").to(device)
    adapter = IFAdapter.for_unet(unet).to(device).eval()
    if dtype != torch.float32:
        unet.to(dtype=dtype)
        adapter.to(dtype=dtype)
    adapter.install(unet)
    print(
        f"SDXL UNet {sum(p.numel() for p in unet.parameters()) / 1e9:.2f}B params, adapter "
        f"{sum(p.numel() for p in adapter.parameters()) / 1e6:.0f}M params over "
        f"{len(adapter.config.layers)} layers; built in {time.perf_counter() - tick:.0f}s on "
        f"{device} ({torch.get_num_threads()} threads), latent {args.latent}x{args.latent}"
    )

    side, dim = args.latent, unet.config.cross_attention_dim
    sample = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    context = torch.randn(1, 77, dim, device=device, dtype=dtype)
    added = {
        "text_embeds": torch.randn(1, 1280, device=device, dtype=dtype),
        "time_ids": torch.tensor(
            [[side * 8, side * 8, 0, 0, side * 8, side * 8]], device=device, dtype=dtype
        ),
    }
    timestep = torch.tensor(500, device=device)

    def step() -> None:
        unet(sample, timestep, context, added_cond_kwargs=added)

    def boxes_for(count: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(count)
        corner = torch.rand(1, count, 2, generator=generator) * 0.6
        size = 0.1 + torch.rand(1, count, 2, generator=generator) * 0.3
        return torch.cat([corner, corner + size], -1).to(device, dtype)

    latent = (side, side)
    variants: dict[str, Callable[[], None]] = {"base": step}
    one_off = {}
    held_conditionings, held_word_conditionings = {}, {}
    with torch.inference_mode():
        for count in COUNTS:
            boxes, mask = boxes_for(count), torch.ones(1, count, dtype=torch.bool, device=device)
            tokens = torch.randn(
                1, count, adapter.tokens_per_instance, dim, device=device, dtype=dtype
            )
            words = torch.randn(1, count, 77, dim, device=device, dtype=dtype)
            precomputed = adapter.conditioning(tokens, boxes, mask, latent)
            all_words = adapter.conditioning(words, boxes, mask, latent)

            def adapted(c=precomputed) -> None:
                with adapter.activated(c):
                    step()

            def per_step(t=tokens, b=boxes, m=mask) -> None:
                with adapter.activated(adapter.conditioning(t, b, m, latent)):
                    step()

            variants[f"ifadapter/{count}"] = adapted
            variants[f"per-step/{count}"] = per_step
            variants[f"77 tokens/{count}"] = lambda c=all_words: adapted(c)

            features_words = torch.randn(count, 3, 20, dim, device=device, dtype=dtype)
            word_mask = torch.ones(count, 20, dtype=torch.bool, device=device)

            def tokens_once(w=features_words, wm=word_mask, b=boxes, m=mask, n=count) -> None:
                out = adapter.resampler(w.reshape(n * 3, 20, dim), wm.repeat_interleave(3, 0))
                adapter.conditioning(out.reshape(1, n, -1, dim), b, m, latent)

            one_off[count] = tokens_once
            held_conditionings[count] = precomputed
            held_word_conditionings[count] = all_words

        for fn in variants.values():  # warm-up
            fn()
        names = [name for name in variants if name != "base"]
        times = {name: [] for name in variants}
        ratios = {name: [] for name in names}
        peaks = {name: [] for name in variants}
        for _ in range(args.repeats):
            # base, v1, base, v2, ..., base: each variant is compared with the mean of the two
            # base steps around it, so drift in the machine's load cancels out.
            before, peak = measure(step, device)
            times["base"].append(before)
            peaks["base"].append(peak)
            for name in names:
                seconds, peak = measure(variants[name], device)
                after, base_peak = measure(step, device)
                times[name].append(seconds)
                peaks[name].append(peak)
                ratios[name].append(seconds / ((before + after) / 2))
                times["base"].append(after)
                peaks["base"].append(base_peak)
                before = after
        once = {
            count: statistics.median(measure(fn, device)[0] for _ in range(3))
            for count, fn in one_off.items()
        }

    def held_mib(conditioning) -> float:
        tensors = (*conditioning.keys.values(), *conditioning.values.values())
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    base_median = statistics.median(times["base"])
    base_peak = statistics.median(peaks["base"])
    rows = []
    print(
        f"\nmedians of {args.repeats} rounds; ratio = step / mean of the base steps just before "
        "and after it;\npeak = the step's peak memory above the resident model; held = instance "
        "keys and values kept for the whole generation"
    )
    print(
        f"{'variant':<12}{'instances':>10}{'step s':>10}{'ratio':>8}{'peak MiB':>10}{'+MiB':>8}"
        f"{'held MiB':>10}"
    )
    print(f"{'base':<12}{'-':>10}{base_median:>10.3f}{1:>8.3f}{base_peak / 2**20:>10.0f}")
    for count in COUNTS:
        for kind in ("ifadapter", "per-step", "77 tokens"):
            name = f"{kind}/{count}"
            held = held_word_conditionings if kind == "77 tokens" else held_conditionings
            row = {
                "variant": kind,
                "instances": count,
                "step_s": statistics.median(times[name]),
                "ratio": statistics.median(ratios[name]),
                "peak_mib": statistics.median(peaks[name]) / 2**20,
                "extra_mib": (statistics.median(peaks[name]) - base_peak) / 2**20,
                "held_mib": held_mib(held[count]) if kind != "per-step" else 0.0,
            }
            rows.append(row)
            print(
                f"{kind:<12}{count:>10}{row['step_s']:>10.3f}{row['ratio']:>8.3f}"
                f"{row['peak_mib']:>10.0f}{row['extra_mib']:>8.0f}{row['held_mib']:>10.0f}"
            )
    print("\nper generation (once, not per step): resampler + projections")
    for count, seconds in once.items():
        print(f"{count:>4} instances: {seconds:.3f}s = {seconds / base_median:.2f} base steps")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": str(device),
                    "dtype": args.dtype,
                    "latent": side,
                    "base_step_s": base_median,
                    "base_peak_mib": base_peak / 2**20,
                    "rows": rows,
                    "per_generation_s": once,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
