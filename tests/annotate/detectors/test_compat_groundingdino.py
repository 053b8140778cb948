"""Original Grounding-DINO weights through the conversion into the transformers backend, against
the outputs of the original code (see ``tests/support/groundingdino_reference.py``)."""

import json

import pytest
import torch
import torchvision.transforms.functional as F
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    SwinConfig,
)

from annotate.backends import resolve_backend
from annotate.detectors.grounding_dino import build_prompt, decode_queries, token_map
from annotate.detectors.grounding_dino_convert import PRESETS, convert_original_state
from tests.support.groundingdino_reference import (
    BERT,
    PROMPT,
    random_state,
    sample_image,
    vocabulary,
)
from tests.support.paths import FIXTURES

FIXTURE = FIXTURES / "groundingdino_py"
META = json.loads(FIXTURE.with_suffix(".json").read_text())
EXPECTED = load_file(FIXTURE.with_suffix(".safetensors"))
TAGS = ["cat", "dog house", "red lamp"]


def tiny_config() -> GroundingDinoConfig:
    """``TINY_CONFIG`` in transformers' terms."""
    return GroundingDinoConfig(
        backbone_config=SwinConfig(**PRESETS["swint_ogc"], image_size=224, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(vocabulary()), **BERT),
        d_model=256,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=30,
        max_text_len=256,
    )


@pytest.fixture(scope="module")
def converted():
    model = GroundingDinoForObjectDetection(tiny_config()).eval()
    state = convert_original_state(random_state(META["layout"], META["seed"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied copies of the shared box head, and a Swin norm the backbone output does not use
    assert unexpected == [] and all(
        "bbox_embed.1." in key or "swin.layernorm." in key for key in missing
    ), missing
    return model


def test_converted_weights_give_the_original_outputs(converted, tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
    tokenizer = BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=True)
    assert build_prompt(TAGS)[0] == PROMPT
    text = tokenizer([PROMPT], return_tensors="pt", return_offsets_mapping=True)
    offsets = text.pop("offset_mapping")[0].tolist()
    image = F.resize(sample_image(), META["pixel_size"])  # the original's transform
    pixels = F.normalize(F.to_tensor(image), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        outputs = converted(
            pixel_values=pixels[None],
            pixel_mask=torch.ones(1, *META["pixel_size"], dtype=torch.long),
            **text,
        )
    length = EXPECTED["logits"].shape[-1]
    torch.testing.assert_close(outputs.logits[:, :, :length], EXPECTED["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.pred_boxes, EXPECTED["boxes"], atol=1e-5, rtol=0)

    # the same outputs through the detectors' shared decoding: the same boxes and labels
    mapping = token_map(offsets, build_prompt(TAGS)[1])
    ours, original = (
        decode_queries(logits[0, :, :length].sigmoid(), boxes[0], mapping, TAGS, 0.25, 0.2)
        for logits, boxes in (
            (outputs.logits, outputs.pred_boxes),
            (EXPECTED["logits"], EXPECTED["boxes"]),
        )
    )
    assert len(ours) > 0 and [d.label for d in ours] == [d.label for d in original]
    for mine, theirs in zip(ours, original, strict=True):
        assert mine.box == pytest.approx(theirs.box, abs=1e-5)


def test_unknown_original_keys_are_an_error():
    with pytest.raises(ValueError, match=r"unknown keys .*transformer\.extra"):
        convert_original_state({"transformer.extra.weight": torch.zeros(1)})


def test_groundingdino_py_backend_validates_without_the_package():
    backend = resolve_backend("detector", "groundingdino_py")
    settings = backend.Settings(checkpoint="groundingdino_swint_ogc.pth", box_threshold=0.3)
    assert (settings.config, settings.image_side, settings.max_side) == ("swint_ogc", 800, 1333)
    versions = backend.provenance(settings)["versions"]  # recorded by a driver without it
    assert versions["groundingdino-py"] is None and versions["torch"] is not None
