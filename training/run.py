"""``train(config)``: the whole training stage as one plain function (the CLI and Prefect call it).

It builds or finds the cache, then runs ``train_worker`` under Ray Train's ``TorchTrainer``:
``num_workers`` data-parallel workers (gloo on CPU, NCCL on GPU), checkpoints and metrics under
``<output>/<name>``. Calling it again with the same name resumes that run from its latest
checkpoint (Ray Train finds it in the run directory), and a worker that dies mid-run is restarted
from the latest checkpoint up to ``max_failures`` times.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from annotate.ray_session import connect, requested_address
from ifadapter.adapter import IFAdapter
from ifadapter.base_model import check_base
from ifadapter.utils.profiles import ConfigError
from training.cache import CacheInfo, build_cache
from training.config import TrainConfig, load_train_config
from training.loop import ADAPTER_DIR, RUN_FILE, check_cache, new_adapter, train_worker
from training.metrics import METRICS_FILE, read_events, read_metrics
from training.samples import BatchPlan, CachedSamples

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path  # the final adapter: config.json + ifadapter.safetensors
    metrics_path: Path
    checkpoint_dir: Path | None  # the latest Ray Train checkpoint
    steps: int
    metrics: dict  # the last step's
    cache: CacheInfo
    resumed_from: list[int]  # steps this run was restored at


def check_resumable(config: TrainConfig) -> None:
    """A run directory with checkpoints continues only under the settings that made them."""
    path = config.run_dir / RUN_FILE
    if not path.is_file():
        return
    before, now = json.loads(path.read_text()), config.trajectory()
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        raise ConfigError(
            f"run {config.name!r} in {config.output} was trained with other values of "
            f"{', '.join(changed)}; resume it with those, or start a run with another name"
        )


def meta_adapter(config: TrainConfig) -> IFAdapter:
    """The adapter ``config`` describes, on the meta device (no weights loaded): building it
    checks the adapter settings against the UNet before any caching starts."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config.base, subfolder="unet")
        )
        return new_adapter(unet, config)


def preflight(config: TrainConfig, cache: CacheInfo, adapter: IFAdapter) -> None:
    """Finds on the driver, with a one-line error, what would otherwise fail in every worker: a
    cache that does not fit the adapter, no aspect bucket large enough for the global batch."""
    check_cache(adapter, cache)
    BatchPlan(CachedSamples(cache.path).image_buckets, config.global_batch_size, config.seed)


class _StepProgress:
    """A progress bar on the driver that follows ``metrics.jsonl`` as rank 0 writes it."""

    def __init__(self, run_dir: Path, total: int, enabled: bool) -> None:
        self.path = run_dir / METRICS_FILE
        self.bar = tqdm(
            total=total, desc="training", unit="step", disable=not enabled, mininterval=5
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.offset = 0

    def __enter__(self) -> _StepProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()
        self.bar.close()

    def _follow(self) -> None:
        while not self.stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        if not self.path.is_file():
            return
        if self.path.stat().st_size < self.offset:  # truncated by a restore
            self.offset = 0
        with open(self.path) as handle:
            handle.seek(self.offset)
            lines = handle.readlines()
        complete = [line for line in lines if line.endswith("\n")]
        self.offset += sum(len(line.encode()) for line in complete)
        if complete:
            last = json.loads(complete[-1])
            self.bar.n = last["step"]
            self.bar.set_postfix(
                loss=f"{last['loss']:.4f}",
                samples_per_s=f"{last['samples_per_s']:.0f}",
                refresh=False,
            )
            self.bar.refresh()


def train(config: TrainConfig | str | Path, progress: bool = False) -> TrainResult:
    """Trains (or resumes) the run that ``config`` describes; a path reads its ``train:``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    check_base(config.base, local_only=True)
    check_resumable(config)
    adapter = meta_adapter(config)
    connect(requested_address())  # unless the caller connected
    cache = build_cache(config, progress)
    preflight(config, cache, adapter)
    if cache.quarantined:
        logger.warning(
            "%d of %d images quarantined (reasons in %s)",
            cache.quarantined,
            cache.inputs,
            cache.quarantine_path,
        )
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "cache": cache.path,
            "run_dir": str(config.run_dir),
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=str(config.run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    with _StepProgress(config.run_dir, config.max_steps, progress):
        result = trainer.fit()
    metrics = read_metrics(config.run_dir)
    return TrainResult(
        run_dir=config.run_dir,
        adapter_dir=config.run_dir / ADAPTER_DIR,
        metrics_path=config.run_dir / METRICS_FILE,
        checkpoint_dir=Path(result.checkpoint.path) if result.checkpoint else None,
        steps=metrics[-1]["step"] if metrics else 0,
        metrics=metrics[-1] if metrics else {},
        cache=cache,
        resumed_from=[e["step"] for e in read_events(config.run_dir) if e["event"] == "resumed"],
    )
