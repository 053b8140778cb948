import torch

from ifadapter import tiny


def test_tokenizers_use_real_clip_ids_and_sdxl_padding():
    first, second = tiny.clip_tokenizers()
    ids = first("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert second("a photo of a cat").input_ids == ids
    padded_first = first("a cat", padding="max_length", max_length=77).input_ids
    padded_second = second("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded_first) == 77 and padded_first[-1] == 49407
    assert padded_second[-1] == 0  # OpenCLIP bigG pads with "!"


def test_components_are_seeded():
    a, b = tiny.components(seed=1), tiny.components(seed=1)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for (key, x), y in zip(
            a[name].state_dict().items(), b[name].state_dict().values(), strict=True
        ):
            assert torch.equal(x, y), f"{name}.{key}"


def test_sdxl_width_text_encoders_match_the_real_ones():
    first, second = tiny.text_encoder_configs("sdxl")
    assert (first.hidden_size, first.num_hidden_layers) == (768, 12)
    assert (second.hidden_size, second.num_hidden_layers, second.projection_dim) == (1280, 32, 1280)
    assert first.hidden_size + second.hidden_size == tiny.unet_config("sdxl")["cross_attention_dim"]
