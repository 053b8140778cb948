"""The ISM processor and gated fusion on a tiny SDXL-architecture UNet."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ifadapter import IFAdapter, Instance, Layout, LayoutTensors, encode_instances, tiny
from ifadapter.attention_processor import box_masks, box_positions
from ifadapter.box_embedding import FourierEmbedder
from ifadapter.fusion import FusionScorer, fuse_instances, fusion_weights
from tests.conftest import open_gates


def unet_inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, 64, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        },
    )


def features_for(components, adapter, layouts):
    return encode_instances(
        [components["tokenizer"], components["tokenizer_2"]],
        [components["text_encoder"], components["text_encoder_2"]],
        LayoutTensors.from_layouts(layouts),
        adapter.config.text_encoder_layers,
    )


TWO = Layout(
    "two shapes",
    [
        Instance((0.0, 0.0, 0.5, 0.5), "a red striped circle"),
        Instance((0.5, 0.5, 1.0, 0.75), "a blue square"),
    ],
)


def test_default_layers_are_the_released_sixteen_on_sdxl():
    with torch.device("meta"):
        unet = tiny.build_unet("sdxl")
        adapter = IFAdapter.for_unet(unet)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL 1.0 base UNet
    assert len(adapter.config.layers) == 16
    assert set(adapter.config.layer_channels) == {1280}
    assert sum(name.startswith("mid_block") for name in adapter.config.layers) == 4
    assert adapter.tokens_per_instance == 13


def test_processor_without_conditioning_is_the_stock_processor(components):
    unet = components["unet"]
    inputs = unet_inputs(2)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        stock = unet(**inputs).sample
        adapter = open_gates(IFAdapter.for_unet(unet, **tiny.adapter_config()))
        adapter.install(unet)
        installed = unet(**inputs).sample
    assert torch.equal(stock, installed)
    kinds = {type(p).__name__ for p in unet.attn_processors.values()}
    assert kinds == {"AttnProcessor2_0", "IFAdapterAttnProcessor"}


def test_closed_gate_is_exactly_the_base_unet(components):
    unet = components["unet"]
    adapter = IFAdapter.for_unet(unet, **tiny.adapter_config())
    inputs = unet_inputs(1)
    with torch.no_grad():
        base = unet(**inputs).sample
        adapter.install(unet)
        adapted = adapter(unet, *inputs.values(), features_for(components, adapter, [TWO]))
    assert torch.equal(base, adapted)


def ism_output(adapter, components, layout, layer_name, query):
    """The ISM residual of one layer for ``layout``, given a fixed query."""
    features = features_for(components, adapter, [layout])
    with torch.no_grad():
        tokens = adapter.instance_tokens(features)
        conditioning = adapter.conditioning(tokens, features.boxes, features.mask, (16, 16))
        processor = components["unet"].attn_processors[f"{layer_name}.processor"]
        return processor.instance_semantic_map(
            conditioning, query, heads=query.shape[1]
        ), conditioning


@pytest.mark.parametrize("layer_index", [0, -1])
def test_changing_one_description_changes_only_its_box(components, layer_index):
    unet = components["unet"]
    torch.manual_seed(0)
    adapter = open_gates(IFAdapter.for_unet(unet, **tiny.adapter_config()), 0.7)
    adapter.install(unet)
    name = adapter.config.layers[layer_index]
    channels = adapter.config.layer_channels[layer_index]
    heads = unet.get_submodule(name).heads
    query = torch.randn(1, heads, 4 * 4, channels // heads)  # the 4x4 level of a 16x16 latent
    changed = Layout(
        TWO.caption, [TWO.instances[0], Instance(TWO.instances[1].box, "a green dotted triangle")]
    )
    before, conditioning = ism_output(adapter, components, TWO, name, query)
    after, _ = ism_output(adapter, components, changed, name, query)
    grid = conditioning.grid(16)
    changed_box = grid.masks[0, 1]
    difference = (after - before).abs().sum(-1)[0]
    assert difference[changed_box].min() > 0
    assert torch.all(difference[~changed_box] == 0)
    assert torch.all(before[0][~grid.foreground[0]] == 0)  # background: no contribution at all


def test_box_masks_keep_small_boxes_and_cover_partial_cells():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.30, 0.30, 0.31, 0.31], [0.1, 0.6, 0.9, 1.0]])
    masks = box_masks(boxes, 4, 4).view(3, 4, 4)
    assert masks[0].sum() == 4 and masks[0, :2, :2].all()
    assert masks[1].sum() == 1 and masks[1, 1, 1]
    assert masks[2].sum() == 8 and masks[2, 2:, :].all()


def test_fusion_weights_sum_to_one_over_covering_instances():
    torch.manual_seed(0)
    masks = box_masks(
        torch.tensor([[[0.0, 0.0, 0.75, 0.75], [0.25, 0.25, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]]), 4, 4
    )
    masks[0, 2] = False  # a padding slot
    weights = fusion_weights(torch.randn(1, 3, 16) * 5, masks)
    covered = masks.any(1)
    assert torch.allclose(weights.sum(1)[covered], torch.ones(int(covered.sum())))
    assert torch.all(weights.sum(1)[~covered] == 0)
    assert torch.all(weights[~masks] == 0)
    assert torch.all(weights[0, 2] == 0)


def test_small_box_inside_large_box_gets_the_larger_share():
    channels = 8
    scorer = FusionScorer(channels, reduction=4, kernel_size=3)
    with torch.no_grad():  # equal scores everywhere: only the area term decides
        scorer.to_score.weight.zero_()
        scorer.to_score.bias.zero_()
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]]])
    masks = box_masks(boxes, 4, 4)
    union = masks.any(1).sum(-1, keepdim=True).float()
    area_weight = torch.sigmoid(union / masks.sum(-1).float())
    maps = torch.zeros(1, 2, 16, channels)
    maps[0, 0, :, 0] = 1.0  # large box speaks on channel 0, small box on channel 1
    maps[0, 1, :, 1] = 1.0
    fused = fuse_instances(maps, masks, area_weight, scorer, 4, 4)
    inside_small = masks[0, 1]
    assert torch.all(fused[0, inside_small, 1] > fused[0, inside_small, 0])
    assert torch.all(fused[0, ~inside_small, 1] == 0)


def test_padding_invariance(components):
    unet = components["unet"]
    torch.manual_seed(0)
    adapter = open_gates(IFAdapter.for_unet(unet, **tiny.adapter_config()), 0.9)
    adapter.install(unet)
    more = Layout(
        "more",
        [
            Instance((0.1 * i, 0.1 * i, 0.1 * i + 0.4, 0.1 * i + 0.4), f"shape {i}")
            for i in range(5)
        ],
    )
    single = unet_inputs(1, seed=3)
    pair = unet_inputs(2, seed=4)
    for key in ("sample", "encoder_hidden_states"):
        pair[key][0] = single[key][0]
    for key in ("text_embeds", "time_ids"):
        pair["added_cond_kwargs"][key][0] = single["added_cond_kwargs"][key][0]
    with torch.no_grad():
        alone = adapter(unet, *single.values(), features_for(components, adapter, [TWO]))
        batched = adapter(unet, *pair.values(), features_for(components, adapter, [TWO, more]))
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_unconditional_tokens_keep_only_the_box_embedding(components):
    adapter = IFAdapter.for_unet(components["unet"], **tiny.adapter_config())
    features = features_for(components, adapter, [TWO])
    with torch.no_grad():
        tokens = adapter.instance_tokens(features, keep_local=torch.zeros(1))
        boxes = adapter.box_embedding(features.boxes)
    torch.testing.assert_close(tokens, boxes[:, :, None, :].expand_as(tokens))


@pytest.mark.parametrize(
    ("appearance", "eot", "count"), [(True, True, 13), (False, True, 1), (True, False, 12)]
)
def test_ablation_token_counts(components, appearance, eot, count):
    adapter = IFAdapter.for_unet(
        components["unet"], **tiny.adapter_config(), appearance_tokens=appearance, eot_token=eot
    )
    tokens = adapter.instance_tokens(features_for(components, adapter, [TWO]))
    assert tokens.shape == (1, 2, count, 64) == (1, 2, adapter.tokens_per_instance, 64)


def test_install_rejects_mismatched_unets(components):
    adapter = IFAdapter.for_unet(components["unet"], **tiny.adapter_config())
    with torch.device("meta"):
        other = tiny.build_unet("sdxl")
    with pytest.raises(ValueError, match=r"no attention layer|not a .*-channel"):
        adapter.install(other)
    with pytest.raises(ValueError, match="no cross-attention layer"):
        IFAdapter.for_unet(components["unet"], layer_patterns=["down_blocks.0.*"])


def test_box_positions_are_cell_centres_in_the_box_frame():
    boxes = torch.tensor([[[0.25, 0.0, 0.75, 0.5], [0.0, 0.0, 0.0, 0.0]]])  # a box, a padding slot
    position = box_positions(boxes, 4, 4).view(1, 2, 4, 4, 2)
    centres = torch.tensor([-0.25, 0.25, 0.75, 1.25])  # cell centres 1/8, 3/8, 5/8, 7/8 along x
    torch.testing.assert_close(position[0, 0, 0, :, 0], centres)
    torch.testing.assert_close(position[0, 0, :, 0, 1], torch.tensor([0.25, 0.75, 1.25, 1.75]))
    assert position[0, 1].isfinite().all() and position.abs().max() <= 2  # empty box: clamped


def test_fourier_bands_survive_a_half_precision_cast():
    """An adapter cast to float16 keeps its Fourier bands exact: pi * 2^15 is past float16's
    range, and a rounded band would move every high-band angle by whole radians."""
    fourier = FourierEmbedder.octaves(16).to(torch.float16)
    position = torch.tensor([[0.3, 0.7]])
    torch.testing.assert_close(fourier(position), FourierEmbedder.octaves(16)(position))
    assert fourier(position.half()).dtype == torch.float16


def test_box_position_lets_a_constant_query_draw_inside_its_box(components):
    """Without positions a box's cells all get the same map when the query is the same
    everywhere (the layer cannot tell the box's corner from its centre, so a triangle's box
    fills like a square's); the position term makes the map vary inside the box, and starts at
    zero, so an untrained adapter with it is the adapter without it."""
    unet = components["unet"]
    torch.manual_seed(0)
    adapter = open_gates(
        IFAdapter.for_unet(unet, **tiny.adapter_config(), box_position_freqs=4), 0.7
    )
    adapter.install(unet)
    name, channels = adapter.config.layers[0], adapter.config.layer_channels[0]
    heads = unet.get_submodule(name).heads
    query = torch.randn(1, heads, 1, channels // heads).expand(-1, -1, 8 * 8, -1)
    layout = Layout("one", [Instance((0.0, 0.0, 1.0, 1.0), "a red striped triangle")])

    def spread() -> float:
        ism, _ = ism_output(adapter, components, layout, name, query)
        return float((ism[0] - ism[0].mean(0)).abs().max())

    layer = adapter.ism_layer(name)
    assert spread() < 1e-5  # zero-initialised: the paper's ISM
    with torch.no_grad():
        layer.to_q_pos.weight.normal_()
    assert spread() > 1e-2


def test_box_position_weights_round_trip(components, tmp_path):
    adapter = IFAdapter.for_unet(components["unet"], **tiny.adapter_config(), box_position_freqs=3)
    with torch.no_grad():
        for layer in adapter.ism_layers.values():
            layer.to_q_pos.weight.normal_()
    adapter.save_pretrained(tmp_path)
    reloaded = IFAdapter.from_pretrained(tmp_path)
    assert reloaded.config.box_position_freqs == 3
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])
