"""The authors' released weights through our converter and compatibility mode, against outputs
of their own inference code (``tests/support/released_reference.py`` made the fixture)."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from ifadapter import IFAdapter, IFAdapterSDXLPipeline, Instance, Layout, LayoutTensors, tiny
from ifadapter.cli import main
from ifadapter.released import (
    load_released_state,
    released_adapter,
    released_config,
)
from ifadapter.resampler import released_key_masks
from ifadapter.text import encode_instances
from tests.support.paths import FIXTURES
from tests.support.released_reference import (
    CONTROL_RATIO,
    GUIDANCE,
    LAYOUTS,
    STEPS,
    initial_latents,
    random_weights,
    unet_inputs,
)

FIXTURE = FIXTURES / "released_ifadapter"
META = json.loads(FIXTURE.with_suffix(".json").read_text())
EXPECTED = load_file(FIXTURE.with_suffix(".safetensors"))


def subset(config, keys) -> dict:
    return {key: config[key] for key in keys}


@pytest.fixture
def released_file(tmp_path):
    """An ``spd_adapter.bin`` of the released layout (tiny sizes) with the fixture's weights."""
    path = tmp_path / "spd_adapter.bin"
    torch.save(random_weights(META["tiny_state_dict"], META["seed"]), path)
    return path


@pytest.fixture
def converted(components, released_file, tmp_path):
    adapter = released_adapter(load_released_state(released_file), components["unet"])
    adapter.save_pretrained(tmp_path / "converted")
    return IFAdapter.from_pretrained(tmp_path / "converted")


def test_converted_config_is_the_released_architecture(converted):
    assert converted.config.layers == IFAdapter.for_unet(tiny.build_unet()).config.layers
    assert subset(
        converted.config,
        ["resampler_width", "resampler_depth", "resampler_heads", "resampler_dim_head"],
    ) == dict(resampler_width=32, resampler_depth=4, resampler_heads=2, resampler_dim_head=16)
    assert subset(
        converted.config,
        ["fourier_freqs", "box_embed_hidden", "qk_norm_dim", "fusion_slots", "injection"],
    ) == dict(
        fourier_freqs=8,
        box_embed_hidden=768,
        qk_norm_dim=8,
        fusion_slots=10,
        injection="before_to_out",
    )
    assert converted.tokens_per_instance == 13


def test_sdxl_scale_layout_loads_strictly():
    """The released SDXL layout (sizes of infer.py, built by the reference code on the meta
    device) maps onto every parameter of our adapter, shape for shape."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny.unet_config("sdxl"))
        state = {
            group: {key: torch.empty(shape) for key, shape in keys.items()}
            for group, keys in META["sdxl_state_dict"].items()
        }
        adapter = released_adapter(state, unet)
    assert adapter.config.layers == IFAdapter.for_unet(unet).config.layers
    assert len(adapter.config.layers) == 16 and set(adapter.config.layer_channels) == {1280}
    assert subset(
        adapter.config,
        ["resampler_width", "resampler_heads", "resampler_dim_head", "resampler_ff_mult"],
    ) == dict(resampler_width=2560, resampler_heads=20, resampler_dim_head=128, resampler_ff_mult=4)
    assert subset(
        adapter.config, ["cross_attention_dim", "fourier_freqs", "box_embed_hidden", "qk_norm_dim"]
    ) == dict(cross_attention_dim=2048, fourier_freqs=64, box_embed_hidden=768, qk_norm_dim=64)


def features_of(components, adapter, layouts=LAYOUTS):
    return encode_instances(
        [components["tokenizer"], components["tokenizer_2"]],
        [components["text_encoder"], components["text_encoder_2"]],
        LayoutTensors.from_layouts(layouts),
        adapter.config.text_encoder_layers,
    )


def test_instance_tokens_match_the_released_code(components, converted):
    features = features_of(components, converted)
    with torch.no_grad():
        tokens = converted.instance_tokens(features)[features.mask]
        dropped = converted.instance_tokens(features, keep_local=torch.zeros(2))[features.mask]
    torch.testing.assert_close(tokens, EXPECTED["tokens"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dropped, EXPECTED["tokens_unconditional"], atol=2e-5, rtol=1e-5)


def guided_unet_output(components, adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, adapted) UNet outputs on the fixture's inputs, guidance batch [uncond, cond]."""
    unet = components["unet"]
    inputs = unet_inputs(META["unet_inputs_seed"], 4, unet.config.cross_attention_dim, 32)
    features = features_of(components, adapter)
    adapter.install(unet)
    with torch.no_grad():
        base = unet(**inputs).sample
        dropped = adapter.instance_tokens(features, keep_local=torch.zeros(2))
        tokens = torch.cat([dropped, adapter.instance_tokens(features)])
        boxes, mask = torch.cat([features.boxes] * 2), torch.cat([features.mask] * 2)
        with adapter.activated(adapter.conditioning(tokens, boxes, mask, (16, 16))):
            return base, unet(**inputs).sample


def test_unet_output_matches_the_released_code(components, converted):
    base, adapted = guided_unet_output(components, converted)
    assert (EXPECTED["unet_output"] - base).abs().max() > 0.1  # far beyond the tolerance
    torch.testing.assert_close(adapted, EXPECTED["unet_output"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "paper_value",
    [
        {"injection": "after_to_out"},
        {"fusion_slots": None},
        {"fusion_slots": 4},
        {"dropped_description": "zero"},
    ],
)
def test_each_released_behaviour_is_needed(components, released_file, paper_value):
    state = load_released_state(released_file)
    adapter = released_adapter(state, components["unet"])
    changed = IFAdapter(**{**released_config(state, components["unet"]), **paper_value})
    changed.load_state_dict(adapter.state_dict())
    _, adapted = guided_unet_output(components, changed.eval())
    assert (adapted - EXPECTED["unet_output"]).abs().max() > 1e-2


def test_generation_matches_the_released_pipeline(base_dir, converted):
    pipe = IFAdapterSDXLPipeline.from_pretrained(base_dir, adapter=converted)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        [layout.caption for layout in LAYOUTS],
        [layout.instances for layout in LAYOUTS],
        control_ratio=CONTROL_RATIO,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=initial_latents(META["latents_seed"], len(LAYOUTS)),
        output_type="latent",
    ).images
    torch.testing.assert_close(latents, EXPECTED["latents"], atol=1e-4, rtol=1e-5)


def test_released_key_masks_lose_a_word_per_layer():
    words = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    masks = released_key_masks(words, 4)
    assert [m[0].nonzero()[:, 0].tolist() for m in masks] == [[1, 2, 3, 4], [1, 2, 4], [1, 4], [4]]
    assert all(m[1].nonzero()[:, 0].tolist() == [1] for m in masks)


def test_more_instances_than_released_slots_is_an_error(components, converted):
    crowd = Layout("many", [Instance((0.0, 0.0, 0.5, 0.5), f"shape {i}") for i in range(11)])
    features = features_of(components, converted, [crowd])
    with torch.no_grad():
        tokens = converted.instance_tokens(features)
    with pytest.raises(ValueError, match="11 instances; this adapter's fusion has 10"):
        converted.conditioning(tokens, features.boxes, features.mask, (16, 16))


def test_only_plain_released_state_dicts_load(tmp_path, released_file):
    state = torch.load(released_file, weights_only=True)
    state["pos_net"]["linears_position.9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.bin")
    with pytest.raises(ValueError, match=r"unknown keys .*pos_net\.linears_position\.9\.weight"):
        released_adapter(load_released_state(tmp_path / "extra.bin"), tiny.build_unet())
    torch.save({"text_proj_model": {}}, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="not a released IFAdapter checkpoint"):
        load_released_state(tmp_path / "partial.bin")
    torch.save({**state, "code": Layout("x")}, tmp_path / "pickle.bin")
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_released_state(tmp_path / "pickle.bin")


def test_convert_released_command(tmp_path, base_dir, released_file, converted):
    assert (
        main(
            [
                "convert-released",
                str(released_file),
                "--base",
                str(base_dir),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    written = IFAdapter.from_pretrained(tmp_path / "out")
    assert written.config == converted.config
    for key, value in converted.state_dict().items():
        assert torch.equal(written.state_dict()[key], value), key
    assert main(["convert-released", str(tmp_path / "missing.bin"), "--out", "x"]) == 2
    # without --base: the SDXL 1.0 UNet, whose layer at processor 7 is no 64-channel attn2
    assert main(["convert-released", str(released_file), "--out", str(tmp_path / "sdxl")]) == 2
