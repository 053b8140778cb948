"""The training loop on each Ray Train worker.

``AdapterTrainer`` is one worker's share of a run and knows nothing of Ray: the frozen UNet (eval
mode, no gradients), the adapter (the only parameters the optimiser sees, data-parallel when
wrapped), AdamW with linear warm-up, gradient accumulation and clipping, optional EMA, and the
checkpoint files. ``train_worker`` is the function Ray Train runs on every worker: it restores
the latest checkpoint, wraps the adapter with ``prepare_model`` and reports metrics and
checkpoints.

Checkpoint directory (one per reported step; rank 0 writes all but the RNG files):

- ``adapter/``: ``config.json`` + ``ifadapter.safetensors`` (raw weights, docs/design.md);
- ``optimizer.pt``: AdamW's state dict, loaded with ``torch.load(weights_only=True)``;
- ``ema.safetensors``: the EMA weights, when EMA is on;
- ``trainer_state.json``: step (the data position, see ``training.samples``), learning-rate
  schedule and EMA step;
- ``rng-rank{r}.safetensors``: each worker's torch RNG states. The loop draws from seeded
  generators only; these keep anything that draws from the global RNG exact as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn

from ifadapter import DEFAULT_LAYER_PATTERNS, IFAdapter, diffusion_loss
from ifadapter.adapter import WEIGHTS_NAME, checkpoint_with_conditioning
from ifadapter.loss import freeze_base
from ifadapter.utils.files import atomic_directory
from training.cache import CacheInfo
from training.config import TrainConfig
from training.metrics import MetricsLog, StepMetrics
from training.samples import BatchPlan, CachedSamples

ADAPTER_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def new_adapter(unet: UNet2DConditionModel, config: TrainConfig) -> IFAdapter:
    """A fresh adapter for ``unet`` with the profile's settings."""
    settings = dict(config.adapter)
    patterns = settings.pop("layer_patterns", DEFAULT_LAYER_PATTERNS)
    return IFAdapter.for_unet(unet, patterns, **settings)


def check_cache(adapter: IFAdapter, info: CacheInfo) -> None:
    """The cache must hold the text features this adapter reads."""
    if tuple(info.text_encoder_layers) != tuple(adapter.config.text_encoder_layers):
        raise ValueError(
            f"the cache holds text-encoder layers {info.text_encoder_layers} but the adapter "
            f"reads {list(adapter.config.text_encoder_layers)}"
        )
    if info.text_dim != adapter.config.cross_attention_dim:
        raise ValueError(
            f"the cache's text features are {info.text_dim}-d but the adapter expects "
            f"{adapter.config.cross_attention_dim}-d: the UNet and the text encoders of "
            "the base do not match"
        )


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) as a fraction of ``config.lr``."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "cosine":
        progress = (step - warmup) / max(config.max_steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


class AdapterTrainer:
    """One worker's share of a run: frozen base, trainable adapter, optimiser, data position."""

    def __init__(
        self,
        config: TrainConfig,
        samples: CachedSamples,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        """``autocast_dtype`` None follows the config: autocast in ``mixed_precision`` (bf16
        or fp16) on a GPU, float32 elsewhere (half-precision kernels are slow on a
        CPU). A dtype runs that autocast on any device (the half-precision tests run both
        on the CPU); float16 adds loss scaling, which its narrow exponent range needs. The
        frozen UNet is held in the autocast dtype, the adapter's weights in float32."""
        self.config, self.samples, self.device = config, samples, device
        self.rank, self.world_size = rank, world_size
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        self.autocast_dtype = autocast_dtype or (half if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=self.autocast_dtype == torch.float16
        )
        self.unet = UNet2DConditionModel.from_pretrained(
            config.base, subfolder="unet", dtype=self.autocast_dtype or torch.float32
        )
        self.noise_scheduler = DDPMScheduler.from_pretrained(config.base, subfolder="scheduler")
        torch.manual_seed(config.seed)  # every worker starts from the same adapter
        self.adapter = new_adapter(self.unet, config)
        check_cache(self.adapter, samples.info)
        self.adapter.install(self.unet)
        parameters = freeze_base(self.adapter, self.unet)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing(checkpoint_with_conditioning(self.adapter))
        self.unet.to(device)
        self.adapter.to(device)
        self.model: nn.Module = self.adapter
        gates = {id(p) for n, p in self.adapter.named_parameters() if n.endswith(".gate")}
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in parameters if id(p) not in gates]},
                {
                    "params": [p for p in parameters if id(p) in gates],
                    "lr": config.lr * config.gate_lr_scale,
                    "weight_decay": 0.0,
                },
            ],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(config, step)
        )
        self.ema = (
            EMAModel(parameters, decay=config.ema_decay, foreach=True) if config.ema_decay else None
        )
        self.plan = BatchPlan(samples.image_buckets, config.global_batch_size, config.seed)

    def wrap(self, prepare: Callable[[nn.Module], nn.Module]) -> None:
        """Wraps the adapter for data parallelism (``ray.train.torch.prepare_model``)."""
        self.model = prepare(self.adapter)

    def step(self, step: int) -> StepMetrics:
        """Optimiser step ``step`` (0-based): every micro-batch of this worker, then the update."""
        config = self.config
        tick = time.perf_counter()
        total = torch.zeros((), device=self.device)
        accumulation = config.gradient_accumulation
        for index in range(accumulation):
            epoch, images, positions = self.plan.micro_batch(
                step, index, self.rank, self.world_size, config.batch_size
            )
            batch = self.samples.collate(images, epoch, self.device)
            last = index == accumulation - 1
            no_sync = getattr(self.model, "no_sync", None)
            with no_sync() if no_sync and not last else contextlib.nullcontext():
                with torch.autocast(
                    self.device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                ):
                    loss = diffusion_loss(
                        self.model,
                        self.unet,
                        self.noise_scheduler,
                        batch,
                        config.drop_local,
                        config.drop_global,
                        self.plan.generators(step, positions),
                        config.timestep_sampling,
                    )
                self.scaler.scale(loss / accumulation).backward()
            total += loss.detach() / accumulation
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), config.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.adapter.parameters())
        if self.world_size > 1:
            dist.all_reduce(total)
            total /= self.world_size
        loss_value = total.item()
        return StepMetrics(
            step=step + 1,
            epoch=epoch,
            loss=loss_value,
            lr=lr,
            grad_norm=float(grad_norm),
            samples_per_s=config.global_batch_size / (time.perf_counter() - tick),
        )

    # ----------------------------------------------------------------- checkpoints

    def save(self, directory: Path, step: int) -> None:
        """This worker's part of the checkpoint after ``step`` optimiser steps."""
        if self.rank == 0:
            self.adapter.save_pretrained(directory / ADAPTER_DIR)
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
            state = {"step": step, "lr_schedule": self.lr_schedule.state_dict()}
            if self.ema is not None:
                names = [name for name, _ in self.adapter.named_parameters()]
                shadow = dict(zip(names, self.ema.shadow_params, strict=True))
                save_file({k: v.contiguous() for k, v in shadow.items()}, directory / EMA_FILE)
                state["ema_step"] = self.ema.optimization_step
            (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        save_file(states, directory / rng_file(self.rank))

    def load(self, directory: Path) -> int:
        """Restores everything from a checkpoint directory; returns its step."""
        state = json.loads((directory / STATE_FILE).read_text())
        self.adapter.load_state_dict(load_file(directory / ADAPTER_DIR / WEIGHTS_NAME))
        self.optimizer.load_state_dict(
            torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        )
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.ema is not None:
            shadow = load_file(directory / EMA_FILE, device=str(self.device))
            ema_state = self.ema.state_dict()
            ema_state["shadow_params"] = [shadow[n] for n, _ in self.adapter.named_parameters()]
            ema_state["optimization_step"] = state["ema_step"]
            self.ema.load_state_dict(ema_state)
        rng = directory / rng_file(self.rank)
        if rng.is_file():  # absent when the run was resumed on more workers
            states = load_file(rng)
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])
        return int(state["step"])

    def export(self, directory: Path) -> None:
        """The final adapter (EMA weights when EMA is on) in the checkpoint format (docs/design.md),
        written beside and then renamed over ``directory``."""
        parameters = list(self.adapter.parameters())
        if self.ema is not None:
            self.ema.store(parameters)
            self.ema.copy_to(parameters)
        try:
            with atomic_directory(directory) as temporary:
                self.adapter.save_pretrained(temporary)
        finally:
            if self.ema is not None:
                self.ema.restore(parameters)


def train_worker(loop_config: dict) -> None:
    """What Ray Train runs on every worker."""
    import ray.train
    import ray.train.torch
    from ray.train.v2._internal.execution import context as train_context

    # Ray Train logs every report ("Reporting training result N ...") at INFO on a logger named
    # by its file: lines that bury the progress bar. Warnings and errors still show.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    config = TrainConfig.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.cpus_per_worker)
    trainer = AdapterTrainer(config, CachedSamples(loop_config["cache"]), device, rank, world_size)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = trainer.load(Path(directory))
    # A micro-batch whose views lost every instance to the crop leaves the ISM layers unused.
    trainer.wrap(
        lambda module: ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
    )
    log = MetricsLog(run_dir, start, world_size) if rank == 0 else None
    for step in range(start, config.max_steps):
        metrics = trainer.step(step)
        if log is not None:
            log.write(metrics)
        done = metrics.step
        if done % config.checkpoint_every == 0 or done == config.max_steps:
            if rank == 0:
                (run_dir / RUN_FILE).write_text(json.dumps(config.trajectory(), indent=2))
            with tempfile.TemporaryDirectory() as directory:
                trainer.save(Path(directory), done)
                ray.train.report(
                    metrics.as_dict(), checkpoint=ray.train.Checkpoint.from_directory(directory)
                )
        elif done % config.log_every == 0:
            ray.train.report(metrics.as_dict())
    if rank == 0:
        trainer.export(run_dir / ADAPTER_DIR)
    if log is not None:
        log.close()
