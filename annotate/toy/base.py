"""Trains the toy world's base model: a tiny SDXL (VAE, two CLIP text encoders, UNet) on the
world's global captions only.

The base never sees a box. It learns what "a red striped circle" looks like but places shapes
anywhere and binds attributes badly when a caption names several shapes: exactly what the
adapter has to fix, on top of this model frozen. The result is saved as a stock
``StableDiffusionXLPipeline`` directory (float16 weights, small enough for the repository) with
a ``training_record.json`` of the settings, timings and the verifier scores of its samples.

    python -m annotate.toy.base --out models/toy-base

A base can also be trained further: ``--init models/toy-base`` starts the UNet and both text
encoders from that base's weights and keeps its VAE; the record embeds the record of the base it
continued, so the whole history stays with the weights.

The run keeps its state in ``OUT/_state`` (the trained VAE, then the UNet stage every
``checkpoint_every`` steps), so the same command continues an interrupted run where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from annotate.toy.verifiers import detect, iou, verify
from annotate.toy.world import render, scenes
from ifadapter import tiny
from ifadapter.utils.files import atomic_open

WORLD_SEED = 1000  # scenes of the base's training pool; evaluation worlds use other seeds


@dataclass
class BaseTrainingConfig:
    seed: int = 0
    pool: int = 40_000  # training scenes, rendered and encoded once
    vae_steps: int = 1_500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    decoder_steps: int = 1_000
    decoder_batch: int = 16
    decoder_lr: float = 1e-3
    unet_steps: int = 4_000
    unet_batch: int = 32
    unet_lr: float = 7e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    eval_samples: int = 48
    eval_guidance: float = 3.0  # the guidance the demo and the shipped adapter sample at
    eval_steps: int = 25
    round_trip_scenes: int = 200
    checkpoint_every: int = 250


def base_scheduler() -> EulerDiscreteScheduler:
    """SDXL's Euler sampler and betas, rescaled to zero terminal SNR, with v-prediction.

    SDXL's betas end at a signal level of 0.068 (SNR 0.0047), tuned for 128x128 latents. On the
    toy's 16x16 latent of flat regions the mean of a shape's cells keeps that signal at an SNR
    near 0.2, so in training the UNet reads where the shapes are and what colour they have from
    the noisy latent even at t = 999, while sampling starts from pure noise: layout and colour
    were decided by the noise (frames, blank images, wrong hues). At zero terminal SNR nothing is
    left to read at t = 999, v-prediction keeps the target defined there, and "trailing" spacing
    makes it the first sampling step (Lin et al., "Common Diffusion Noise Schedules and Sample
    Steps are Flawed"). Epsilon-prediction on linear betas, tried first, drifted to flat frames
    under Euler: at a terminal sigma of 150 the first step's x0 carries every error of the
    predicted noise times 150."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )


# What a base must reach before it ships (single-shape captions, the world's verifiers, at the
# guidance the adapter samples with): the adapter steers the base, so it cannot draw better
# than the base renders one instance.
QUALITY_GATE = {"colour": 0.9, "shape": 0.6, "texture": 0.9}


def to_tensor(images: list) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def log_psnr(log: list, progress: tqdm, stage: str, step: int, mse: float) -> None:
    """PSNR of images in [-1, 1] (peak-to-peak 2) into the record and the progress bar."""
    psnr = float(10 * math.log10(4 / mse))
    log.append({"stage": stage, "step": step, "psnr": psnr})
    progress.set_postfix(psnr=f"{psnr:.1f} dB", refresh=False)


def train_vae(vae, pixels: torch.Tensor, config: BaseTrainingConfig, log: list) -> None:
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    vae.train()
    progress = tqdm(range(config.vae_steps), desc="vae", mininterval=10)
    for step in progress:
        batch = pixels[torch.randint(len(pixels), (config.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.vae_steps - 1:
            log_psnr(log, progress, "vae", step, mse.item())
    vae.eval().requires_grad_(False)


def train_decoder(vae, pixels: torch.Tensor, config: BaseTrainingConfig, log: list) -> None:
    """Sharpens the decoder with the encoder frozen (the latent space, and so everything the
    UNet learns, stays as it is), at an lr decaying to zero: the joint stage leaves corners soft
    enough that the verifiers read a square as a circle. Stable Diffusion's released VAE
    decoders were fine-tuned the same way."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    parameters = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.decoder_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.decoder_steps))
    )
    vae.decoder.train()
    progress = tqdm(range(config.decoder_steps), desc="vae decoder", mininterval=10)
    for step in progress:
        batch = pixels[torch.randint(len(pixels), (config.decoder_batch,), generator=generator)]
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample(generator)
        mse = F.mse_loss(vae.decode(latents).sample, batch)
        optimizer.zero_grad(set_to_none=True)
        mse.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.decoder_steps - 1:
            log_psnr(log, progress, "decoder", step, mse.item())
    vae.eval().requires_grad_(False)


def vae_stage(vae, pixels: torch.Tensor, config: BaseTrainingConfig, log: list, state: Path):
    """The whole VAE, kept in ``state`` and reused by a rerun."""
    if (state / "vae.safetensors").is_file():
        vae.load_state_dict(load_file(state / "vae.safetensors"))
        vae.eval().requires_grad_(False)
        log.extend(json.loads((state / "vae_log.json").read_text()))
    else:
        train_vae(vae, pixels, config, log)
        save_file(vae.state_dict(), state / "vae.safetensors")
        (state / "vae_log.json").write_text(json.dumps(log))


def decoder_stage(vae, pixels: torch.Tensor, config: BaseTrainingConfig, log: list, state: Path):
    """The decoder alone, after the UNet (whose latents come from the unchanged encoder)."""
    if (state / "decoder.safetensors").is_file():
        vae.load_state_dict(load_file(state / "decoder.safetensors"))
        log.extend(json.loads((state / "decoder_log.json").read_text()))
        return
    decoder_log: list[dict] = []
    train_decoder(vae, pixels, config, decoder_log)
    save_file(vae.state_dict(), state / "decoder.safetensors")
    (state / "decoder_log.json").write_text(json.dumps(decoder_log))
    log.extend(decoder_log)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    starts = tqdm(range(0, len(pixels), batch), desc="encode latents", unit="batch", mininterval=10)
    return torch.cat([vae.encode(pixels[i : i + batch]).latent_dist.mode() for i in starts])


def prompt_embeddings(text_encoders, ids: tuple[torch.Tensor, torch.Tensor]):
    """SDXL's conditioning: penultimate layers of both encoders, pooled projection of the second."""
    first = text_encoders[0](ids[0], output_hidden_states=True)
    second = text_encoders[1](ids[1], output_hidden_states=True)
    embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return embeds, second.text_embeds


def warmup_cosine(step: int, config: BaseTrainingConfig) -> float:
    """Linear warm-up, then a cosine to zero at the last step, so the run ends on settled weights
    rather than on the last updates at full lr (the previous base's constant lr ended with its
    loss moving by a third between logs)."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.unet_steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_unet(
    components: dict,
    latents: torch.Tensor,
    captions: list[str],
    config: BaseTrainingConfig,
    log: list,
    state_path: Path,
):
    """UNet and both text encoders trained jointly (colour is learned about twice as fast as with
    frozen random encoders); returns EMA copies of the three."""
    unet, encoders = components["unet"], [components["text_encoder"], components["text_encoder_2"]]
    ids = tuple(
        tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        for tokenizer in (components["tokenizer"], components["tokenizer_2"])
    )
    modules = torch.nn.ModuleList([unet, *encoders]).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, config))
    noise_scheduler = DDPMScheduler.from_config(base_scheduler().config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    size = latents.shape[-1] * 4
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(
        config.unet_batch, 1
    )
    first = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        modules.load_state_dict(state["modules"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        first = int(state["step"])
        log[:] = [e for e in log if e["stage"] != "unet"]
        log.extend(e for e in state["log"] if e["stage"] == "unet")
    started = time.perf_counter()
    progress = tqdm(
        range(first, config.unet_steps),
        desc="unet + text encoders",
        mininterval=10,
        initial=first,
        total=config.unet_steps,
    )
    for step in progress:
        index = torch.randint(len(latents), (config.unet_batch,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=generator
        )
        embeds, pooled = prompt_embeddings(encoders, (ids[0][index], ids[1][index]))
        keep = (torch.rand(len(x0), generator=generator) >= config.caption_dropout).float()
        prediction = unet(
            noise_scheduler.add_noise(x0, noise, t),
            t,
            embeds * keep[:, None, None],
            added_cond_kwargs={"text_embeds": pooled * keep[:, None], "time_ids": time_ids},
        ).sample
        loss = F.mse_loss(prediction, noise_scheduler.get_velocity(x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for average, current in zip(ema.parameters(), modules.parameters(), strict=True):
                average.lerp_(current, 1 - decay)
        if step % 100 == 0 or step == config.unet_steps - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            log.append(
                {
                    "stage": "unet",
                    "step": step,
                    "loss": loss.item(),
                    "seconds_per_step": (time.perf_counter() - started) / (step + 1 - first),
                }
            )
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.unet_steps:
            state = {
                "modules": modules.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
                "step": step + 1,
                "log": log,
            }
            with atomic_open(state_path) as handle:
                torch.save(state, handle)
    return ema[0], ema[1], ema[2]


@torch.no_grad()
def evaluate_base(pipe: StableDiffusionXLPipeline, config: BaseTrainingConfig) -> dict:
    """Single-shape captions: is the shape, wherever the base put it, of the right colour, shape
    and texture? The verifier looks inside the detected region of the caption's colour."""
    singles = [s for s in scenes(WORLD_SEED + 1, config.eval_samples * 4) if len(s.instances) == 1]
    singles = singles[: config.eval_samples]
    images = pipe(
        [s.caption for s in singles],
        num_inference_steps=config.eval_steps,
        guidance_scale=config.eval_guidance,
        generator=torch.Generator().manual_seed(config.seed),
    ).images
    counts = {"colour": 0, "shape": 0, "texture": 0}
    for scene, image in zip(singles, images, strict=True):
        instance = scene.instances[0]
        found = [d for d in detect(image) if d.colour == instance.colour]
        if not found:
            continue
        region = max(found, key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
        verdict = verify(image, dataclasses.replace(instance, box=region.box))
        counts["colour"] += verdict.colour
        counts["shape"] += verdict.shape
        counts["texture"] += verdict.texture
    return {key: value / len(singles) for key, value in counts.items()} | {"samples": len(singles)}


@torch.no_grad()
def vae_round_trip(vae, config: BaseTrainingConfig) -> dict:
    """Held-out renders through encode -> decode, scored as the benchmark scores a generator:
    PSNR, and per instance placement (a region of its colour with IoU >= 0.5 to its box) and
    success (placed, and that region shows the right colour, shape and texture). This is the
    bound any generator decoding through this VAE can reach."""
    held_out = scenes(WORLD_SEED + 2, config.round_trip_scenes)
    pixels = to_tensor([render(scene) for scene in held_out])
    decoded = torch.cat(
        [
            vae.decode(vae.encode(pixels[i : i + 64]).latent_dist.mode()).sample.clamp(-1, 1)
            for i in range(0, len(pixels), 64)
        ]
    )
    mse = F.mse_loss(decoded, pixels).item()
    images = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    placed = success = total = 0
    for scene, image in zip(held_out, images, strict=True):
        found = detect(image)
        for instance in scene.instances:
            total += 1
            mine = [d for d in found if d.colour == instance.colour]
            match = max(mine, key=lambda d: iou(d.box, instance.box), default=None)
            if match is None or iou(match.box, instance.box) < 0.5:
                continue
            placed += 1
            success += verify(image, dataclasses.replace(instance, box=match.box)).success
    return {
        "psnr": round(10 * math.log10(4 / mse), 2),
        "placement": placed / total,
        "ifs": success / total,
        "instances": total,
    }


def vae_log(vae_from: Path | None) -> list[dict]:
    """The VAE stages' entries of the base the VAE comes from: the record keeps how it was made."""
    if vae_from is None:
        return []
    record = json.loads((vae_from / "training_record.json").read_text())
    return [entry for entry in record["log"] if entry["stage"] in ("vae", "decoder")]


def quality_gate(scores: dict) -> dict:
    failed = {k: scores[k] for k, floor in QUALITY_GATE.items() if scores[k] < floor}
    return {"thresholds": QUALITY_GATE, "passed": not failed, "failed": failed}


def initialise_from(components: dict, base: Path) -> dict:
    """Replaces the UNet and text encoders in ``components`` by ``base``'s (float32, as trained)
    and returns its record without the log, which this run's record embeds."""
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = type(components[name])
        components[name] = model.from_pretrained(base, subfolder=name, dtype=torch.float32)
    record = json.loads((base / "training_record.json").read_text())
    return {"path": str(base)} | {k: v for k, v in record.items() if k != "log"}


def train_base(
    out: Path,
    config: BaseTrainingConfig,
    vae_from: Path | None = None,
    command: str = "",
    init_from: Path | None = None,
) -> dict:
    """Trains a base into ``out``. With ``vae_from`` (a base directory this command wrote) its
    VAE is taken as it is and both VAE stages are skipped: the UNet and text encoders are what
    a change of recipe retrains, and the VAE stages are a quarter of the run. ``init_from``
    continues a base: its UNet and text encoders are the starting point and its VAE is kept."""
    if init_from is not None:
        if vae_from not in (None, init_from):
            raise ValueError("--init keeps the VAE of the base it continues; drop --vae")
        vae_from = init_from
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    log: list[dict] = vae_log(vae_from)
    components = tiny.components("toy", seed=config.seed)
    continued = None if init_from is None else initialise_from(components, init_from)
    pool = scenes(WORLD_SEED, config.pool)
    pixels = to_tensor([render(scene) for scene in tqdm(pool, desc="render", mininterval=10)])
    captions = [scene.caption for scene in pool]

    state = out / "_state"
    state.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    if vae_from is None:
        vae = components["vae"]
        vae_stage(vae, pixels, config, log, state)
    else:
        vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae", dtype=torch.float32)
        vae.eval().requires_grad_(False)
    vae_seconds = time.perf_counter() - tick
    latents = encode_latents(vae, pixels)
    if vae_from is None:
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
    scaling = float(vae.config.scaling_factor)

    tick = time.perf_counter()
    unet, text_encoder, text_encoder_2 = train_unet(
        components, latents * scaling, captions, config, log, state / "unet.pt"
    )
    unet_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    if vae_from is None:
        decoder_stage(vae, pixels, config, log, state)
    vae_seconds += time.perf_counter() - tick
    round_trip = vae_round_trip(vae, config)
    print(f"vae round trip on held-out renders: {round_trip}", flush=True)

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=components["tokenizer"],
        tokenizer_2=components["tokenizer_2"],
        unet=unet,
        scheduler=base_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    scores = evaluate_base(pipe, config)
    gate = quality_gate(scores)
    pipe.to(torch.float16).save_pretrained(out)
    shutil.rmtree(state)
    record = {
        "command": command or f"python -m annotate.toy.base --out {out}",
        "config": asdict(config),
        "vae_from": None if vae_from is None else str(vae_from),
        "continued_from": continued,
        "vae_minutes_this_run": round(vae_seconds / 60, 1),
        "unet_minutes_this_run": round(unet_seconds / 60, 1),
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
        "vae_scaling_factor": scaling,
        "single_shape_scores": scores,
        "quality_gate": gate,
        "vae_round_trip": round_trip,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "torch_threads": torch.get_num_threads(),
        "log": log,
    }
    (out / "training_record.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--vae", type=Path, help="take the VAE of this base directory and skip its two stages"
    )
    parser.add_argument(
        "--init", type=Path, help="continue this base: start from its UNet, encoders and VAE"
    )
    defaults = BaseTrainingConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out, vae_from, init_from = args.pop("out"), args.pop("vae"), args.pop("init")
    command = shlex.join(["python", "-m", "annotate.toy.base", *(argv or sys.argv[1:])])
    record = train_base(out, BaseTrainingConfig(**args), vae_from, command, init_from)
    print(json.dumps({k: v for k, v in record.items() if k != "log"}, indent=2))
    if not record["quality_gate"]["passed"]:
        raise SystemExit(f"the base fails its quality gate: {record['quality_gate']['failed']}")


if __name__ == "__main__":
    main()
