"""The cache stage (Ray Data): what it stores, what it quarantines, when it is recomputed."""

import shutil

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from annotate.schema import SHARD_SCHEMA, SchemaError
from ifadapter import IFAdapter, LayoutTensors, encode_instances, tiny
from ifadapter.layout import Instance, Layout
from tests.support.shards import default_rows, shapes_row, write_dataset
from training.augment import aspect_buckets, make_view, view_rng
from training.cache import build_cache, cache_key
from training.config import AugmentConfig
from training.samples import CachedSamples
from training.shards import decode_image, open_dataset, row_layout


def test_bad_rows_are_quarantined_with_reasons(tiny_cache, shard_dataset):
    assert tiny_cache.images == 12 and tiny_cache.quarantined == 2
    assert tiny_cache.views == 24  # two views per image in the tiny profile
    assert tiny_cache.inputs == 14  # every input row is a cached image or a quarantined one
    table = pq.read_table(tiny_cache.quarantine_path).to_pylist()
    reasons = sorted(row["reason"] for row in table)
    assert reasons[0].startswith("tests-bad-box: instance 1: box (0.5, 0.5, 1.2")
    assert "outside [0, 1]" in reasons[0]
    assert reasons[1].startswith("tests-broken: image does not decode")
    assert sorted(row["stage"] for row in table) == [
        "training-cache/decode",
        "training-cache/layout",
    ]
    assert tiny_cache.buckets == [[48, 80], [64, 64], [80, 48]]


def test_cached_values_are_what_inference_computes(tiny_cache, shard_dataset, base_dir):
    samples = CachedSamples(tiny_cache.path)
    image_id, view = "tests-0000", 1
    row = next(
        r
        for path in sorted(shard_dataset.glob("*.parquet"))
        for r in pq.read_table(path).to_pylist()
        if r["image_id"] == image_id
    )
    augment = AugmentConfig.model_validate(samples.info.material["augment"])
    expected = make_view(
        decode_image(row),
        row_layout(row),
        aspect_buckets(augment.resolution, augment.bucket_step, augment.max_aspect),
        augment,
        view_rng(augment.seed, image_id, view),
    )
    latents, prompt_embeds, pooled, time_ids, features = samples.sample(
        samples.image_ids.index(image_id), epoch=view
    )

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pixels = torch.tensor(expected.pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        vae_mean = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled_embeds, _ = pipe.encode_prompt(
            expected.caption, device="cpu", do_classifier_free_guidance=False
        )
    # Batched against single-image convolutions: equal up to float rounding.
    torch.testing.assert_close(latents, vae_mean[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prompt_embeds, embeds[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, pooled_embeds[0], atol=1e-5, rtol=1e-5)
    assert time_ids.tolist() == list(expected.time_ids)

    layout = Layout(
        expected.caption,
        [
            Instance(tuple(map(float, b)), c)
            for b, c in zip(expected.boxes, expected.captions, strict=True)
        ],
    )
    adapter = IFAdapter.for_unet(pipe.unet, **tiny.adapter_config())
    direct = encode_instances(
        [pipe.tokenizer, pipe.tokenizer_2],
        [pipe.text_encoder, pipe.text_encoder_2],
        LayoutTensors.from_layouts([layout]),
        adapter.config.text_encoder_layers,
    )
    assert features.words.shape[3] < direct.words.shape[3]  # padding after the words trimmed
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.instance_tokens(features), adapter.instance_tokens(direct), atol=1e-5, rtol=1e-4
        )


def test_cache_is_reused_until_the_model_or_the_augmentation_changes(
    tiny_cache, train_config, base_dir, tmp_path
):
    again = build_cache(train_config())
    assert not again.computed and again.path == tiny_cache.path

    data = write_dataset(tmp_path / "shards", [default_rows(2)])
    config = train_config(data=str(data), cache_dir=str(tmp_path / "cache"))
    unflipped = config.model_copy(
        update={"augment": config.augment.model_copy(update={"flip": 0.0})}
    )
    augmented = build_cache(unflipped)
    other_base = tmp_path / "base"
    shutil.copytree(base_dir, other_base)
    torch.manual_seed(1)
    AutoencoderKL(**tiny.vae_config("tiny")).save_pretrained(other_base / "vae")
    retrained = build_cache(unflipped.model_copy(update={"base": str(other_base)}))
    assert augmented.computed and retrained.computed and retrained.path != augmented.path
    # the profile's own flip probability gives another key
    assert augmented.key != cache_key(config, open_dataset(config.data))[0]
    assert retrained.material["encoders"]["vae"] != augmented.material["encoders"]["vae"]
    for unchanged in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (
            retrained.material["encoders"][unchanged] == augmented.material["encoders"][unchanged]
        )
    assert retrained.material["augment"] == augmented.material["augment"]


def test_shard_faults_stop_before_any_work(train_config, tmp_path):
    row = shapes_row("x", [((0.1, 0.1, 0.5, 0.5), "red", "circle")])
    schema = SHARD_SCHEMA.remove(SHARD_SCHEMA.get_field_index("caption"))
    data = write_dataset(tmp_path, [[{k: v for k, v in row.items() if k != "caption"}]], schema)
    with pytest.raises(SchemaError, match="missing column 'caption'"):
        build_cache(train_config(data=str(data)))
    good = write_dataset(tmp_path / "good", [[row]])
    with pytest.raises(ValueError, match="bucket_step 8 must be a multiple of 16"):
        build_cache(train_config(data=str(good), augment={"resolution": 64, "bucket_step": 8}))
