"""The cache stage: every view's VAE latents and text-encoder outputs, computed once.

A Ray Data job reads the shards (``read_parquet``, nested columns intact), decodes, validates and
augments each image in CPU tasks, and runs the frozen encoders in an actor pool that writes Arrow
IPC parts (uncompressed, so training memory-maps them and reads any row without copying a
shard). The driver then writes the quarantine table and ``_cache.json``, and renames the
finished directory into place: a cache directory that exists is complete.

The directory is named by a key over everything the cached values depend on: the content of the
VAE, text encoders and tokenizers, the text-encoder layers the adapter reads, the augmentation,
the storage dtype and the shard checksums. Change any of them and the cache is recomputed under
a new key; a stale cache cannot be picked up.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from annotate.ray_session import connect, requested_address
from annotate.schema import QUARANTINE_DIR, QUARANTINE_SCHEMA
from ifadapter.utils.files import (
    atomic_directory,
    atomic_path,
    file_sha256,
    json_sha256,
    write_json_atomic,
)
from training.augment import aspect_buckets, make_view, view_rng
from training.config import AugmentConfig, TrainConfig
from training.encoders import FrozenEncoders
from training.shards import (
    READ_COLUMNS,
    RowError,
    ShardDataset,
    decode_image,
    open_dataset,
    row_layout,
)

CACHE_FORMAT = 1
CACHE_MANIFEST = "_cache.json"
FINGERPRINTS = "_fingerprints.json"
QUARANTINE_FILE = "quarantine.parquet"
PART_VIEWS = 256  # views per IPC part: few files for workers to map, blocks of modest size
ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# One row per view, as the training workers read it. Tensors are raw bytes in the cache dtype
# (shapes follow from the manifest and the row's bucket, instance and token counts).
CACHE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("view", pa.int32()),
        ("height", pa.int32()),  # the bucket, in pixels
        ("width", pa.int32()),
        ("time_ids", pa.list_(pa.float32(), 6)),
        ("latents", pa.binary()),  # (C, height / f, width / f)
        ("prompt_embeds", pa.binary()),  # (77, D)
        ("pooled_prompt_embeds", pa.binary()),  # (D_pooled,)
        ("num_instances", pa.int32()),
        ("num_tokens", pa.int32()),  # T: word positions kept, the row's longest description
        ("boxes", pa.binary()),  # (n, 4) float32
        ("words", pa.binary()),  # (n, k, T, D)
        ("word_mask", pa.binary()),  # (n, T) uint8
        ("eot", pa.binary()),  # (n, D)
    ]
)

# What the CPU tasks hand to the encoders: one row per view, or one per rejected image.
VIEW_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("view", pa.int32()),
        ("stage", pa.string()),
        ("reason", pa.string()),  # null for a good view
        ("pixels", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("time_ids", pa.list_(pa.float32(), 6)),
        ("caption", pa.string()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("captions", pa.list_(pa.string())),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("view", pa.int32()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("part", pa.string()),
    ]
)


@dataclass
class CacheInfo:
    """``_cache.json``: what a finished cache directory holds and what it was computed from."""

    key: str
    material: dict
    parts: list[str]
    images: int
    views: int
    quarantined: int
    buckets: list[list[int]]
    dtype: str
    latent_channels: int
    latent_factor: int
    text_dim: int
    pooled_dim: int
    text_encoder_layers: list[int]
    format: int = CACHE_FORMAT
    path: str = field(default="", compare=False)
    computed: bool = field(default=False, compare=False)

    @property
    def inputs(self) -> int:
        return self.images + self.quarantined

    @property
    def quarantine_path(self) -> Path | None:
        return Path(self.path) / QUARANTINE_DIR / QUARANTINE_FILE if self.quarantined else None

    def write(self, directory: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k not in {"path", "computed"}}
        (directory / CACHE_MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def read(cls, directory: str | Path) -> CacheInfo:
        data = json.loads((Path(directory) / CACHE_MANIFEST).read_text())
        if data.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{directory}: cache format {data.get('format')} is not {CACHE_FORMAT}"
            )
        return cls(**data, path=str(directory))


def _file_sha256(path: Path, memo: dict) -> str:
    stat = path.stat()
    entry = memo.get(str(path))
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return entry["sha256"]
    memo[str(path)] = {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": file_sha256(path, chunk=1 << 22),
    }
    return memo[str(path)]["sha256"]


def encoder_fingerprint(base: str | Path, memo_path: Path) -> dict[str, str]:
    """Content digest of every file of the components the cache runs. Digests are remembered per
    (path, size, mtime) in ``memo_path``, so a multi-gigabyte base is read once, not per run."""
    base = Path(base)
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{base} is not a local SDXL pipeline directory (no model_index.json)"
        )
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    fingerprint = {}
    for component in ENCODER_COMPONENTS:
        folder = (base / component).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"{base} has no {component}/ (not an SDXL pipeline directory)")
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(folder)}\0{_file_sha256(path, memo)}\n".encode())
        fingerprint[component] = digest.hexdigest()
    write_json_atomic(memo_path, memo, indent=1, sort_keys=True)
    return fingerprint


def cache_key(config: TrainConfig, dataset: ShardDataset) -> tuple[str, dict]:
    """(key, the material it digests); the material is kept in ``_cache.json`` for reading."""
    material = {
        "format": CACHE_FORMAT,
        "encoders": encoder_fingerprint(config.base, config.cache_root / FINGERPRINTS),
        "text_encoder_layers": list(config.text_encoder_layers),
        "augment": config.augment.model_dump(mode="json"),
        "dtype": config.cache_dtype,
        "shards": [
            {"path": e.path, "rows": e.rows, "sha256": e.sha256} for e in dataset.manifest.shards
        ],
    }
    return json_sha256(material), material


def prepare_views(batch: pa.Table, augment: dict, buckets: list[tuple[int, int]]) -> pa.Table:
    """CPU stage: decode, validate and augment each image into ``augment.views`` views."""
    settings = AugmentConfig.model_validate(augment)
    out = []
    for row in batch.to_pylist():
        common = {"image_id": row["image_id"], "uri": row["uri"], "sha256": row["sha256"]}
        try:
            image, layout = decode_image(row), row_layout(row)
        except RowError as error:
            out.append({**common, "view": 0, "stage": error.stage, "reason": str(error)})
            continue
        for index in range(settings.views):
            rng = view_rng(settings.seed, row["image_id"], index)
            view = make_view(image, layout, buckets, settings, rng)
            out.append(
                {
                    **common,
                    "view": index,
                    "pixels": view.pixels.tobytes(),
                    "height": view.pixels.shape[0],
                    "width": view.pixels.shape[1],
                    "time_ids": list(view.time_ids),
                    "caption": view.caption,
                    "boxes": view.boxes.tolist(),
                    "captions": view.captions,
                }
            )
    return pa.Table.from_pylist(out, schema=VIEW_SCHEMA)


def _raw(tensor: torch.Tensor, dtype: torch.dtype) -> bytes:
    return tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()


class EncodeViews:
    """Actor stage: the frozen encoders over a block of views (``batch_size`` at a time), written
    as one IPC part."""

    def __init__(
        self,
        base: str,
        text_encoder_layers: Sequence[int],
        dtype: str,
        directory: str,
        gpu: bool,
        batch_size: int,
    ) -> None:
        self.encoders = FrozenEncoders(base, text_encoder_layers, "cuda" if gpu else "cpu")
        self.dtype = DTYPES[dtype]
        self.directory = Path(directory)
        self.batch_size = batch_size

    def __call__(self, block: pa.Table) -> pa.Table:
        rows = block.to_pylist()
        good = [row for row in rows if row["reason"] is None]
        part = self.write(good) if good else None
        return pa.Table.from_pylist(
            [
                {
                    **{k: row[k] for k in ("image_id", "uri", "sha256", "view", "stage", "reason")},
                    "part": part if row["reason"] is None else None,
                }
                for row in rows
            ],
            schema=SUMMARY_SCHEMA,
        )

    def write(self, rows: list[dict]) -> str:
        """Encodes the views and writes them as a part named by their ids (a retried block
        writes the same file again)."""
        records = []
        for start in range(0, len(rows), self.batch_size):
            records.extend(self.encode(rows[start : start + self.batch_size]))
        names = "\n".join(f"{row['image_id']}/{row['view']}" for row in rows)
        name = f"part-{hashlib.sha256(names.encode()).hexdigest()[:20]}.arrow"
        table = pa.Table.from_pylist(records, schema=CACHE_SCHEMA)
        with (
            atomic_path(self.directory / name) as temporary,
            pa.OSFile(str(temporary), "wb") as sink,
            pa.ipc.new_file(sink, CACHE_SCHEMA) as writer,
        ):
            writer.write_table(table)
        return name

    def encode(self, rows: list[dict]) -> list[dict]:
        """One encoder batch: cache records in the order of ``rows``."""
        latents: list[torch.Tensor | None] = [None] * len(rows)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, row in enumerate(rows):
            by_bucket.setdefault((row["height"], row["width"]), []).append(index)
        for (height, width), indices in by_bucket.items():
            pixels = np.stack(
                [
                    np.frombuffer(rows[i]["pixels"], np.uint8).reshape(height, width, 3)
                    for i in indices
                ]
            )
            for i, latent in zip(indices, self.encoders.latents(pixels), strict=True):
                latents[i] = latent
        prompt_embeds, pooled = self.encoders.prompts([row["caption"] for row in rows])
        descriptions = [c for row in rows for c in row["captions"]]
        if descriptions:
            words, word_mask, eot = self.encoders.descriptions(descriptions)
        records, start = [], 0
        for index, row in enumerate(rows):
            count = len(row["captions"])
            if count:
                mask = word_mask[start : start + count]
                positions = mask.any(0).nonzero()
                length = int(positions.max()) + 1 if len(positions) else 1
                row_words = words[start : start + count, :, :length]
                row_mask, row_eot = mask[:, :length], eot[start : start + count]
            else:
                length = 1
                row_words = row_mask = row_eot = torch.zeros(0)
            start += count
            records.append(
                {
                    "image_id": row["image_id"],
                    "view": row["view"],
                    "height": row["height"],
                    "width": row["width"],
                    "time_ids": row["time_ids"],
                    "latents": _raw(latents[index], self.dtype),
                    "prompt_embeds": _raw(prompt_embeds[index], self.dtype),
                    "pooled_prompt_embeds": _raw(pooled[index], self.dtype),
                    "num_instances": count,
                    "num_tokens": length,
                    "boxes": np.asarray(row["boxes"], np.float32).reshape(-1, 4).tobytes(),
                    "words": _raw(row_words, self.dtype),
                    "word_mask": _raw(row_mask, torch.uint8),
                    "eot": _raw(row_eot, self.dtype),
                }
            )
        return records


def _model_shapes(config: TrainConfig) -> dict:
    """Latent channels and factor, text widths: read from the component configs, not guessed."""
    base = Path(config.base)

    def read(component: str) -> dict:
        return json.loads((base / component / "config.json").read_text())

    vae, first, second = read("vae"), read("text_encoder"), read("text_encoder_2")
    return {
        "latent_channels": vae["latent_channels"],
        "latent_factor": 2 ** (len(vae["block_out_channels"]) - 1),
        "text_dim": first["hidden_size"] + second["hidden_size"],
        "pooled_dim": second["projection_dim"],
    }


def _existing(target: Path, key: str) -> CacheInfo | None:
    if not (target / CACHE_MANIFEST).is_file():
        return None
    info = CacheInfo.read(target)
    if info.key != key:
        raise ValueError(f"{target} holds a cache for another key; remove it")
    return info


def find_cache(config: TrainConfig) -> tuple[str, CacheInfo | None]:
    """(the cache key of ``config``, its finished cache or None), without Ray: lets a caller
    (the Prefect pipeline) learn whether ``build_cache`` has work to do."""
    key, _ = cache_key(config, open_dataset(config.data))
    return key, _existing(config.cache_root / key[:16], key)


def build_cache(config: TrainConfig, progress: bool = False) -> CacheInfo:
    """The cache for ``config``: found under its key, or computed now with Ray Data."""
    import ray

    dataset = open_dataset(config.data)
    key, material = cache_key(config, dataset)
    target = config.cache_root / key[:16]
    found = _existing(target, key)
    if found is not None:
        return found
    augment = config.augment
    shapes = _model_shapes(config)
    buckets = aspect_buckets(augment.resolution, augment.bucket_step, augment.max_aspect)
    unet = json.loads((Path(config.base) / "unet" / "config.json").read_text())
    granule = shapes["latent_factor"] * 2 ** (len(unet["block_out_channels"]) - 1)
    if augment.bucket_step % granule:
        raise ValueError(
            f"augment.bucket_step {augment.bucket_step} must be a multiple of {granule} for this "
            "base (VAE factor times the UNet's downsampling)"
        )
    # Another run computing the same key may place its directory first: theirs is kept.
    with atomic_directory(target, overwrite=False) as temporary:
        temporary.mkdir()
        connect(requested_address())  # unless the caller connected
        cpus = ray.cluster_resources().get("CPU", 0)
        if not config.use_gpu and config.cache_actors >= cpus:
            # Each encoder actor holds a CPU for its lifetime; with none left, the read tasks
            # that feed them never start and the job waits forever.
            raise ValueError(
                f"cache_actors {config.cache_actors} would hold all {cpus:g} CPUs of the Ray "
                "cluster and leave none to read the shards; use fewer actors than CPUs"
            )
        shards = ray.data.read_parquet(dataset.paths).select_columns(READ_COLUMNS)
        views = shards.map_batches(
            prepare_views,
            batch_format="pyarrow",
            batch_size=config.cache_batch_size,
            fn_kwargs={"augment": augment.model_dump(mode="json"), "buckets": buckets},
        )
        encoded = views.map_batches(
            EncodeViews,
            batch_format="pyarrow",
            batch_size=PART_VIEWS,
            compute=ray.data.ActorPoolStrategy(size=config.cache_actors),
            num_gpus=1 if config.use_gpu else 0,
            fn_constructor_kwargs={
                "base": str(Path(config.base).resolve()),
                "text_encoder_layers": list(config.text_encoder_layers),
                "dtype": config.cache_dtype,
                "directory": str(temporary),
                "gpu": config.use_gpu,
                "batch_size": config.cache_batch_size,
            },
        )
        quarantine, parts, images, view_rows = [], set(), set(), 0
        bar = tqdm(total=dataset.manifest.rows, desc="caching", unit="image", disable=not progress)
        for summary in encoded.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in summary.to_pylist():
                if row["reason"] is not None:
                    quarantine.append(
                        {
                            "uri": row["uri"],
                            "sha256": row["sha256"],
                            "stage": f"training-cache/{row['stage']}",
                            "reason": f"{row['image_id']}: {row['reason']}",
                        }
                    )
                    bar.update(1)
                    continue
                parts.add(row["part"])
                view_rows += 1
                if row["view"] == 0:
                    images.add(row["image_id"])
                    bar.update(1)
        bar.close()
        if not images:
            reasons = "; ".join(q["reason"] for q in quarantine[:3])
            raise ValueError(f"{config.data}: no image can be trained on ({reasons})")
        if quarantine:
            (temporary / QUARANTINE_DIR).mkdir()
            pq.write_table(
                pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA),
                temporary / QUARANTINE_DIR / QUARANTINE_FILE,
            )
        info = CacheInfo(
            key=key,
            material=material,
            parts=sorted(parts),
            images=len(images),
            views=view_rows,
            quarantined=len(quarantine),
            buckets=[list(b) for b in buckets],
            dtype=config.cache_dtype,
            text_encoder_layers=list(config.text_encoder_layers),
            **shapes,
        )
        info.write(temporary)
    info = CacheInfo.read(target)
    info.computed = True
    return info
