"""The toy world as a data-engine source, annotated by the oracle on a real Ray."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotate.config import load_config
from annotate.engine.job import annotate
from annotate.schema import Manifest
from annotate.sources import SourceError, open_source
from annotate.toy.source import ToySource
from annotate.toy.world import parse_description, render, scenes
from tests.support.annotate_inputs import REPO

DEMO_PROFILE = REPO / "configs" / "demo.yaml"


def test_toy_source_lists_and_renders_the_world():
    source = open_source("toy:seed=5,count=12")
    assert isinstance(source, ToySource)
    items = list(source.items())
    world = scenes(5, 12)
    assert [item.caption for item in items] == [scene.caption for scene in world]
    assert items == list(source.items())
    image = Image.open(io.BytesIO(source.read(items[3].uri, 10**6)))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(render(world[3])))
    truth = items[3].extras["toy_instances"]
    assert [(t["shape"], t["colour"], t["texture"]) for t in truth] == [
        (i.shape, i.colour, i.texture) for i in world[3].instances
    ]


@pytest.mark.parametrize("spec", ["toy:seed=x", "toy:count=0", "toy:colour=3", "toy:seed=1,size=8"])
def test_bad_toy_specs_are_named(spec):
    with pytest.raises(SourceError, match="toy"):
        open_source(spec)


def test_descriptions_parse_back():
    instance = scenes(3, 1)[0].instances[0]
    assert parse_description(instance.caption) == (
        instance.shape,
        instance.colour,
        instance.texture,
    )
    with pytest.raises(ValueError, match="toy-world description"):
        parse_description("a dog")


def test_oracle_annotates_the_ground_truth(ray_cluster, tmp_path):
    config = load_config(DEMO_PROFILE)
    summary = annotate(config, open_source("toy:seed=9,count=40"), tmp_path / "shards")
    assert (summary.inputs, summary.rows, summary.quarantined) == (40, 40, {})
    manifest = Manifest.read(tmp_path / "shards")
    rows = [
        r for p in manifest.shard_paths(tmp_path / "shards") for r in pq.read_table(p).to_pylist()
    ]
    world = {f"toy:seed=9,size=64/{k}": scene for k, scene in enumerate(scenes(9, 40))}
    for row in rows:
        scene = world[row["uri"]]
        assert row["caption"] == scene.caption
        assert [i["caption"] for i in row["instances"]] == [i.caption for i in scene.instances]
        assert [i["label"] for i in row["instances"]] == [i.colour for i in scene.instances]
        for got, instance in zip(row["instances"], scene.instances, strict=True):
            assert np.allclose(got["box"], instance.box, atol=1e-6)
        assert row["image"] is not None  # toy URIs are not files: the shard keeps the pixels
        assert "annotate.toy.oracle:OracleDetector" in row["annotator"]
