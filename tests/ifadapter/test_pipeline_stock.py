"""IFAdapterSDXLPipeline is a stock SDXL pipeline: the stock call and signature, prompts as text or
embeddings, and every stock feature that touches attention either keeps the adapter or refuses.
"""

import inspect

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor
from peft import LoraConfig, get_peft_model_state_dict

from ifadapter import IFAdapter, IFAdapterSDXLPipeline
from ifadapter.attention_processor import IFAdapterAttnProcessor
from tests.ifadapter.test_attention import TWO

STEPS = 3


def run(pipe, instances=TWO.instances, prompt=TWO.caption, **kwargs):
    return pipe(
        prompt,
        instances,
        num_inference_steps=STEPS,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def stock_images(base_dir, **kwargs):
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        TWO.caption,
        num_inference_steps=STEPS,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def processor_types(pipe):
    return [type(p) for p in pipe.unet.attn_processors.values()]


# ----------------------------------------------------------------- the stock pipeline


def test_signature_is_the_stock_one_plus_the_layout_arguments():
    stock = inspect.signature(StableDiffusionXLPipeline.__call__).parameters
    ours = inspect.signature(IFAdapterSDXLPipeline.__call__).parameters
    for name, parameter in stock.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name
    layout = ["instances", "control_ratio", "token_groups", "unconditional_layout"]
    assert set(ours) - set(stock) == set(layout)
    assert list(ours)[:3] == ["self", "prompt", "instances"]


def test_without_adapter_the_pipeline_is_the_stock_one(base_dir):
    pipe = IFAdapterSDXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.adapter is None
    assert np.array_equal(run(pipe, instances=None), stock_images(base_dir))
    negative = {"negative_prompt": "blurry", "guidance_scale": 6.0}
    assert np.array_equal(run(pipe, instances=[], **negative), stock_images(base_dir, **negative))
    with pytest.raises(ValueError, match="instances need an adapter"):
        run(pipe)


def test_with_adapter_and_no_instances_the_pipeline_is_the_stock_one(make_pipeline, base_dir):
    pipe = make_pipeline(gate=1.0)
    before = processor_types(pipe)
    assert np.array_equal(run(pipe, instances=None), stock_images(base_dir))
    assert np.array_equal(run(pipe, control_ratio=0.0), stock_images(base_dir))
    assert processor_types(pipe) == before  # nothing of the adapter stays on the UNet
    assert IFAdapterAttnProcessor not in before


def test_stock_positional_prompt_2_is_a_clear_error(make_pipeline):
    with pytest.raises(TypeError, match="keyword-only"):
        make_pipeline()(TWO.caption, "a second prompt", num_inference_steps=1)


def test_prompt_as_embeddings(make_pipeline):
    pipe = make_pipeline(gate=1.0)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        [TWO.caption, "three triangles"], negative_prompt=["", "blurry"]
    )
    by_text = run(
        pipe,
        prompt=[TWO.caption, "three triangles"],
        instances=[TWO.instances, TWO.instances[:1]],
        negative_prompt=["", "blurry"],
        num_images_per_prompt=2,
    )
    by_embeds = run(
        pipe,
        prompt=None,
        instances=[TWO.instances, TWO.instances[:1]],
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        num_images_per_prompt=2,
    )
    assert by_embeds.shape == (4, 64, 64, 3)
    assert np.array_equal(by_text, by_embeds)
    one = {"prompt_embeds": embeds[:1], "pooled_prompt_embeds": pooled[:1]}
    flat = run(pipe, prompt=None, guidance_scale=1.0, **one)  # one row: a flat instance list
    assert not np.array_equal(flat, run(pipe, None, prompt=None, guidance_scale=1.0, **one))
    with pytest.raises(ValueError, match="2 prompts but 1 instance lists"):
        run(pipe, prompt=None, instances=[TWO.instances], prompt_embeds=embeds)


# ----------------------------------------------------------------- stock attention features


def reference(make_pipeline):
    """The adapted image with the default processors, and the image without instances."""
    pipe = make_pipeline(gate=1.0)
    return run(pipe), run(pipe, instances=None)


def assert_adapter_acts(images, adapted, plain, atol=1e-5):
    assert np.abs(images - adapted).max() <= atol
    assert np.abs(images - plain).max() > 1e-2


@pytest.mark.parametrize(
    "enable",
    [
        pytest.param(lambda pipe: pipe.enable_attention_slicing(), id="attention_slicing"),
        pytest.param(lambda pipe: pipe.enable_attention_slicing("max"), id="attention_slicing_max"),
        pytest.param(lambda pipe: pipe.unet.set_default_attn_processor(), id="default_processor"),
        pytest.param(
            lambda pipe: pipe.unet.set_attn_processor(AttnProcessor()), id="set_processor"
        ),
        pytest.param(lambda pipe: pipe.fuse_qkv_projections(), id="fuse_qkv_projections"),
    ],
)
def test_attention_features_keep_the_adapter(make_pipeline, enable):
    adapted, plain = reference(make_pipeline)
    pipe = make_pipeline(gate=1.0)
    enable(pipe)
    chosen = processor_types(pipe)
    assert_adapter_acts(run(pipe), adapted, plain)
    assert processor_types(pipe) == chosen  # the user's processors are back after the call


def test_attention_slicing_processors_are_wrapped_during_a_call(make_pipeline):
    pipe = make_pipeline(gate=1.0)
    pipe.enable_attention_slicing()
    seen = []

    def look(pipe, step, timestep, callback_kwargs):
        seen.extend(pipe.unet.attn_processors[f"{n}.processor"] for n in pipe.adapter.config.layers)
        return callback_kwargs

    run(pipe, callback_on_step_end=look)
    assert seen and all(isinstance(p, IFAdapterAttnProcessor) for p in seen)
    assert all(isinstance(p.inner, SlicedAttnProcessor) for p in seen)


def test_unfuse_qkv_projections_restores_the_stock_processors(make_pipeline, base_dir):
    pipe = make_pipeline(gate=1.0)
    before = processor_types(pipe)
    pipe.fuse_qkv_projections()
    run(pipe)
    pipe.unfuse_qkv_projections()
    assert processor_types(pipe) == before
    assert np.array_equal(run(pipe, instances=None), stock_images(base_dir))


def test_vae_slicing_and_tiling_keep_the_adapter(make_pipeline):
    adapted, plain = reference(make_pipeline)
    pipe = make_pipeline(gate=1.0)
    pipe.vae.enable_slicing()
    assert_adapter_acts(run(pipe), adapted, plain)
    pipe.vae.enable_tiling()  # 128 px: four overlapping 64 px tiles
    tiled = run(pipe, height=128, width=128)
    assert np.abs(tiled - run(pipe, None, height=128, width=128)).max() > 1e-2


def test_lora_fuse_and_unfuse_keep_the_adapter(make_pipeline, tmp_path):
    pipe = make_pipeline(gate=1.0)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    pipe.unet.delete_adapters("default")
    without_lora = run(pipe)
    pipe.load_lora_weights(tmp_path)
    adapted, plain = run(pipe), run(pipe, instances=None)
    assert np.abs(adapted - without_lora).max() > 1e-2
    pipe.fuse_lora()
    assert_adapter_acts(run(pipe), adapted, plain, atol=1e-4)
    pipe.unfuse_lora()
    assert_adapter_acts(run(pipe), adapted, plain, atol=1e-4)


def test_compiled_unet_keeps_the_adapter(make_pipeline):
    adapted, plain = reference(make_pipeline)
    pipe = make_pipeline(gate=1.0)
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    assert_adapter_acts(run(pipe), adapted, plain)
    assert np.abs(run(pipe, instances=None) - plain).max() <= 1e-5


def test_model_offload_keeps_the_adapter_on_the_execution_device():
    """Model CPU offload needs an accelerator (checked on one: the same images, docs/pipeline.md);
    here, that the adapter is not left behind on the CPU when it runs."""
    assert "adapter" in IFAdapterSDXLPipeline._exclude_from_cpu_offload
    assert set(StableDiffusionXLPipeline._exclude_from_cpu_offload) <= set(
        IFAdapterSDXLPipeline._exclude_from_cpu_offload
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential offload needs CUDA")
def test_sequential_offload_keeps_the_adapter(make_pipeline):
    """Sequential offload keeps the encoders' weights on the meta device between forwards: the
    instance token ids go to the pipeline's execution device instead."""
    pipe = make_pipeline(gate=1.0).to("cuda")
    expected = run(pipe)
    pipe = make_pipeline(gate=1.0)
    pipe.enable_sequential_cpu_offload()
    assert pipe.text_encoder.device.type == "meta"
    np.testing.assert_allclose(run(pipe), expected, atol=1e-4)


# ----------------------------------------------------------------- adapter checkpoints


def test_adapter_variants_sit_beside_the_full_checkpoint(make_pipeline, tmp_path):
    adapter = make_pipeline(gate=0.5).adapter
    adapter.save_pretrained(tmp_path)
    adapter.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "ifadapter.fp16.safetensors", "ifadapter.safetensors"]
    half = IFAdapter.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16)
    for key, value in half.state_dict().items():
        assert torch.equal(value, adapter.state_dict()[key])
    full = IFAdapter.from_pretrained(tmp_path)
    assert full.dtype == torch.float32
    assert not all(torch.equal(v.half(), v) for v in full.state_dict().values())
    with pytest.raises(FileNotFoundError, match=r"ifadapter\.bf16\.safetensors"):
        IFAdapter.from_pretrained(tmp_path, variant="bf16")
    with pytest.raises(TypeError, match="revision"):
        IFAdapter.from_pretrained(tmp_path, revision="main")
    with pytest.raises(ValueError, match="device_map"):
        IFAdapter.from_pretrained(tmp_path, device_map="auto")
    with pytest.raises(ValueError, match="offload_folder"):
        IFAdapter.from_pretrained(tmp_path, offload_folder=tmp_path)
    assert IFAdapter.from_pretrained(tmp_path, device_map={"": "cpu"}).device.type == "cpu"
    assert IFAdapter.from_pretrained(tmp_path, torch_dtype=torch.float16).dtype == torch.float16
    adapter.save_pretrained(tmp_path / "asked_for_pickle", safe_serialization=False)
    assert (tmp_path / "asked_for_pickle" / "ifadapter.safetensors").is_file()


def test_pipeline_variant_round_trip(make_pipeline, tmp_path):
    pipe = make_pipeline(gate=0.8)
    pipe.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "adapter" / "ifadapter.fp16.safetensors").is_file()
    assert not (tmp_path / "adapter" / "ifadapter.safetensors").exists()
    again = IFAdapterSDXLPipeline.from_pretrained(tmp_path, variant="fp16")
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(run(pipe), run(again))
