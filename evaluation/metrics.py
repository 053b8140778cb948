"""The IFG metrics (docs/design.md): IFS rate, placement, Grounding-DINO AP, CLIP score, FID.

IFS, exactly as the benchmark defines it: the detector runs on the generated image prompted with
the layout's labels; among the detections of an instance's label, the one with the highest IoU
to the instance's box is its match, and an IoU under ``iou_threshold`` (0.5) fails the instance.
Otherwise the match's crop goes to every judge with the instance description; "yes" is a success,
"no" a failure, and an unusable reply a failure that is counted and keeps its reason. Per judge,
IFS = successes / instances; the overall ``ifs_rate`` is the mean over judges (the paper reports
each judge; the mean is one number to sort by). Placement is the share of instances matched.
A judge that checks attributes one by one (the toy world's: colour, shape, texture) also gives
an attribute rate: the share of all instances that were placed and whose crop shows that
attribute (mean over such judges), so IFS <= every attribute rate <= placement per judge.

Rates are fractions in [0, 1]; CLIP score is 100 x max(cos, 0) (the usual scale: the paper's
25.1); FID is the Fréchet distance of Inception pool features (2048-d).
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation.benchmark import BenchmarkLayout
from evaluation.protocols import Detection

SIZE_NAMES = ("small", "medium", "large")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes (0 when they do not overlap or a box is empty)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(
    box: Sequence[float], label: str, detections: Sequence[Detection]
) -> tuple[Detection | None, float]:
    """The detection of ``label`` with the highest IoU to ``box``, and that IoU."""
    best, best_iou = None, 0.0
    for detection in detections:
        if detection.label != label:
            continue
        overlap = iou(box, detection.box)
        if best is None or overlap > best_iou:
            best, best_iou = detection, overlap
    return best, best_iou


def size_bucket(area: float, buckets: tuple[float, float]) -> str:
    """small below ``buckets[0]`` of the image's area, large from ``buckets[1]``."""
    return (
        SIZE_NAMES[0]
        if area < buckets[0]
        else SIZE_NAMES[1]
        if area < buckets[1]
        else SIZE_NAMES[2]
    )


def overlapping(layout: BenchmarkLayout, index: int) -> bool:
    """Whether instance ``index``'s box shares area with another instance's box."""
    box = layout.instances[index].box
    return any(iou(box, other.box) > 0 for k, other in enumerate(layout.instances) if k != index)


@dataclass
class InstanceRecord:
    """One instance of one method's image: where it was asked, what matched, what judges said."""

    layout_id: str
    index: int
    label: str
    caption: str
    box: tuple[float, float, float, float]
    count: int  # instances in the layout
    size: str
    overlapping: bool
    matched_box: tuple[float, float, float, float] | None
    matched_score: float | None
    iou: float
    placed: bool
    verdicts: dict[str, tuple[bool | None, str | None]] = field(default_factory=dict)
    # per judge that checks attributes: what it saw of each (None: its verdict was unusable)
    attributes: dict[str, dict[str, bool] | None] = field(default_factory=dict)

    def success(self, judge: str) -> bool:
        return self.placed and self.verdicts.get(judge, (None, None))[0] is True

    def shows(self, judge: str, attribute: str) -> bool:
        """Placed, and ``judge`` saw ``attribute`` in the matched crop."""
        return self.placed and (self.attributes.get(judge) or {}).get(attribute) is True

    def success_share(self, judges: Sequence[str]) -> float:
        return sum(self.success(j) for j in judges) / len(judges)

    def to_row(self) -> dict:
        return {
            "layout_id": self.layout_id,
            "instance": self.index,
            "label": self.label,
            "caption": self.caption,
            "box": list(self.box),
            "count": self.count,
            "size": self.size,
            "overlapping": self.overlapping,
            "matched_box": list(self.matched_box) if self.matched_box else None,
            "matched_score": self.matched_score,
            "iou": self.iou,
            "placed": self.placed,
            "verdicts": [
                {
                    "judge": judge,
                    "answer": answer,
                    "reason": reason,
                    "attributes": self.attributes.get(judge),
                }
                for judge, (answer, reason) in sorted(self.verdicts.items())
            ],
        }


def objections(verdicts: Mapping[str, tuple[bool | None, str | None]]) -> list[str]:
    """What the judges that did not say yes said, judge by judge: "no", or the reason a reply
    was unusable."""
    return [
        f"{judge}: " + ("no" if answer is False else f"unparsable ({reason})")
        for judge, (answer, reason) in verdicts.items()
        if answer is not True
    ]


def instance_records(
    layout: BenchmarkLayout,
    detections: Sequence[Detection],
    iou_threshold: float,
    buckets: tuple[float, float],
) -> list[InstanceRecord]:
    """The matching of every instance of ``layout`` (verdicts are added by the judges)."""
    records = []
    for index, instance in enumerate(layout.instances):
        matched, overlap = match(instance.box, instance.label, detections)
        x0, y0, x1, y1 = instance.box
        records.append(
            InstanceRecord(
                layout_id=layout.id,
                index=index,
                label=instance.label,
                caption=instance.caption,
                box=instance.box,
                count=len(layout.instances),
                size=size_bucket((x1 - x0) * (y1 - y0), buckets),
                overlapping=overlapping(layout, index),
                matched_box=matched.box if matched else None,
                matched_score=matched.score if matched else None,
                iou=overlap,
                placed=matched is not None and overlap >= iou_threshold,
            )
        )
    return records


def _share(records: Sequence[InstanceRecord], judges: Sequence[str]) -> float | None:
    if not records:
        return None
    return sum(r.success_share(judges) for r in records) / len(records)


def attribute_rates(
    records: Sequence[InstanceRecord], attributes: Mapping[str, Sequence[str]]
) -> dict[str, float] | None:
    """Per attribute, the share of ``records`` placed and seen with it, averaged over the judges
    of ``attributes`` (judge -> the attributes it checks) that check it; None without such a
    judge. An unmatched instance or an unusable verdict fails every attribute."""
    if not attributes or not records:
        return None
    names = list(dict.fromkeys(a for checked in attributes.values() for a in checked))
    rates = {}
    for name in names:
        judges = [j for j, checked in attributes.items() if name in checked]
        shown = sum(r.shows(j, name) for r in records for j in judges)
        rates[name] = shown / (len(records) * len(judges))
    return rates


def ifs_summary(
    records: Sequence[InstanceRecord],
    judges: Sequence[str],
    attributes: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """IFS per judge and overall, placement, the breakdowns, the attribute rates of the judges
    in ``attributes`` (judge -> the attributes it checks) and the unparsable count."""
    if not records:
        raise ValueError("no instances to score")
    by_count: dict[int, list[InstanceRecord]] = defaultdict(list)
    by_size: dict[str, list[InstanceRecord]] = defaultdict(list)
    for record in records:
        by_count[record.count].append(record)
        by_size[record.size].append(record)
    placement = sum(r.placed for r in records) / len(records)
    if not judges:
        return {"placement": placement}
    overlapping = sum(r.overlapping for r in records)
    return {
        "ifs_rate": _share(records, judges),
        "ifs_by_judge": {j: sum(r.success(j) for r in records) / len(records) for j in judges},
        "placement": placement,
        "ifs_by_count": {str(n): _share(by_count[n], judges) for n in sorted(by_count)},
        "ifs_by_size": {name: _share(by_size.get(name, []), judges) for name in SIZE_NAMES},
        "ifs_overlap": {
            "overlapping": _share([r for r in records if r.overlapping], judges),
            "separate": _share([r for r in records if not r.overlapping], judges),
        },
        # Instances in each group of the breakdowns: a group without any shows n=0, not a gap.
        "group_sizes": {
            "ifs_by_count": {str(n): len(by_count[n]) for n in sorted(by_count)},
            "ifs_by_size": {name: len(by_size.get(name, [])) for name in SIZE_NAMES},
            "ifs_overlap": {"overlapping": overlapping, "separate": len(records) - overlapping},
        },
        "attributes": attribute_rates(records, attributes or {}),
        "unparsable": sum(
            1 for r in records for answer, _ in r.verdicts.values() if r.placed and answer is None
        ),
    }


def average_precision(
    layouts: Sequence[BenchmarkLayout],
    sizes: Sequence[tuple[int, int]],
    detections: Sequence[Sequence[Detection]],
) -> dict[str, float]:
    """COCO-style AP, AP50 and AP75 (pycocotools) of the detections against the layout boxes,
    one category per label, boxes in the pixels of each generated image."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = sorted({i.label for layout in layouts for i in layout.instances})
    category = {label: k + 1 for k, label in enumerate(labels)}

    def pixels(box: Sequence[float], size: tuple[int, int]) -> list[float]:
        width, height = size
        return [
            box[0] * width,
            box[1] * height,
            (box[2] - box[0]) * width,
            (box[3] - box[1]) * height,
        ]

    images, truth, found = [], [], []
    for image_id, (layout, size, image_detections) in enumerate(
        zip(layouts, sizes, detections, strict=True), start=1
    ):
        images.append({"id": image_id, "width": size[0], "height": size[1]})
        for instance in layout.instances:
            bbox = pixels(instance.box, size)
            truth.append(
                {
                    "id": len(truth) + 1,
                    "image_id": image_id,
                    "category_id": category[instance.label],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
        for detection in image_detections:
            if detection.label in category:
                found.append(
                    {
                        "image_id": image_id,
                        "category_id": category[detection.label],
                        "bbox": pixels(detection.box, size),
                        "score": detection.score,
                    }
                )
    if not found:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground = COCO()
        ground.dataset = {
            "images": images,
            "annotations": truth,
            "categories": [{"id": v, "name": k} for k, v in category.items()],
        }
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(found), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, ap75 = (max(0.0, float(v)) for v in evaluation.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75}


class ClipScorer:
    """CLIP score of each image against its global caption: 100 x max(cos, 0), captions cut at
    the text encoder's length (77 tokens for CLIP)."""

    def __init__(self, model: str, device: str):
        from transformers import CLIPModel, CLIPProcessor

        self.device = device
        self.model = CLIPModel.from_pretrained(model).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model)

    @torch.inference_mode()
    def scores(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        inputs = self.processor(
            text=list(captions),
            images=[image.convert("RGB") for image in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
        ).to(self.device)
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
        return (100 * cosine.clamp(min=0)).tolist()


INCEPTION_SIDE = 299


def inception_batch(images: Iterable[Image.Image]) -> torch.Tensor:
    """uint8 (N, 3, 299, 299): the Inception input size, so images of any size stack."""
    arrays = [
        np.asarray(image.convert("RGB").resize((INCEPTION_SIDE, INCEPTION_SIDE), Image.BICUBIC))
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FidScorer:
    """FID: Fréchet distance of Inception-v3 pool features (2048-d) between two image sets.

    The weights are torch-fidelity's ``pt_inception-2015-12-05`` state dict from a local file
    (nothing is downloaded), run through torchmetrics' ``NoTrainInceptionV3``, and the distance
    is torchmetrics' own. torch-fidelity reads the file with a full unpickler, so it is first
    opened here with ``torch.load(weights_only=True)``: a file holding anything but tensors is
    refused before that. Features are returned rather than accumulated so that the caller can
    cache them (the Inception forward is most of the benchmark's cost on a CPU)."""

    def __init__(self, inception: Path, device: str):
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            state = torch.load(inception, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{inception} is not a tensors-only Inception state dict: {error}"
            ) from None
        if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
            raise ValueError(f"{inception} is not torch-fidelity's Inception-v3 state dict")
        self.device = device
        self.network = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(inception),
        ).to(device)

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 2048) float64 pool features."""
        return self.network(inception_batch(images).to(self.device)).double().cpu().numpy()

    @staticmethod
    def distance(reference: np.ndarray, features: np.ndarray) -> float:
        """FID between two feature sets of at least two images each."""
        from torchmetrics.image.fid import _compute_fid

        if len(reference) < 2 or len(features) < 2:
            raise ValueError("FID needs at least two images in each set")
        mu1, mu2 = torch.from_numpy(reference.mean(0)), torch.from_numpy(features.mean(0))
        sigma1 = torch.from_numpy(np.cov(reference, rowvar=False))
        sigma2 = torch.from_numpy(np.cov(features, rowvar=False))
        # The distance is >= 0; a set against itself comes out slightly negative where the
        # covariances are rank-deficient (fewer images than 2048 features).
        return max(0.0, float(_compute_fid(mu1, sigma1, mu2, sigma2)))
