import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from pycocotools.coco import COCO

from annotate.backends import Tagger
from annotate.coco_export import export_coco
from annotate.config import DecodeConfig, load_config, parse_config
from annotate.detectors.grounding_dino import (
    GroundingDinoDetector,
    GroundingDinoSettings,
    build_prompt,
    chunk_tags,
    decode_queries,
    token_map,
)
from annotate.detectors.selection import select_detections
from annotate.engine.decode import decode_record
from annotate.engine.operators import annotate_records
from annotate.engine.records import Detection, Record
from annotate.engine.writer import ShardWriter
from annotate.schema import QUARANTINE_DIR, QUARANTINE_SCHEMA, SHARD_SCHEMA, Manifest, check_schema
from annotate.sources import FolderSource
from annotate.taggers.clip import ClipTagger, ClipTaggerSettings, select_tags
from annotate.taggers.vocabulary import load_vocabulary
from ifadapter.utils.profiles import ConfigError
from tests.support.annotate_inputs import TINY_PROFILE, write_scenes

LIMITS = DecodeConfig(min_side=16, working_side=64)


def models(root: Path) -> Path:
    return root / "out" / "tiny-models"


def decoded_records(directory: Path, count: int, start: int = 0) -> list[Record]:
    write_scenes(directory, count, start)
    source = FolderSource(directory)
    records = [
        Record(uri=item.uri, source="folder", partition=0, position=i)
        for i, item in enumerate(source.items())
    ]
    for record in records:
        decode_record(record, source, LIMITS, embed=False)
    return records


def test_ram_vocabulary_is_shipped_whole():
    tags = load_vocabulary("ram")
    assert len(tags) == 4585 and len(set(tags)) == 4585
    assert tags[:3] == ["3D CG rendering", "3D glasses", "abacus"] and tags[-1] == "zoo"


def test_tiny_profile_loads_and_missing_models_are_one_clear_error(
    tiny_models_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tiny_models_root)
    config = load_config(TINY_PROFILE)
    assert config.detector.settings.box_threshold == 0.25
    assert config.tagger.settings.model == str(models(tiny_models_root) / "clip")
    provenance = config.provenance()
    assert (
        provenance["tag"]["vocabulary"] == "ram" and "transformers" in provenance["tag"]["versions"]
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(TINY_PROFILE)
    message = str(caught.value)
    assert "\n" not in message
    assert "model 'out/tiny-models/clip' is not a local directory and HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize(
    ("section", "fault"),
    [
        ({"detector": {"backend": "yolo"}}, "unknown detector backend 'yolo'"),
        ({"detector": {"box_threshold": 2}}, "less than or equal to 1"),
        ({"detector": {"treshold": 0.3}}, "treshold"),
        ({"captioner": {"backend": "annotate.sources:FolderSource"}}, "is not a Captioner"),
        ({"captioner": {"backend": "annotate.nowhere:Thing"}}, "cannot be imported"),
        ({"wrong": 1}, "annotate.wrong: Extra inputs are not permitted"),
    ],
)
def test_config_faults_name_the_field(tiny_models_root, monkeypatch, section, fault):
    monkeypatch.chdir(tiny_models_root)
    base = {
        "tagger": {"model": "out/tiny-models/clip"},
        "detector": {"model": "out/tiny-models/grounding-dino"},
    }
    for key, value in section.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=fault):
        parse_config(base)


def test_profile_needs_an_annotate_section(tmp_path):
    (tmp_path / "other.yaml").write_text("train:\n  steps: 1\n")
    with pytest.raises(ConfigError, match="has no 'annotate:' section"):
        load_config(tmp_path / "other.yaml")


def test_select_tags_is_multi_label_best_first():
    similarities = torch.tensor([[0.1, 0.5, 0.3, 0.4], [0.0, 0.0, 0.9, -0.2]])
    tags = ["a", "b", "c", "d"]
    assert select_tags(similarities, tags, 3, 0.25) == [["b", "d", "c"], ["c"]]


def test_clip_tagger_loads_through_from_pretrained_and_tags(tiny_models_root, tmp_path):
    vocabulary = tmp_path / "tags.txt"
    vocabulary.write_text("red ball\nblue box\n\nred ball\ngreen triangle\n")
    settings = ClipTaggerSettings(
        model=str(models(tiny_models_root) / "clip"),
        vocabulary=str(vocabulary),
        max_tags=2,
        min_similarity=-1,
    )
    tagger = ClipTagger(settings, "cpu")
    assert tagger.tags == ["red ball", "blue box", "green triangle"]
    records = decoded_records(tmp_path / "images", 3)
    tags = tagger.tag(records)
    assert len(tags) == 3 and all(len(t) == 2 and set(t) <= set(tagger.tags) for t in tags)


def test_prompt_chunks_fit_the_text_length(tiny_models_root):
    detector = GroundingDinoDetector(
        GroundingDinoSettings(model=str(models(tiny_models_root) / "grounding-dino")), "cpu"
    )
    tags = load_vocabulary("ram")[:60]
    counts = [detector.token_count(t) for t in tags]
    chunks = chunk_tags(tags, counts, 24)
    assert [t for chunk in chunks for t in chunk] == tags and len(chunks) > 3
    for chunk in chunks:
        prompt, spans = build_prompt(chunk)
        encoded = detector.processor.tokenizer(prompt, return_offsets_mapping=True)
        assert len(encoded["input_ids"]) <= 24
        mapping = token_map(encoded["offset_mapping"], spans)
        assert mapping.sum(dim=1).tolist() == [detector.token_count(t) for t in chunk]
    assert chunk_tags(["a b c d e"], [5], 7) == []  # a tag that cannot fit is left out


def test_queries_take_whole_tags_as_labels():
    # tokens: [CLS] red ball . box . [SEP]
    mapping = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    probabilities = torch.tensor(
        [
            [0.9, 0.6, 0.3, 0.9, 0.1, 0.0, 0.0],  # red ball: best 0.6, mean 0.45
            [0.0, 0.1, 0.1, 0.0, 0.3, 0.0, 0.0],  # box: 0.3
            [0.0, 0.5, 0.02, 0.0, 0.1, 0.0, 0.0],  # red ball: 0.5, mean 0.26
            [0.0, 0.24, 0.0, 0.0, 0.2, 0.0, 0.0],  # below the box threshold
            [0.0, 0.3, 0.05, 0.0, 0.0, 0.0, 0.0],  # mean 0.175: below the text threshold
        ]
    )
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]] * 5)
    found = decode_queries(probabilities, boxes, mapping, ["red ball", "box"], 0.25, 0.2)
    assert [(d.label, round(d.score, 2)) for d in found] == [
        ("red ball", 0.6),
        ("box", 0.3),
        ("red ball", 0.5),
    ]
    assert found[0].box == pytest.approx((0.4, 0.3, 0.6, 0.7))


def test_nms_is_class_wise_with_size_and_count_limits():
    found = [
        Detection((0.1, 0.1, 0.5, 0.5), "cup", 0.9),
        Detection((0.12, 0.1, 0.5, 0.52), "cup", 0.8),  # same cup, suppressed
        Detection((0.1, 0.1, 0.5, 0.5), "table", 0.7),  # other label: kept
        Detection((0.6, 0.6, 0.61, 0.9), "cup", 0.95),  # 0.01 wide: too small
        Detection((0.6, 0.6, 0.9, 0.9), "cup", 0.4),
    ]
    kept = select_detections(found, nms_iou=0.5, min_box_size=0.02, max_instances=16)
    assert [(d.label, d.score) for d in kept] == [("cup", 0.9), ("table", 0.7), ("cup", 0.4)]
    assert len(select_detections(found, 0.5, 0.02, 2)) == 2
    assert select_detections([], 0.5, 0.02, 2) == []


def test_grounding_dino_detects_within_limits(tiny_models_root, tmp_path):
    settings = GroundingDinoSettings(
        model=str(models(tiny_models_root) / "grounding-dino"), max_instances=5, max_text_tokens=16
    )
    detector = GroundingDinoDetector(settings, "cpu")
    records = decoded_records(tmp_path / "images", 3)
    tags = load_vocabulary("ram")[100:130]
    for record in records:
        record.tags = tags
    records[2].tags = []
    found = detector.detect(records)
    assert len(found) == 3 and found[2] == []
    for detections in found[:2]:
        assert 0 < len(detections) <= 5
        for d in detections:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and x1 - x0 >= 0.02
            assert d.label in tags and d.score > 0.25


class PickyTagger(Tagger):
    """Fails on any batch that holds the second scene: one bad image, not a bad batch."""

    def tag(self, records: Sequence[Record]) -> list[list[str]]:
        if any(r.uri.endswith("scene-001.png") for r in records):
            raise RuntimeError("cannot tag this one")
        return [["shape"] for _ in records]


def test_a_failing_backend_costs_one_record_not_its_batch(tmp_path):
    records = decoded_records(tmp_path / "images", 3)
    records[2].reject("decode", "too_small: 8x8")
    annotate_records("tag", PickyTagger(None, "cpu"), records)
    assert records[0].tags == ["shape"]
    assert records[1].reject_reason == "tag_failed: RuntimeError: cannot tag this one"
    assert records[2].reject_reason == "too_small: 8x8" and records[2].tags == []


def test_writer_is_atomic_resumable_and_deduplicates(tmp_path):
    records = decoded_records(tmp_path / "images", 4)
    (tmp_path / "images" / "copy.png").write_bytes(
        (tmp_path / "images" / "scene-000.png").read_bytes()
    )
    source = FolderSource(tmp_path / "images")
    duplicate = Record(
        uri=str(tmp_path / "images" / "copy.png"), source="folder", partition=1, position=4
    )
    decode_record(duplicate, source, LIMITS, embed=False)
    records[3].reject("decode", "truncated: broken")
    for r in records:
        r.tags, r.caption = ["shape"], "shapes"
    records[0].instances = [Detection((0.1, 0.2, 0.5, 0.6), "shape", 0.9, "a shape")]
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00001.parquet.tmp").write_bytes(b"half a shard from a killed run")
    writer = ShardWriter(out, FolderSource.extra_schema, {"tag": {"backend": "picky"}})
    assert not (out / "shard-00001.parquet.tmp").exists()
    writer.write(0, list(reversed(records[:2] + records[3:])))
    stale = writer.quarantine_path(1)
    stale.write_bytes(b"quarantine part of a partition whose shard never came")
    with pytest.raises(RuntimeError, match=r"partitions \[1\] have no shard"):
        writer.finish(2, 5, {})

    resumed = ShardWriter(out, FolderSource.extra_schema, {"tag": {"backend": "picky"}})
    assert resumed.resume(range(2)) == [1] and not stale.exists()
    resumed.write(1, [records[2], duplicate])
    manifest = resumed.finish(2, 5, {"tag": {"backend": "picky"}})
    assert (manifest.rows, manifest.quarantined, manifest.inputs) == (3, 2, 5)
    Manifest.read(out).verify(out)
    first = pq.read_table(out / "shard-00000.parquet")
    check_schema(first.schema)
    assert first["uri"].to_pylist() == [records[0].uri, records[1].uri]  # input order
    assert json.loads(first["annotator"][0].as_py()) == {"tag": {"backend": "picky"}}
    quarantine = pq.read_table(out / QUARANTINE_DIR).to_pylist()
    check_schema(pq.read_schema(out / QUARANTINE_DIR / "part-00000.parquet"), QUARANTINE_SCHEMA)
    assert {(q["stage"], q["reason"].split(":")[0]) for q in quarantine} == {
        ("decode", "truncated"),
        ("dedup", "duplicate"),
    }

    counts = export_coco(out, tmp_path / "coco.json")
    assert counts == {"images": 3, "annotations": 1, "categories": 1}
    coco = COCO(str(tmp_path / "coco.json"))
    [annotation] = coco.loadAnns(coco.getAnnIds())
    image = coco.loadImgs(annotation["image_id"])[0]
    assert annotation["bbox"] == pytest.approx([6.4, 12.8, 25.6, 25.6], abs=1e-4)
    assert image["image_id"] == first["image_id"][0].as_py() and annotation["caption"] == "a shape"
    assert set(SHARD_SCHEMA.names) <= set(first.column_names)


def test_resources_the_cluster_lacks_are_an_error_up_front(tiny_models_root, monkeypatch):
    from annotate.engine.job import check_resources

    monkeypatch.chdir(tiny_models_root)
    config = load_config(TINY_PROFILE)
    check_resources(config, {"CPU": 2.0})
    with pytest.raises(ValueError, match=r"need 1.75 CPUs; the Ray cluster has 1"):
        check_resources(config, {"CPU": 1.0})
    config.detector.num_gpus = 1
    with pytest.raises(ValueError, match="the detect stage asks for 1 GPU per actor"):
        check_resources(config, {"CPU": 2.0})
