"""The toy base model's training command, at a few steps: it must produce a stock SDXL pipeline."""

import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from annotate.toy.base import BaseTrainingConfig, train_base

SMALL = BaseTrainingConfig(
    pool=48,
    vae_steps=3,
    vae_batch=4,
    decoder_steps=2,
    decoder_batch=4,
    unet_steps=3,
    unet_batch=4,
    warmup=2,
    eval_samples=2,
    eval_steps=2,
    round_trip_scenes=4,
)


def test_train_base_writes_a_loadable_pipeline_and_its_record(tmp_path):
    record = train_base(tmp_path, SMALL)
    saved = json.loads((tmp_path / "training_record.json").read_text())
    assert saved["config"] == record["config"] and saved["single_shape_scores"]["samples"] == 2
    assert [entry["stage"] for entry in saved["log"]].count("unet") == 2  # steps 0 and last
    assert saved["quality_gate"]["passed"] is False  # three steps draw nothing recognisable
    assert set(saved["quality_gate"]["failed"]) == {"colour", "shape", "texture"}
    assert set(saved["vae_round_trip"]) == {"psnr", "placement", "ifs", "instances"}
    assert [entry["stage"] for entry in saved["log"]].count("decoder") == 2
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    assert pipe.vae.config.scaling_factor == record["vae_scaling_factor"]
    assert pipe.unet.config.cross_attention_dim == 128
    # SDXL's betas at zero terminal SNR, v-prediction, sampled from t = 999 (the base's own)
    assert pipe.scheduler.config.rescale_betas_zero_snr
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    image = pipe("a red solid circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_a_base_trained_on_another_bases_vae_keeps_it_and_its_record(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    made = train_base(first, SMALL)
    record = train_base(second, SMALL, vae_from=first, command="python -m annotate.toy.base ...")
    assert record["vae_from"] == str(first) and record["command"].endswith("...")
    stages = [entry["stage"] for entry in record["log"]]
    assert [e for e in record["log"] if e["stage"] != "unet"] == [
        e for e in made["log"] if e["stage"] != "unet"
    ]  # the VAE's own stages, as its base recorded them, and no new ones
    assert stages.count("unet") == 2
    before = StableDiffusionXLPipeline.from_pretrained(first, dtype=torch.float32)
    after = StableDiffusionXLPipeline.from_pretrained(second, dtype=torch.float32)
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    for (name, x), y in zip(
        before.vae.state_dict().items(), after.vae.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


def test_a_continued_base_starts_from_its_weights_and_embeds_its_record(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    made = train_base(first, SMALL)
    # at lr 0 the continued run changes nothing: what it saves is exactly what it started from
    record = train_base(second, dataclasses.replace(SMALL, unet_lr=0.0), init_from=first)
    assert record["continued_from"]["path"] == str(first) and record["vae_from"] == str(first)
    assert record["continued_from"]["config"] == made["config"]
    assert "log" not in record["continued_from"]
    before = StableDiffusionXLPipeline.from_pretrained(first, dtype=torch.float32)
    after = StableDiffusionXLPipeline.from_pretrained(second, dtype=torch.float32)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        expected = getattr(before, name).state_dict()
        for key, value in getattr(after, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key}"
    with pytest.raises(ValueError, match="drop --vae"):
        train_base(tmp_path / "third", SMALL, vae_from=second, init_from=first)


def test_unet_stage_resumes_exactly_from_its_state(tmp_path):
    from annotate.toy.base import train_unet
    from ifadapter import tiny

    latents = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    captions = ["a red solid circle", "a blue striped square"] * 3

    def run(steps: int, state_path):
        config = BaseTrainingConfig(unet_steps=steps, unet_batch=2, checkpoint_every=2, warmup=2)
        return train_unet(tiny.components("toy", seed=0), latents, captions, config, [], state_path)

    straight = run(4, tmp_path / "straight.pt")
    run(3, tmp_path / "interrupted.pt")  # leaves its state at step 2 behind
    resumed = run(4, tmp_path / "interrupted.pt")
    for a, b in zip(straight, resumed, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
