"""RAM++ and RAM from checkpoints in the official layout, against the recognize-anything code
(see ``tests/support/ram_reference.py`` for how the fixtures were made)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from annotate.backends import resolve_backend
from annotate.engine.records import Record
from annotate.taggers.ram import RamTagger, RamTaggerSettings, load_thresholds, select_tags
from annotate.taggers.vocabulary import load_vocabulary
from tests.support.paths import FIXTURES
from tests.support.ram_reference import IMAGE_SIZE, NUM_TAGS, random_checkpoint, sample_images


def record(image) -> Record:
    return Record(
        uri="mem",
        source="test",
        partition=0,
        position=0,
        pixels=image.tobytes(),
        pixels_size=image.size,
    )


@pytest.fixture(params=["ram_plus", "ram"])
def case(request, tmp_path):
    """(tagger on the reference's tiny checkpoint, the reference's output) per model."""
    meta = json.loads((FIXTURES / f"{request.param}.json").read_text())
    checkpoint = tmp_path / f"{request.param}.pth"
    torch.save(random_checkpoint(meta["layout"], meta["seed"]), checkpoint)
    (tmp_path / "tags.txt").write_text("\n".join(load_vocabulary("ram")[:NUM_TAGS]))
    (tmp_path / "thresholds.txt").write_text("\n".join(map(str, meta["thresholds"])))
    settings = RamTaggerSettings(
        checkpoint=str(checkpoint),
        image_size=IMAGE_SIZE,
        vocabulary=str(tmp_path / "tags.txt"),
        thresholds=str(tmp_path / "thresholds.txt"),
    )
    expected = load_file(FIXTURES / f"{request.param}.safetensors")["logits"]
    return request.param, RamTagger(settings, "cpu"), expected, meta["tags"]


def test_logits_and_tags_match_the_reference(case):
    name, tagger, expected, expected_tags = case
    assert tagger.model.plus == (name == "ram_plus")
    images = sample_images()
    logits = tagger.logits(images)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
    tags = tagger.tag([record(image) for image in images])
    assert [set(t) for t in tags] == [set(t) for t in expected_tags]
    assert all(len(t) > 0 for t in tags) and all(len(t) < NUM_TAGS for t in tags)
    probabilities = torch.sigmoid(logits)
    for row, chosen in zip(probabilities, tags, strict=True):  # best first
        scores = [row[tagger.tags.index(t)] for t in chosen]
        assert scores == sorted(scores, reverse=True)


def test_backend_names_and_shipped_thresholds():
    assert resolve_backend("tagger", "ram_plus") is RamTagger
    assert resolve_backend("tagger", "ram") is RamTagger
    settings = RamTaggerSettings.model_construct(vocabulary="ram", thresholds=None, threshold=0.68)
    thresholds = load_thresholds(settings, 4585)
    assert thresholds.shape == (4585,) and thresholds[0] == 0.65 and thresholds[-1] == 0.76
    assert float(thresholds.min()) > 0.4 and float(thresholds.max()) <= 1.0
    with pytest.raises(ValueError, match="4585 thresholds for 10 tags"):
        load_thresholds(settings, 10)


def test_select_tags_is_best_first_per_tag_threshold():
    probabilities = torch.tensor([[0.9, 0.5, 0.7], [0.1, 0.2, 0.3]])
    assert select_tags(probabilities, torch.tensor([0.8, 0.4, 0.6]), ["a", "b", "c"]) == [
        ["a", "c", "b"],
        [],
    ]


def test_checkpoint_faults_are_clear(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        RamTaggerSettings(checkpoint=str(tmp_path / "missing.pth"))
    torch.save({"model": {"fc.weight": torch.zeros(1, 4)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not a RAM / RAM\+\+ checkpoint"):
        RamTagger(RamTaggerSettings(checkpoint=str(tmp_path / "other.pth")), "cpu")
    torch.save(
        {"model": {"label_embed": torch.zeros(2, 512)}, "args": Path("x")}, tmp_path / "p.pth"
    )
    with pytest.raises(ValueError, match="holds more than tensors"):
        RamTagger(RamTaggerSettings(checkpoint=str(tmp_path / "p.pth")), "cpu")


def test_official_ram_plus_layout_loads_strictly():
    """The layout of the real RAM++ (Swin-L 384, 4,585 tags x 51 descriptions, built by the
    reference with its own configs) fills every weight of our model, shape for shape."""
    from annotate.taggers.ram_model import RamModel

    layout = json.loads((FIXTURES / "ram_plus.json").read_text())["official_layout"]["keys"]
    with torch.device("meta"):
        state = {
            key: torch.empty(shape, dtype=getattr(torch, dtype))
            for key, (shape, dtype, _) in layout.items()
        }
        model = RamModel.from_checkpoint_state(state, 4585, 384)
    swin = model.visual_encoder
    assert (swin.embed_dim, swin.num_features, model.descriptions) == (192, 1536, 51)
    assert [len(stage.blocks) for stage in swin.layers] == [2, 2, 18, 2]
    assert swin.layers[3].blocks[0].window_size == (12, 12)
    assert model.fc.in_features == 768 and len(model.tagging_head) == 2


def test_a_profile_names_the_ram_tagger(tmp_path):
    from annotate.config import TaggerConfig, parse_config
    from ifadapter.utils.profiles import ConfigError

    meta = json.loads((FIXTURES / "ram_plus.json").read_text())
    torch.save(random_checkpoint(meta["layout"], meta["seed"]), tmp_path / "ram_plus.pth")
    section = {"backend": "ram_plus", "checkpoint": str(tmp_path / "ram_plus.pth")}
    config = TaggerConfig.model_validate({**section, "image_size": 224, "num_cpus": 0.5})
    provenance = config.provenance()
    assert provenance["backend"] == "ram_plus" and "timm" in provenance["versions"]
    assert provenance["thresholds"] is None and provenance["image_size"] == 224
    with pytest.raises(ConfigError, match=r"annotate\.tagger\.checkpoint: .*is not a file"):
        parse_config({"tagger": {**section, "checkpoint": "nowhere.pth"}, "detector": {}})
