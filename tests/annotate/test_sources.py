import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotate.engine.plan import Plan, PlanMismatch, partition
from annotate.sources import (
    CocoSource,
    FolderSource,
    SourceError,
    UriListSource,
    open_source,
)
from tests.support.annotate_inputs import write_scenes


def write_coco(root, count=3):
    """COCO's layout in miniature: annotations/instances_x.json, captions_x.json, x/."""
    paths = write_scenes(root / "mini2017", count)
    images = [
        {
            "id": 10 * (i + 1),
            "file_name": p.name,
            "width": 64 + 8 * (i % 3),
            "height": 64 - 8 * (i % 2),
        }
        for i, p in enumerate(paths)
    ]
    instances = {
        "images": list(reversed(images)),
        "categories": [{"id": 1, "name": "ball"}, {"id": 2, "name": "box"}],
        "annotations": [
            {"id": 2, "image_id": 10, "category_id": 2, "bbox": [32, 16, 32, 48], "iscrowd": 0},
            {"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 16, 16], "iscrowd": 1},
        ],
    }
    captions = {"annotations": [{"id": 1, "image_id": 10, "caption": " A red ball. "}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_mini2017.json").write_text(json.dumps(instances))
    (root / "annotations" / "captions_mini2017.json").write_text(json.dumps(captions))
    return root / "annotations" / "instances_mini2017.json"


def test_folder_lists_images_recursively_in_a_stable_order(tmp_path):
    write_scenes(tmp_path / "b", 2)
    write_scenes(tmp_path / "a", 2, start=5)
    (tmp_path / "a" / "notes.txt").write_text("captions beside the images are not inputs")
    (tmp_path / ".cache").mkdir()
    write_scenes(tmp_path / ".cache", 1)
    (tmp_path / "UPPER.JPG").write_bytes(b"not really")
    items = list(FolderSource(tmp_path).items())
    names = [item.uri.removeprefix(str(tmp_path) + "/") for item in items]
    assert names == [
        "UPPER.JPG",
        "a/scene-005.png",
        "a/scene-006.png",
        "b/scene-000.png",
        "b/scene-001.png",
    ]
    assert [i.uri for i in FolderSource(tmp_path).items()] == [i.uri for i in items]
    with pytest.raises(SourceError, match="does not exist"):
        FolderSource(tmp_path / "nowhere")


def test_coco_subset_keeps_its_boxes_and_captions(tmp_path):
    annotations = write_coco(tmp_path)
    source = open_source(str(annotations))
    assert isinstance(source, CocoSource) and source.images == tmp_path / "mini2017"
    items = list(source.items())
    assert [i.extras["coco_id"] for i in items] == [10, 20, 30]
    first = items[0]
    assert first.uri == str(tmp_path / "mini2017" / "scene-000.png")
    assert first.caption == "A red ball." and first.extras["coco_captions"] == ["A red ball."]
    assert first.extras["coco_boxes"] == [
        {"box": [0.0, 0.0, 0.25, 0.25], "label": "ball", "crowd": True},
        {"box": [0.5, 0.25, 1.0, 1.0], "label": "box", "crowd": False},
    ]
    assert items[1].caption is None and items[1].extras["coco_boxes"] == []
    table = pa.Table.from_pylist([i.extras for i in items], schema=CocoSource.extra_schema)
    assert table.num_rows == 3
    (tmp_path / "mini2017").rename(tmp_path / "elsewhere")
    with pytest.raises(SourceError, match="no image folder mini2017/"):
        CocoSource(annotations)
    assert CocoSource(annotations, images=tmp_path / "elsewhere").images == tmp_path / "elsewhere"


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_uri_list_on_a_local_fsspec_path(tmp_path, kind):
    paths = write_scenes(tmp_path / "images", 3)
    table = pa.table(
        {
            "url": [f"images/{paths[0].name}", str(paths[1]), f"file://{paths[2]}"],
            "TEXT": ["a ball", None, "two boxes"],
        }
    )
    listing = tmp_path / f"list.{kind}"
    if kind == "parquet":
        pq.write_table(table, listing)
    else:
        table.to_pandas().to_csv(listing, index=False)
    source = open_source(f"file://{listing}")
    assert isinstance(source, UriListSource)
    items = list(source.items())
    assert [i.caption for i in items] == ["a ball", None, "two boxes"]
    assert items[0].uri == f"file://{tmp_path}/images/{paths[0].name}"
    for item in items:
        assert source.read(item.uri, 1 << 20) == paths[items.index(item)].read_bytes()


def test_uri_list_faults_are_one_clear_error(tmp_path):
    pq.write_table(pa.table({"name": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(SourceError, match="none of the columns uri, url, URL, path"):
        list(open_source(str(tmp_path / "bad.parquet")).items())
    with pytest.raises(SourceError, match="does not exist"):
        list(open_source(str(tmp_path / "missing.csv")).items())
    with pytest.raises(SourceError, match="is not an image folder"):
        open_source(str(tmp_path / "nothing-here"))


def test_plan_pins_inputs_and_annotator(tmp_path):
    paths = write_scenes(tmp_path / "images", 5)
    items = list(FolderSource(tmp_path / "images").items())
    parts = partition(items, 2)
    assert [len(p) for p in parts] == [2, 2, 1]
    plan = Plan.make({"kind": "folder"}, parts, 2, {"detect": {"box_threshold": 0.25}})
    (tmp_path / "out").mkdir()
    plan.adopt(tmp_path / "out")
    plan.adopt(tmp_path / "out")  # the same run again: fine
    paths[0].unlink()
    fewer = partition(list(FolderSource(tmp_path / "images").items()), 2)
    with pytest.raises(PlanMismatch, match=r"the inputs \(5 -> 4"):
        Plan.make({"kind": "folder"}, fewer, 2, plan.annotator).adopt(tmp_path / "out")
    with pytest.raises(PlanMismatch, match=r"the annotator \(detect\)"):
        Plan.make({"kind": "folder"}, parts, 2, {"detect": {"box_threshold": 0.3}}).adopt(
            tmp_path / "out"
        )
