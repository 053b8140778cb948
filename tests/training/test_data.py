"""Training data without Ray: buckets, crop and flip geometry, instance cap, row validation,
shard schema, the training profile."""

import hashlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from annotate.schema import SHARD_SCHEMA, SchemaError
from ifadapter import Instance, Layout, tiny
from ifadapter.utils.profiles import ConfigError
from tests.conftest import TINY_PROFILE
from tests.support.shards import shapes_row, write_dataset
from training.augment import (
    ViewGeometry,
    aspect_buckets,
    largest_instances,
    make_view,
    nearest_bucket,
    view_rng,
)
from training.config import AugmentConfig, load_train_config
from training.shards import RowError, decode_image, open_dataset, row_layout


def test_buckets_are_sdxl_like():
    buckets = aspect_buckets(1024, 64, 4.0)
    assert (1024, 1024) in buckets and (512, 2048) in buckets and (2048, 512) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in buckets)
    assert all(0.9 * 1024**2 <= h * w <= 1024**2 for h, w in buckets)
    assert nearest_bucket(1920, 1080, buckets) == (768, 1344)  # SDXL's 16:9 bucket
    assert nearest_bucket(1080, 1920, buckets) == (1344, 768)
    assert aspect_buckets(64, 16, 2.0) == [(48, 80), (64, 64), (80, 48)]


BOXES = np.array(
    [
        [0.0, 0.0, 0.2, 0.5],  # left of the crop: dropped
        [0.2, 0.0, 0.4, 1.0],  # at the crop's left edge: kept whole
        [0.4, 0.2, 0.6, 0.4],  # inside: moved
        [0.7, 0.0, 0.8, 1.0],  # right of the crop: dropped
        [0.6, 0.5, 0.8, 0.75],  # half outside: clipped, kept at min_visible 0.5
    ]
)


def test_crop_moves_clips_and_drops_boxes():
    geometry = ViewGeometry((100, 200), (100, 200), (100, 100), top=0, left=40, flip=False)
    kept, boxes = geometry.move_boxes(BOXES, min_visible=0.5)
    assert kept.tolist() == [1, 2, 4]
    np.testing.assert_allclose(
        boxes, [[0, 0, 0.4, 1], [0.4, 0.2, 0.8, 0.4], [0.8, 0.5, 1.0, 0.75]], atol=1e-9
    )
    kept, _ = geometry.move_boxes(BOXES, min_visible=0.6)
    assert kept.tolist() == [1, 2]
    assert geometry.time_ids() == (100, 200, 0, 40, 100, 100)


def test_flip_mirrors_boxes_and_the_crop_offset():
    geometry = ViewGeometry((100, 200), (100, 200), (100, 100), top=0, left=40, flip=True)
    kept, boxes = geometry.move_boxes(BOXES, min_visible=0.5)
    assert kept.tolist() == [1, 2, 4]
    np.testing.assert_allclose(
        boxes, [[0.6, 0, 1.0, 1], [0.2, 0.2, 0.6, 0.4], [0.0, 0.5, 0.2, 0.75]], atol=1e-9
    )
    # The view is the flipped image's crop starting 200 - 40 - 100 = 60 px from its left.
    assert geometry.time_ids() == (100, 200, 0, 60, 100, 100)


def test_pixels_and_boxes_move_together():
    """Random crops and flips of a wide image: the red block's pixels stay inside its box."""
    row = shapes_row("wide", [((0.55, 0.25, 0.8, 0.75), "red", "square")], width=160, height=64)
    image, layout = decode_image(row), row_layout(row)
    augment = AugmentConfig(resolution=64, bucket_step=16, max_aspect=2.0, flip=0.5)
    buckets = aspect_buckets(64, 16, 2.0)
    flips = set()
    for view in range(8):
        rng = view_rng(0, "wide", view)
        geometry = ViewGeometry.plan(image.width, image.height, buckets, augment, rng)
        flips.add(geometry.flip)
        result = make_view(image, layout, buckets, augment, view_rng(0, "wide", view))
        assert result.pixels.shape == (48, 80, 3)
        red = (result.pixels[..., 0] > 150) & (result.pixels[..., 1] < 100)
        if not len(result.boxes):
            continue
        ys, xs = np.nonzero(red)
        x0, y0, x1, y1 = result.boxes[0] * [80, 48, 80, 48]
        assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
        assert red.sum() > 0.8 * (x1 - x0) * (y1 - y0)
    assert flips == {True, False}


def test_instance_cap_keeps_the_largest_in_their_order():
    boxes = np.array(
        [[0, 0, 0.1, 0.1], [0, 0, 0.5, 0.5], [0, 0, 0.3, 0.3], [0, 0, 0.5, 0.5], [0, 0, 0.2, 0.2]]
    )
    assert largest_instances(boxes, 3).tolist() == [1, 2, 3]
    assert largest_instances(boxes, 10).tolist() == [0, 1, 2, 3, 4]
    inside = boxes * 0.8 + 0.1
    layout = Layout("five", [Instance(tuple(b), f"i{n}") for n, b in enumerate(inside)])
    image = Image.new("RGB", (64, 64))
    augment = AugmentConfig(
        resolution=64, bucket_step=16, random_crop=False, flip=0.0, max_instances=2
    )
    view = make_view(image, layout, aspect_buckets(64, 16, 2.0), augment, view_rng(0, "x", 0))
    assert view.captions == ["i1", "i3"]


def test_views_are_reproducible_and_distinct():
    first = view_rng(3, "image", 0).integers(0, 1 << 30, 4)
    assert (first == view_rng(3, "image", 0).integers(0, 1 << 30, 4)).all()
    assert (first != view_rng(3, "image", 1).integers(0, 1 << 30, 4)).any()


def test_bad_rows_say_why(tmp_path):
    row = shapes_row("ok", [((0.1, 0.1, 0.5, 0.5), "red", "circle")])
    assert decode_image(row).size == (64, 64)
    assert row_layout(row).instances[0].caption == "a red circle"

    outside = {
        **row,
        "instances": [*row["instances"], {**row["instances"][0], "box": [0.5, 0.5, 1.2, 0.9]}],
    }
    with pytest.raises(RowError, match=r"instance 1: box .* outside \[0, 1\]"):
        row_layout(outside)
    unnamed = {**row, "instances": [{**row["instances"][0], "caption": None, "label": None}]}
    with pytest.raises(RowError, match="instance 0: caption must be text"):
        row_layout(unnamed)
    labelled = {**row, "instances": [{**row["instances"][0], "caption": ""}]}
    assert row_layout(labelled).instances[0].caption == "circle"

    with pytest.raises(RowError, match="sha256"):
        decode_image({**row, "image": row["image"][:-1]})
    garbage = b"not an image"
    with pytest.raises(RowError, match="does not decode"):
        decode_image({**row, "image": garbage, "sha256": hashlib.sha256(garbage).hexdigest()})
    with pytest.raises(RowError, match="row declares 32x64"):
        decode_image({**row, "width": 32})

    on_disk = tmp_path / "ok.png"
    on_disk.write_bytes(row["image"])
    assert decode_image({**row, "image": None, "uri": str(on_disk)}).size == (64, 64)
    assert decode_image({**row, "image": None, "uri": on_disk.as_uri()}).size == (64, 64)
    with pytest.raises(RowError, match="cannot read"):
        decode_image({**row, "image": None, "uri": str(tmp_path / "missing.png")})


def test_a_shard_without_required_columns_is_named(tmp_path):
    row = shapes_row("ok", [((0.1, 0.1, 0.5, 0.5), "red", "circle")])
    schema = SHARD_SCHEMA.remove(SHARD_SCHEMA.get_field_index("instances"))
    write_dataset(tmp_path, [[{k: v for k, v in row.items() if k != "instances"}]], schema=schema)
    with pytest.raises(SchemaError, match=r"shard-00000\.parquet.*missing column 'instances'"):
        open_dataset(tmp_path)
    with pytest.raises(SchemaError, match="not a shard dataset"):
        open_dataset(tmp_path / "nowhere")
    typed = SHARD_SCHEMA.set(SHARD_SCHEMA.get_field_index("width"), pa.field("width", pa.int64()))
    write_dataset(tmp_path / "typed", [[row]], schema=typed)
    with pytest.raises(SchemaError, match="column 'width' is int64"):
        open_dataset(tmp_path / "typed")


def test_tiny_profile_loads_and_matches_the_tiny_adapter(tmp_path):
    config = load_train_config(TINY_PROFILE)
    # The tiny adapter's sizes, on the decoder layers of the toy base the profile trains on.
    assert config.adapter == {**tiny.adapter_config(), "layer_patterns": ["up_blocks.*attn2"]}
    assert config.lr == 1e-4 and config.drop_local == 0.15 and config.drop_global == 0.30
    override = load_train_config(TINY_PROFILE, max_steps=7, num_workers=2, base=None)
    assert override.max_steps == 7 and override.num_workers == 2 and override.base == config.base

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  base: b\n  data: d\n  output: o\n  max_steps: 0\n  colour: red\n")
    with pytest.raises(ConfigError) as error:
        load_train_config(bad)
    message = str(error.value)
    assert "\n" not in message and "max_steps" in message and "colour" in message
    bad.write_text("train:\n  base: b\n  data: d\n  output: o\n  max_steps: 1\n  adapter: {x: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown adapter settings \['x'\]"):
        load_train_config(bad)
    bad.write_text("annotate: {}\n")
    with pytest.raises(ConfigError, match="no 'train:' section"):
        load_train_config(bad)
