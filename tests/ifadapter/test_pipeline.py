"""IFAdapterSDXLPipeline through diffusers' own loading and denoising code paths."""

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict

from ifadapter import IFAdapter, IFAdapterSDXLPipeline, Instance
from ifadapter.attention_processor import IFAdapterAttnProcessor
from ifadapter.visualize import draw_layout
from tests.ifadapter.test_attention import TWO

STEPS = 4


def generate(pipe, prompt=TWO.caption, instances=TWO.instances, seed=0, **kwargs):
    kwargs.setdefault("guidance_scale", 7.5)  # the paper's; the pipeline's default is stock's 5
    return pipe(
        prompt,
        instances,
        num_inference_steps=STEPS,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


def base_images(base_dir, prompt=TWO.caption, seed=0, **kwargs):
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


def test_untrained_adapter_equals_base_pipeline(make_pipeline, base_dir):
    assert np.array_equal(generate(make_pipeline()), base_images(base_dir))


def test_zero_instances_and_zero_control_ratio_equal_base(make_pipeline, base_dir):
    pipe = make_pipeline(gate=1.0)
    base = base_images(base_dir)
    assert np.array_equal(generate(pipe, instances=[]), base)
    assert np.array_equal(generate(pipe, control_ratio=0.0), base)
    assert not np.array_equal(generate(pipe), base)


def count_conditioned_calls(monkeypatch, pipe):
    """Counts the ISM computations of the adapter's first layer (the pipeline installs its
    processors for each call only, so the count is taken on the class)."""
    calls = []
    original = IFAdapterAttnProcessor.instance_semantic_map
    first = pipe.adapter.config.layers[0]

    def counted(self, *args, **kwargs):
        if self.name == first:
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IFAdapterAttnProcessor, "instance_semantic_map", counted)
    return calls


@pytest.mark.parametrize(("ratio", "active_steps"), [(1.0, 4), (0.5, 2), (0.3, 2), (0.1, 1)])
def test_control_ratio_limits_the_steps_the_adapter_acts_in(
    make_pipeline, monkeypatch, ratio, active_steps
):
    pipe = make_pipeline(gate=1.0)
    calls = count_conditioned_calls(monkeypatch, pipe)
    generate(pipe, control_ratio=ratio)
    assert len(calls) == active_steps
    assert pipe.adapter.active_conditioning() is None


def test_batches_of_prompts_images_per_prompt_and_non_square(make_pipeline):
    pipe = make_pipeline(gate=1.0)
    other = [Instance((0.2, 0.2, 0.8, 0.4), "a yellow dotted triangle")] * 3
    images = generate(
        pipe,
        prompt=[TWO.caption, "three triangles"],
        instances=[TWO.instances, other],
        num_images_per_prompt=2,
        height=64,
        width=96,
    )
    assert images.shape == (4, 64, 96, 3)
    assert np.isfinite(images).all()


def test_without_guidance_and_with_another_scheduler(make_pipeline):
    pipe = make_pipeline(gate=1.0)
    assert generate(pipe, guidance_scale=1.0).shape == (1, 64, 64, 3)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert np.isfinite(generate(pipe)).all()


def test_hundred_instances(make_pipeline):
    pipe = make_pipeline(gate=1.0)
    many = [
        Instance(
            ((i % 10) / 10, (i // 10) / 10, (i % 10) / 10 + 0.1, (i // 10) / 10 + 0.1), f"shape {i}"
        )
        for i in range(100)
    ]
    images = generate(pipe, prompt="a grid", instances=many)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_bad_input_is_a_clear_error(make_pipeline):
    pipe = make_pipeline()
    with pytest.raises(ValueError, match=r"prompt 1: instance 0: box .* outside \[0, 1\]"):
        generate(pipe, prompt=["a", "b"], instances=[[], [{"box": (0, 0, 2, 1), "caption": "x"}]])
    with pytest.raises(ValueError, match="2 prompts but 1 instance lists"):
        generate(pipe, prompt=["a", "b"], instances=[[]])
    with pytest.raises(ValueError, match="control_ratio"):
        generate(pipe, control_ratio=1.5)


def test_checkpoint_round_trip_is_bit_identical(make_pipeline, base_dir, tmp_path):
    pipe = make_pipeline(gate=0.8, seed=3)
    pipe.adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "config.json",
        "ifadapter.safetensors",
    ]
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    for key in (
        "layers",
        "layer_channels",
        "text_encoder_layers",
        "num_queries",
        "resampler_width",
        "resampler_depth",
        "resampler_heads",
        "resampler_dim_head",
        "fourier_freqs",
    ):
        assert key in config
    reloaded = IFAdapter.from_pretrained(tmp_path / "adapter")
    for key, value in pipe.adapter.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])
    again = IFAdapterSDXLPipeline.from_pretrained(base_dir, adapter=reloaded)
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(pipe), generate(again))

    pipe.save_pretrained(tmp_path / "pipeline")  # the adapter as a pipeline component
    whole = IFAdapterSDXLPipeline.from_pretrained(tmp_path / "pipeline")
    whole.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(pipe), generate(whole))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no IFAdapter checkpoint"):
        IFAdapter.from_pretrained(tmp_path)


def test_lora_weights_load_beside_the_adapter(make_pipeline, tmp_path):
    pipe = make_pipeline(gate=1.0)
    before = generate(pipe)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    pipe.unet.delete_adapters("default")
    assert np.array_equal(generate(pipe), before)
    pipe.load_lora_weights(tmp_path)
    with_lora = generate(pipe)
    assert not np.array_equal(with_lora, before) and np.isfinite(with_lora).all()
    assert not np.array_equal(with_lora, generate(pipe, instances=None))  # the adapter acts


def test_draw_layout_marks_boxes():
    from PIL import Image

    image = Image.new("RGB", (64, 64), "white")
    drawn = np.asarray(draw_layout(image, TWO))
    # Enlarged by a whole factor to be legible (64 px -> 384), boxes and numbered tags drawn
    # in black and white only: never a hue that the image is judged on.
    assert drawn.shape == (384, 384, 3)
    assert (drawn[..., 0] == drawn[..., 1]).all() and (drawn[..., 1] == drawn[..., 2]).all()
    assert (drawn[:6, 100:190] == 0).any() and (drawn[40 * 6, 10 * 6] == 255).all()
    assert (drawn[200:, :190] == 255).all()  # nothing outside the boxes
    large = Image.new("RGB", (512, 512), "white")
    assert draw_layout(large, TWO).size == (512, 512)


def test_token_groups_drop_one_group_to_its_box_embedding(make_pipeline):
    from ifadapter.layout import LayoutTensors
    from ifadapter.text import encode_instances

    pipe = make_pipeline(gate=1.0)
    adapter = pipe.adapter
    features = encode_instances(
        [pipe.tokenizer, pipe.tokenizer_2],
        [pipe.text_encoder, pipe.text_encoder_2],
        LayoutTensors.from_layouts(pipe.layouts(TWO.caption, TWO.instances)),
        adapter.config.text_encoder_layers,
    )
    full = adapter.instance_tokens(features)
    dropped = adapter.instance_tokens(features, keep_local=torch.zeros(1))
    no_appearance = adapter.instance_tokens(features, token_groups=["eot"])
    no_eot = adapter.instance_tokens(features, token_groups=["appearance"])
    assert torch.equal(no_appearance[..., :-1, :], dropped[..., :-1, :])
    assert torch.equal(no_appearance[..., -1:, :], full[..., -1:, :])
    assert torch.equal(no_eot[..., :-1, :], full[..., :-1, :])
    assert torch.equal(no_eot[..., -1:, :], dropped[..., -1:, :])
    images = [
        generate(pipe, token_groups=g) for g in (["appearance", "eot"], ["eot"], ["appearance"])
    ]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    with pytest.raises(ValueError, match="unknown token groups"):
        generate(pipe, token_groups=["words"])


def test_unconditional_layout_none_leaves_the_unconditional_branch_to_the_base(make_pipeline):
    """With "none" the adapter acts only in guidance's conditional half: the unconditional half
    of every UNet call is the base UNet's output, bit for bit."""
    pipe = make_pipeline(gate=1.0)
    layouts = pipe.layouts(TWO.caption, TWO.instances)
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, _, pooled, _ = pipe.encode_prompt(TWO.caption, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(2, 1)

    def unet(conditioning):
        with pipe.adapter.installed(pipe.unet), pipe.adapter.activated(conditioning):
            return pipe.unet(
                latent,
                torch.tensor(500),
                embeds.repeat(2, 1, 1),
                added_cond_kwargs={"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids},
            ).sample

    base = unet(None)
    none = unet(pipe.instance_conditioning(layouts, (8, 8), 1, True, unconditional_layout="none"))
    boxes = unet(pipe.instance_conditioning(layouts, (8, 8), 1, True))
    assert torch.equal(none[0], base[0])
    assert not torch.equal(boxes[0], base[0])
    assert torch.equal(none[1], boxes[1])
    with pytest.raises(ValueError, match="unconditional_layout"):
        generate(pipe, unconditional_layout="zeros")
