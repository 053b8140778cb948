"""``evaluate(config, output)``: the IFG benchmark from the benchmark file to report.html.

Stages run one model at a time over every method (generation per method, then the detector,
then each judge, CLIP, FID), so only one model is in memory at once. Everything is resumable:

- ``methods/<name>/<fingerprint>/images/<layout>.png``: a method's images; the fingerprint digests
  the runner's settings, its weight files (size and mtime), the generation settings and the
  benchmark, so changed settings or a retrained checkpoint get fresh images and unchanged ones
  are never made twice (a rerun skips every image already written);
- ``detections-<fp>.jsonl`` and ``verdicts-<judge>-<fp>.jsonl`` beside them: per-image detections
  and per-instance verdicts, appended batch by batch and keyed by the detector's (and judge's)
  settings and weights, so a rerun asks only for what is missing;
- ``fid-<fp>.npy`` beside them and ``fid-reference-<fp>.npy`` in the output: Inception features
  per Inception file (and reference set), the benchmark's most expensive stage on a CPU;
- ``records/<method>.parquet``: one row per instance (match, IoU, every judge's answer and reason,
  and what a judge that checks attributes one by one saw of each);
- ``metrics.json`` (the contract in ``evaluation.report``) and the self-contained ``report.html``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from annotate.vlm.crops import crop_box
from evaluation.benchmark import Benchmark, load_or_build
from evaluation.config import EvaluateConfig, load_config
from evaluation.method_run import MethodRun, fingerprint_key
from evaluation.metrics import (
    ClipScorer,
    FidScorer,
    InstanceRecord,
    average_precision,
    ifs_summary,
    instance_records,
)
from evaluation.protocols import Detection, weights_stamp
from evaluation.report import markdown_summary, summary_table, write_report
from evaluation.runners import layout_seed
from ifadapter.utils.files import atomic_open

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class EvaluationResult:
    output: Path
    metrics_path: Path
    report_path: Path
    table: list[dict]  # one row per method (``evaluation.report.summary_table``)
    markdown: str  # the same table as Markdown (a Prefect artifact's body)
    metrics: dict  # what metrics.json holds
    timings: dict[str, float]  # seconds per stage of this call (model loading included)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _read_jsonl(path: Path) -> dict[str, dict]:
    """Entries by key; a last line cut by a crash is ignored (it is asked again)."""
    entries: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            entries[entry["key"]] = entry
    return entries


def _append_jsonl(path: Path, entries: Sequence[dict]) -> None:
    with path.open("a") as handle:
        handle.write("".join(json.dumps(entry) + "\n" for entry in entries))


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading bars ("Loading pipeline components", "Loading
    weights") off while a runner loads: one per method and component, they bury the
    evaluation's own bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def generate(run: MethodRun, config: EvaluateConfig, benchmark: Benchmark, progress: bool) -> int:
    """Makes the method's missing images; the runner loads only when some are missing."""
    pending = [layout for layout in benchmark.layouts if not run.image_path(layout).is_file()]
    if not pending:
        return 0
    method = run.method
    bar = tqdm(total=len(pending), desc=f"generate {method.name}", disable=not progress)
    with quiet_loading():  # the bar above stands for the loading as well
        runner = method.backend_class()(
            method.settings, config.device, config.generation, benchmark
        )
    for batch in _batches(pending, config.generation.batch_size):
        seeds = [layout_seed(config.generation.seed, layout.id) for layout in batch]
        images = runner.generate(batch, seeds)
        if len(images) != len(batch):
            raise ValueError(f"runner of {method.name} made {len(images)} images for {len(batch)}")
        for layout, image in zip(batch, images, strict=True):
            with atomic_open(run.image_path(layout)) as handle:  # never a half-written image
                image.convert("RGB").save(handle, format="PNG")
        bar.update(len(batch))
    bar.close()
    del runner
    return len(pending)


def detect(
    runs: Sequence[MethodRun], config: EvaluateConfig, benchmark: Benchmark, progress: bool
) -> dict[str, dict[str, list[Detection]]]:
    """Detections per method and layout, cached per detector fingerprint."""
    assert config.detector is not None
    key = fingerprint_key(config.detector.fingerprint())
    detector = None
    results: dict[str, dict[str, list[Detection]]] = {}
    for run in runs:
        path = run.directory / f"detections-{key}.jsonl"
        cached = _read_jsonl(path)
        pending = [layout for layout in benchmark.layouts if layout.id not in cached]
        bar = tqdm(total=len(pending), desc=f"detect {run.method.name}", disable=not progress)
        for batch in _batches(pending, config.detector.batch_size):
            if detector is None:
                detector = config.detector.backend_class()(config.detector.settings, config.device)
            labels = [sorted({i.label for i in layout.instances}) for layout in batch]
            found = detector.detect([run.image(layout) for layout in batch], labels)
            entries = [
                {"key": layout.id, "detections": [d.to_dict() for d in image]}
                for layout, image in zip(batch, found, strict=True)
            ]
            _append_jsonl(path, entries)
            cached.update({entry["key"]: entry for entry in entries})
            bar.update(len(batch))
        bar.close()
        results[run.method.name] = {
            layout.id: [Detection.from_dict(d) for d in cached[layout.id]["detections"]]
            for layout in benchmark.layouts
        }
    return results


def judge(
    runs: Sequence[MethodRun],
    records: dict[str, list[InstanceRecord]],
    config: EvaluateConfig,
    benchmark: Benchmark,
    progress: bool,
) -> None:
    """Asks every judge about every placed instance's matched crop; fills ``record.verdicts``."""
    assert config.detector is not None
    layouts = {layout.id: layout for layout in benchmark.layouts}
    for entry in config.judges:
        key = fingerprint_key(
            {
                "judge": entry.fingerprint(),
                "detector": config.detector.fingerprint(),
                "iou_threshold": config.metrics.iou_threshold,
                "crop_padding": config.metrics.crop_padding,
            }
        )
        attributes = entry.backend_class().attributes
        judge_backend = None
        for run in runs:
            path = run.directory / f"verdicts-{entry.name}-{key}.jsonl"
            cached = _read_jsonl(path)
            placed = [r for r in records[run.method.name] if r.placed]
            pending = [r for r in placed if f"{r.layout_id}#{r.index}" not in cached]
            bar = tqdm(
                total=len(pending),
                desc=f"judge {entry.name} {run.method.name}",
                disable=not progress,
            )
            for batch in _batches(pending, entry.batch_size):
                if judge_backend is None:
                    judge_backend = entry.backend_class()(entry.settings, config.device)
                    judge_backend.name = entry.name
                items = []
                for record in batch:
                    image = run.image(layouts[record.layout_id])
                    crop = crop_box(image, record.matched_box, config.metrics.crop_padding)
                    items.append((crop, record.caption))
                verdicts = judge_backend.ask(items)
                entries = [
                    {
                        "key": f"{r.layout_id}#{r.index}",
                        "answer": v.answer,
                        "reason": v.reason,
                        "attributes": v.attributes,
                    }
                    for r, v in zip(batch, verdicts, strict=True)
                ]
                _append_jsonl(path, entries)
                cached.update({e["key"]: e for e in entries})
                bar.update(len(batch))
            bar.close()
            for record in placed:
                verdict = cached[f"{record.layout_id}#{record.index}"]
                record.verdicts[entry.name] = (verdict["answer"], verdict["reason"])
                if attributes:
                    record.attributes[entry.name] = verdict.get("attributes")
        del judge_backend


def _reference_images(
    config: EvaluateConfig, benchmark: Benchmark
) -> Iterator[Sequence[Image.Image]]:
    """Batches of the FID reference set: a folder of images, or the benchmark's real images."""
    assert config.metrics.fid is not None
    size = config.metrics.fid.batch_size
    folder = config.metrics.fid.reference
    if folder is None:
        from evaluation.runners import RealRunner

        real = RealRunner(RealRunner.Settings(), config.device, config.generation, benchmark)
        for batch in _batches(benchmark.layouts, size):
            yield real.generate(batch, [0] * len(batch))
        return
    if not folder.is_dir():
        raise ValueError(f"FID reference folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in REFERENCE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"FID reference folder {folder} holds fewer than two images")
    for batch in _batches(files, size):
        images = []
        for file in batch:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        yield images


def clip_scores(
    runs: Sequence[MethodRun],
    config: EvaluateConfig,
    benchmark: Benchmark,
    methods: dict[str, dict],
) -> None:
    """Mean CLIP score of every method's images against their global captions."""
    assert config.metrics.clip is not None
    scorer = ClipScorer(config.metrics.clip.model, config.device)
    for run in runs:
        scores = []
        for batch in _batches(benchmark.layouts, config.metrics.clip.batch_size):
            images = [run.image(layout) for layout in batch]
            scores += scorer.scores(images, [layout.caption for layout in batch])
        methods[run.method.name]["clip_score"] = sum(scores) / len(scores)


def _cached_features(
    path: Path, batches: Iterator[Sequence[Image.Image]], scorer: Callable[[], FidScorer]
) -> np.ndarray:
    """Inception features of ``batches``, read from ``path`` when an earlier run made them
    (then Inception is not even loaded)."""
    if path.is_file():
        return np.load(path)
    features = np.concatenate([scorer().features(images) for images in batches])
    with atomic_open(path) as handle:
        np.save(handle, features)
    return features


def fid_scores(
    runs: Sequence[MethodRun],
    config: EvaluateConfig,
    benchmark: Benchmark,
    output: Path,
    methods: dict[str, dict],
) -> None:
    """FID of every method against the reference set; features cached per Inception file (and
    per reference set), so a rerun computes only what is new."""
    assert config.metrics.fid is not None
    fid_config = config.metrics.fid
    weights = fingerprint_key(weights_stamp([fid_config.inception]))
    reference = fid_config.reference
    source = benchmark.sha256 if reference is None else weights_stamp([reference])
    loaded: list[FidScorer] = []

    def scorer() -> FidScorer:
        if not loaded:
            loaded.append(FidScorer(fid_config.inception, config.device))
        return loaded[0]

    reference_features = _cached_features(
        output / f"fid-reference-{fingerprint_key([weights, source])}.npy",
        _reference_images(config, benchmark),
        scorer,
    )
    for run in runs:
        batches = (
            [run.image(layout) for layout in batch]
            for batch in _batches(benchmark.layouts, fid_config.batch_size)
        )
        features = _cached_features(run.directory / f"fid-{weights}.npy", batches, scorer)
        methods[run.method.name]["fid"] = FidScorer.distance(reference_features, features)


def write_records(path: Path, records: Sequence[InstanceRecord]) -> None:
    with atomic_open(path) as handle:
        pq.write_table(pa.Table.from_pylist([r.to_row() for r in records]), handle)


def not_computed(config: EvaluateConfig) -> dict[str, str]:
    """Each metric the profile leaves out, with why: what a "–" in the report stands for."""
    reasons = {}
    if config.detector is None:
        reasons["placement"] = reasons["ap"] = "no detector in the profile's evaluate: section"
    if not config.metrics.ifs:
        reasons["ifs"] = "switched off (metrics.ifs: false)"
    elif config.detector is None:
        reasons["ifs"] = reasons["placement"]
    elif not config.judges:
        reasons["ifs"] = "no judge in the profile's evaluate: section"
    if not config.metrics.ap and "ap" not in reasons:
        reasons["ap"] = "switched off (metrics.ap: false)"
    if config.metrics.clip is None:
        reasons["clip"] = "switched off (metrics.clip: null, no CLIP model named)"
    if config.metrics.fid is None:
        reasons["fid"] = "switched off (metrics.fid: null, no Inception weights named)"
    return reasons


def evaluate(
    config: EvaluateConfig | str | Path, output: Path, progress: bool = False
) -> EvaluationResult:
    """Runs the benchmark of ``config`` into ``output`` and returns where everything went."""
    if not isinstance(config, EvaluateConfig):
        config = load_config(config)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    timings: dict[str, float] = {}
    with _timed(timings, "benchmark"):
        benchmark = load_or_build(config.benchmark)
    runs = [MethodRun(output, method, config, benchmark) for method in config.methods]
    for run in runs:
        with _timed(timings, f"generate {run.method.name}"):
            generate(run, config, benchmark, progress)

    methods: dict[str, dict] = {}
    for run in runs:
        methods[run.method.name] = {
            "images": len(benchmark.layouts),
            "instances": benchmark.instances,
            "ifs_rate": None,
            "ifs_by_judge": {},
            "placement": None,
            "ap": None,
            "ap50": None,
            "ap75": None,
            "clip_score": None,
            "fid": None,
            "ifs_by_count": {},
            "ifs_by_size": {},
            "ifs_overlap": {},
            "attributes": None,
            "unparsable": 0,
        }
    records: dict[str, list[InstanceRecord]] = {}
    if config.detector is not None and (config.metrics.ifs or config.metrics.ap):
        with _timed(timings, "detect"):
            detections = detect(runs, config, benchmark, progress)
        for run in runs:
            name = run.method.name
            records[name] = [
                record
                for layout in benchmark.layouts
                for record in instance_records(
                    layout,
                    detections[name][layout.id],
                    config.metrics.iou_threshold,
                    config.metrics.size_buckets,
                )
            ]
            if config.metrics.ap:
                with _timed(timings, "ap"):
                    sizes = [run.image(layout).size for layout in benchmark.layouts]
                    found = [detections[name][layout.id] for layout in benchmark.layouts]
                    methods[name].update(average_precision(benchmark.layouts, sizes, found))
        if config.metrics.ifs:
            with _timed(timings, "judge"):
                judge(runs, records, config, benchmark, progress)
        judges = [entry.name for entry in config.judges] if config.metrics.ifs else []
        attributes = {
            entry.name: entry.backend_class().attributes
            for entry in config.judges
            if config.metrics.ifs and entry.backend_class().attributes
        }
        for run in runs:
            methods[run.method.name].update(
                ifs_summary(records[run.method.name], judges, attributes)
            )
            write_records(
                output / "records" / f"{run.method.name}.parquet", records[run.method.name]
            )

    if config.metrics.clip is not None:
        with _timed(timings, "clip"):
            clip_scores(runs, config, benchmark, methods)

    if config.metrics.fid is not None:
        with _timed(timings, "fid"):
            fid_scores(runs, config, benchmark, output, methods)

    metrics = {
        "benchmark": benchmark.summary(),
        "iou_threshold": config.metrics.iou_threshold,
        "not_computed": not_computed(config),
        "judges": {
            entry.name: {"backend": entry.backend, **entry.fingerprint()["settings"]}
            for entry in config.judges
        },
        "methods": methods,
    }
    metrics_path = output / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=False))
    table = summary_table(metrics)
    with _timed(timings, "report"):
        report_path = write_report(
            output / "report.html",
            metrics,
            benchmark,
            {run.method.name: run for run in runs},
            records,
            config.report,
        )
    return EvaluationResult(
        output, metrics_path, report_path, table, markdown_summary(metrics), metrics, timings
    )
