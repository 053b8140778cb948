"""How finely the adapter's attention grid sees the toy world's boxes, against SDXL's.

The ISM masks every cell a box touches (``ifadapter.attention_processor.box_masks``), so on a
coarse grid a box's mask is much larger than the box and neighbouring instances share cells.
For grids of 4-32 cells per side it reports, over 2,000 scenes of a toy world: cells a box spans
per side (median, minimum), mask area over box area (mean, median), the share of instance pairs
whose masks share a cell, and the share whose boxes really overlap. SDXL's released layers act
at 32x32 on a 1,024-px image (a box of side 0.1-0.6 spans 3-19 cells, mask ~1.2x its area): the
toy UNet should give the adapter a grid where a typical box spans at least ~4 cells per side and
its mask is at most ~1.35x its area.

    python -m benchmarks.toy_geometry [--scenes 2000]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from annotate.toy.world import scenes
from ifadapter.attention_processor import box_masks


def measure(grid: int, count: int) -> dict[str, float]:
    world = scenes(1, count)
    spans, ratios, shared, overlapping, pairs = [], [], 0, 0, 0
    for scene in world:
        boxes = torch.tensor([instance.box for instance in scene.instances], dtype=torch.float64)
        masks = box_masks(boxes, grid, grid)
        for instance, mask in zip(scene.instances, masks, strict=True):
            spans.append(instance.size * grid)
            ratios.append(mask.sum().item() / grid**2 / instance.size**2)
        for (a, mask_a), (b, mask_b) in itertools.combinations(
            zip(scene.instances, masks, strict=True), 2
        ):
            pairs += 1
            shared += bool((mask_a & mask_b).any())
            width = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
            height = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
            overlapping += width > 0 and height > 0
    return {
        "cells_per_side_median": statistics.median(spans),
        "cells_per_side_min": min(spans),
        "mask_over_box_mean": statistics.fmean(ratios),
        "mask_over_box_median": statistics.median(ratios),
        "pairs_sharing_a_cell": shared / pairs,
        "pairs_overlapping": overlapping / pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=2000)
    args = parser.parse_args()
    print("grid  cells/side (median, min)  mask/box (mean, median)  pairs sharing  overlapping")
    for grid in (4, 8, 16, 32):
        m = measure(grid, args.scenes)
        print(
            f"{grid:>2}x{grid:<2} {m['cells_per_side_median']:>10.1f}"
            f" {m['cells_per_side_min']:>5.1f}"
            f" {m['mask_over_box_mean']:>14.2f} {m['mask_over_box_median']:>7.2f}"
            f" {m['pairs_sharing_a_cell']:>14.0%} {m['pairs_overlapping']:>12.0%}"
        )


if __name__ == "__main__":
    main()
