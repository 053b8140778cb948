"""A shard dataset as COCO JSON, for tools that speak COCO (viewers, pycocotools evaluation).

Images keep the dataset's ``image_id`` and global caption beside COCO's integer ids;
annotations carry the detector's score and the instance caption beside the box (pixels, xywh,
in the image as decoded: EXIF orientation applied). Categories are the labels found, sorted.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from annotate.schema import Manifest
from ifadapter.utils.files import write_json_atomic

COLUMNS = ["image_id", "uri", "width", "height", "caption", "instances"]


def export_coco(directory: str | Path, path: str | Path) -> dict[str, int]:
    """Writes ``path`` (atomically) from the dataset in ``directory``; returns the counts."""
    directory, path = Path(directory), Path(path)
    manifest = Manifest.read(directory)
    rows = [
        row
        for shard in manifest.shard_paths(directory)
        for row in pq.read_table(shard, columns=COLUMNS).to_pylist()
    ]
    labels = sorted({i["label"] for row in rows for i in row["instances"]})
    category = {label: index for index, label in enumerate(labels, start=1)}
    images, annotations = [], []
    for number, row in enumerate(rows, start=1):
        width, height = row["width"], row["height"]
        images.append(
            {
                "id": number,
                "file_name": row["uri"],
                "width": width,
                "height": height,
                "image_id": row["image_id"],
                "caption": row["caption"],
            }
        )
        for instance in row["instances"]:
            x0, y0, x1, y1 = instance["box"]
            box = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": number,
                    "category_id": category[instance["label"]],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                    "score": instance["score"],
                    "caption": instance["caption"],
                }
            )
    coco = {
        "info": {"description": f"exported from {directory}", "annotator": manifest.annotator},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": label, "supercategory": ""} for label, i in category.items()
        ],
    }
    write_json_atomic(path, coco)
    return {"images": len(images), "annotations": len(annotations), "categories": len(category)}
