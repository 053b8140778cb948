"""The cache as training reads it, and the order it is read in.

Every worker memory-maps the cache's IPC parts and indexes them by (image, view), images sorted by
id, so all workers agree on sample numbers whatever order the cache stage wrote them in.

``BatchPlan`` decides which images make each optimiser step's global batch as a pure function of
(seed, step): per epoch a seeded permutation within each aspect bucket, cut into global batches
(a bucket's remainder waits for a later epoch), the batches shuffled. Micro-batch (a, r) of a step
(accumulation step a, worker r) is a fixed slice of the global batch, and every sample's noise,
timestep and dropout come from a generator seeded by (seed, step, position in the global batch).
So the data position of a checkpoint is its step, a resumed run reads exactly what the
interrupted one would have read, and any split of the same global batch over workers and
accumulation steps trains the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ifadapter import DiffusionBatch, InstanceFeatures
from training.cache import DTYPES, CacheInfo


class CachedSamples:
    """Memory-mapped cache parts; ``collate`` turns images of one epoch into a batch."""

    def __init__(self, path: str | Path) -> None:
        self.info = CacheInfo.read(path)
        self.dtype = DTYPES[self.info.dtype]
        self.views = self.info.material["augment"]["views"]
        self.tables = [
            pa.ipc.open_file(pa.memory_map(str(Path(path) / part))).read_all()
            for part in self.info.parts
        ]
        entries = []
        for part, table in enumerate(self.tables):
            columns = [table.column(c).to_pylist() for c in ("image_id", "view", "height", "width")]
            for row, (image_id, view, height, width) in enumerate(zip(*columns, strict=True)):
                entries.append((image_id, view, part, row, (height, width)))
        entries.sort()
        self.image_ids = sorted({entry[0] for entry in entries})
        number = {image_id: index for index, image_id in enumerate(self.image_ids)}
        self.rows: dict[tuple[int, int], tuple[int, int]] = {}
        buckets: dict[int, tuple[int, int]] = {}
        for image_id, view, part, row, bucket in entries:
            self.rows.setdefault((number[image_id], view), (part, row))
            buckets[number[image_id]] = bucket
        bucket_ids = {bucket: i for i, bucket in enumerate(sorted(set(buckets.values())))}
        self.image_buckets = [bucket_ids[buckets[i]] for i in range(len(self.image_ids))]

    def __len__(self) -> int:
        return len(self.image_ids)

    def sample(self, image: int, epoch: int) -> tuple[torch.Tensor, ...]:
        """(latents, prompt_embeds, pooled_prompt_embeds, time_ids) of an image's view for
        ``epoch`` (view ``epoch % views``), plus its instances as a batch of one."""
        info = self.info
        part, row = self.rows[(int(image), epoch % self.views)]
        table = self.tables[part]

        def scalar(column: str):
            return table.column(column)[row].as_py()

        def tensor(column: str, shape: Sequence[int], dtype: torch.dtype = self.dtype):
            if 0 in shape:
                return torch.zeros(shape, dtype=dtype)
            buffer = table.column(column)[row].as_buffer()
            return torch.frombuffer(bytearray(buffer), dtype=dtype).reshape(shape)

        factor, dim = info.latent_factor, info.text_dim
        count, length = scalar("num_instances"), scalar("num_tokens")
        layers = len(info.text_encoder_layers)
        features = InstanceFeatures(
            words=tensor("words", (1, count, layers, length, dim)),
            word_mask=tensor("word_mask", (1, count, length), torch.uint8).bool(),
            eot=tensor("eot", (1, count, dim)),
            boxes=tensor("boxes", (1, count, 4), torch.float32),
            mask=torch.ones(1, count, dtype=torch.bool),
        )
        return (
            tensor("latents", (info.latent_channels, scalar("height") // factor, -1)),
            tensor("prompt_embeds", (-1, dim)),
            tensor("pooled_prompt_embeds", (info.pooled_dim,)),
            torch.tensor(scalar("time_ids"), dtype=torch.float32),
            features,
        )

    def collate(
        self, images: Sequence[int], epoch: int, device: torch.device | str = "cpu"
    ) -> DiffusionBatch:
        """The images' views for ``epoch`` as one float32 batch on ``device``."""
        latents, prompts, pooled, time_ids, features = zip(
            *(self.sample(image, epoch) for image in images), strict=True
        )
        return DiffusionBatch(
            latents=torch.stack(latents).to(device, torch.float32),
            prompt_embeds=torch.stack(prompts).to(device, torch.float32),
            pooled_prompt_embeds=torch.stack(pooled).to(device, torch.float32),
            time_ids=torch.stack(time_ids).to(device),
            instances=InstanceFeatures.cat(features).to(device, torch.float32),
        )


class BatchPlan:
    """Global batches of image numbers, a pure function of (seed, step)."""

    def __init__(self, image_buckets: Sequence[int], global_batch: int, seed: int) -> None:
        self.buckets = np.asarray(image_buckets)
        self.global_batch = global_batch
        self.seed = seed
        sizes = np.bincount(self.buckets) if len(self.buckets) else np.zeros(0, int)
        self.batches_per_epoch = int(sum(size // global_batch for size in sizes))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no aspect bucket holds a global batch of {global_batch} samples (bucket sizes "
                f"{sorted(sizes.tolist(), reverse=True)}): lower batch_size, workers or "
                "gradient_accumulation, or add data"
            )
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for bucket in range(int(self.buckets.max()) + 1):
                members = rng.permutation(np.flatnonzero(self.buckets == bucket))
                usable = len(members) // self.global_batch * self.global_batch
                batches.extend(members[:usable].reshape(-1, self.global_batch))
            order = rng.permutation(len(batches))
            self._epoch = (epoch, [batches[i] for i in order])
        return self._epoch[1]

    def global_batch_at(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, image numbers) of optimiser step ``step``."""
        epoch, index = divmod(step, self.batches_per_epoch)
        return epoch, self.epoch_batches(epoch)[index]

    def micro_batch(
        self, step: int, accumulation: int, rank: int, world_size: int, batch_size: int
    ) -> tuple[int, np.ndarray, range]:
        """(epoch, image numbers, their positions in the global batch) of one worker's
        micro-batch ``accumulation`` of step ``step``."""
        epoch, images = self.global_batch_at(step)
        start = (accumulation * world_size + rank) * batch_size
        return epoch, images[start : start + batch_size], range(start, start + batch_size)

    def generators(self, step: int, positions: range) -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, step, position)."""
        generators = []
        for position in positions:
            state = np.random.SeedSequence([self.seed, step, position]).generate_state(2)
            seed = (int(state[0]) << 31) ^ int(state[1])
            generators.append(torch.Generator().manual_seed(seed))
        return generators
