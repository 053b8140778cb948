"""Choosing the instances of an image among raw detections: size, class-wise NMS, a cap."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms

from annotate.engine.records import Detection


def select_detections(
    detections: Sequence[Detection], nms_iou: float, min_box_size: float, max_instances: int
) -> list[Detection]:
    """Drops boxes with a side under ``min_box_size`` (normalised), suppresses boxes of the same
    label that overlap a better one by IoU above ``nms_iou`` (boxes of different labels may
    overlap: a cup on a table), and keeps the ``max_instances`` best, best first."""
    kept = [
        d
        for d in detections
        if d.box[2] - d.box[0] >= min_box_size and d.box[3] - d.box[1] >= min_box_size
    ]
    if not kept:
        return []
    labels = {label: index for index, label in enumerate(dict.fromkeys(d.label for d in kept))}
    order = batched_nms(
        torch.tensor([d.box for d in kept], dtype=torch.float32),
        torch.tensor([d.score for d in kept], dtype=torch.float32),
        torch.tensor([labels[d.label] for d in kept]),
        nms_iou,
    )
    return [kept[i] for i in order[:max_instances].tolist()]
