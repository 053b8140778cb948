"""Half precision as a tested path, on the CPU where torch runs bf16 and fp16 alike: the
pipeline, every diffusers runner of the evaluation, ``ifadapter generate`` and a training step
under autocast, each on the tiny SDXL. Checked: one dtype for the whole pipeline (adapter, UNet,
text encoders and the instance conditioning; no silent upcast), finite outputs, and agreement
with float32 within the tolerances below. A GPU-marked test repeats the pipeline on CUDA.

Tolerances, on images in [0, 1] (4 steps, two instances, gates open at 0.5), measured on the
project's CPU: bfloat16 differs from float32 by at most 0.025, float16 by 0.0022; the bounds
are four times that, rounded up.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from ifadapter import IFAdapter, IFAdapterSDXLPipeline, tiny
from ifadapter.attention_processor import IFAdapterAttnProcessor
from ifadapter.cli import main
from tests.conftest import open_gates
from tests.ifadapter.test_attention import TWO
from tests.support.paths import MODELS

HALF = [torch.bfloat16, torch.float16]
IMAGE_TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.01}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "adapter")


@pytest.fixture(scope="module")
def half_base(tmp_path_factory):
    """The tiny SDXL stored in float16, as the shipped toy base and most SDXL checkpoints are,
    and a float32 adapter checkpoint for it (open gates: the ISM's output counts)."""
    path = tmp_path_factory.mktemp("half-base")
    pipe = StableDiffusionXLPipeline(**tiny.components(seed=0))
    torch.manual_seed(0)
    adapter = open_gates(IFAdapter.for_unet(pipe.unet, **tiny.adapter_config()), 0.5)
    pipe.to(torch.float16).save_pretrained(path / "base")
    adapter.save_pretrained(path / "adapter")
    return path


def load(half_base, device: str = "cpu", **dtype) -> IFAdapterSDXLPipeline:
    adapter = IFAdapter.from_pretrained(half_base / "adapter")  # float32, as trained
    pipe = IFAdapterSDXLPipeline.from_pretrained(half_base / "base", adapter=adapter, **dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe if device == "cpu" else pipe.to(device)


def generate(pipe) -> np.ndarray:
    """The noise is drawn in float32 and then cast: torch 2.11's CPU generator draws another
    sequence for float16 than for float32 from the same seed (seen on the GPU machine)."""
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe(
        TWO.caption,
        TWO.instances,
        num_inference_steps=4,
        output_type="np",
        latents=noise.to(pipe.device, pipe.unet.dtype),
    ).images


def dtypes(pipe) -> set[torch.dtype]:
    return {getattr(pipe, name).dtype for name in COMPONENTS}


@pytest.fixture
def ism_inputs(monkeypatch):
    """The dtypes every ISM layer saw during a call: query, keys, values, boxes."""
    seen: set[torch.dtype] = set()
    original = IFAdapterAttnProcessor.instance_semantic_map

    def record(self, conditioning, query, heads):
        keys, values = conditioning.keys[self.name], conditioning.values[self.name]
        seen.update({query.dtype, keys.dtype, values.dtype, conditioning.boxes.dtype})
        return original(self, conditioning, query, heads)

    monkeypatch.setattr(IFAdapterAttnProcessor, "instance_semantic_map", record)
    return seen


# ----------------------------------------------------------------- loaders


def test_a_float16_checkpoint_loads_in_one_dtype(half_base, one_torch_thread):
    stock = StableDiffusionXLPipeline.from_pretrained(half_base / "base")
    # What the stock loader makes of it: the mixture that fails at the first matmul.
    assert (stock.text_encoder.dtype, stock.unet.dtype) == (torch.float16, torch.float32)
    assert dtypes(load(half_base)) == {torch.float32}
    assert dtypes(load(half_base, dtype=torch.bfloat16)) == {torch.bfloat16}
    assert dtypes(load(half_base, torch_dtype=torch.float16)) == {torch.float16}
    with pytest.raises(TypeError, match="disagree"):
        load(half_base, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_an_attached_adapter_follows_the_pipeline_dtype(half_base, one_torch_thread):
    pipe = IFAdapterSDXLPipeline.from_pretrained(half_base / "base", dtype=torch.bfloat16)
    pipe.set_adapter(IFAdapter.from_pretrained(half_base / "adapter"))
    assert dtypes(pipe) == {torch.bfloat16}
    pipe.to(torch.float16)
    assert dtypes(pipe) == {torch.float16}


def test_adapter_from_pretrained_takes_both_dtype_names_and_refuses_the_rest(half_base):
    directory = half_base / "adapter"
    assert IFAdapter.from_pretrained(directory, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert IFAdapter.from_pretrained(directory, torch_dtype=torch.float16).dtype == torch.float16
    same = IFAdapter.from_pretrained(directory, dtype=torch.float16, torch_dtype=torch.float16)
    assert same.dtype == torch.float16
    with pytest.raises(TypeError, match="disagree"):
        IFAdapter.from_pretrained(directory, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtpye"):
        IFAdapter.from_pretrained(directory, dtpye=torch.float16)


# ----------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def float32_images(half_base):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate(load(half_base))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_pipeline_in_half_precision(half_base, float32_images, dtype, ism_inputs, one_torch_thread):
    pipe = load(half_base, dtype=dtype)
    assert dtypes(pipe) == {dtype}
    conditioning = pipe.instance_conditioning([TWO], (16, 16), 1, guidance=True)
    held = [*conditioning.keys.values(), *conditioning.values.values(), conditioning.boxes]
    assert {t.dtype for t in held} == {dtype}
    images = generate(pipe)
    assert ism_inputs == {dtype}  # nothing upcast on its way to the ISM layers
    assert np.isfinite(images).all()
    assert np.abs(images - float32_images).max() <= IMAGE_TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_pipeline_in_half_precision_on_cuda(half_base, float32_images, dtype, ism_inputs):
    pipe = load(half_base, "cuda", dtype=dtype)
    assert dtypes(pipe) == {dtype} and pipe.adapter.device.type == "cuda"
    images = generate(pipe)
    assert ism_inputs == {dtype}
    assert np.isfinite(images).all()
    assert np.abs(images - float32_images).max() <= IMAGE_TOLERANCE[dtype]


# ----------------------------------------------------------------- evaluation runners


@pytest.fixture(scope="module")
def runner_world(half_base, tmp_path_factory):
    """A one-layout benchmark over test shards, and the tiny GLIGEN."""
    from annotate.tiny.benchmark import GLIGEN_DIR, write_tiny_eval_models
    from evaluation.benchmark import build_benchmark
    from evaluation.config import BenchmarkConfig
    from tests.support.shards import default_rows, write_dataset

    root = tmp_path_factory.mktemp("runners")
    shards = write_dataset(root / "shards", [default_rows(2)])
    benchmark = build_benchmark(BenchmarkConfig(file=root / "b.json", shards=shards, count=1))
    models = write_tiny_eval_models(root / "models")
    return benchmark, models / GLIGEN_DIR


def runner_images(half_base, runner_world, method: str, dtype: str):
    from evaluation.config import GenerationConfig
    from evaluation.runners import GLIGENRunner, IFAdapterRunner, RealVAERunner, SDXLRunner

    benchmark, gligen = runner_world
    base = str(half_base / "base")
    runners = {
        "ifadapter": (IFAdapterRunner, {"base": base, "adapter": half_base / "adapter"}),
        "sdxl": (SDXLRunner, {"base": base}),
        "gligen": (GLIGENRunner, {"model": str(gligen)}),
        "real-vae": (RealVAERunner, {"base": base}),
    }
    kind, settings = runners[method]
    if method != "real-vae":
        settings["steps"] = 2
    generation = GenerationConfig(height=64, width=64, dtype=dtype)
    runner = kind(kind.Settings(**settings), "cpu", generation, benchmark)
    image = runner.generate(benchmark.layouts, [0])[0]
    return runner, np.asarray(image, dtype=np.float32) / 255


@pytest.mark.parametrize("method", ["ifadapter", "sdxl", "gligen", "real-vae"])
def test_runners_in_half_precision(half_base, runner_world, method, one_torch_thread):
    _, reference = runner_images(half_base, runner_world, method, "float32")
    for dtype in HALF:
        runner, image = runner_images(half_base, runner_world, method, str(dtype).split(".")[1])
        if method == "real-vae":  # the bound of the VAE, not of a precision: float32 always
            assert runner.vae.dtype == torch.float32
            assert np.array_equal(image, reference)
            continue
        names = [n for n in COMPONENTS if getattr(runner.pipe, n, None) is not None]
        assert {getattr(runner.pipe, n).dtype for n in names} == {dtype}, method
        assert np.isfinite(image).all()
        # One 8-bit level of rounding on top of the pipeline's tolerance.
        assert np.abs(image - reference).max() <= IMAGE_TOLERANCE[dtype] + 1 / 255, method


# ----------------------------------------------------------------- generate, training


def test_generate_on_the_shipped_toy_base(tmp_path, one_torch_thread):
    """The README's command on models/toy-base (stored in float16) and its trained adapter."""
    layouts = tmp_path / "layouts.jsonl"
    with open(MODELS / "toy-adapter" / "layouts.jsonl") as source:
        layouts.write_text(source.readline())
    argv = ["generate", "--base", str(MODELS / "toy-base")]
    argv += ["--adapter", str(MODELS / "toy-adapter")]
    argv += ["--layouts", str(layouts), "--out", str(tmp_path / "out"), "--steps", "2"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "00000_0.png").is_file()
    assert json.loads(layouts.read_text())["instances"]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_training_step_under_autocast(tiny_cache, train_config, dtype, one_torch_thread):
    from training.loop import AdapterTrainer
    from training.samples import CachedSamples

    samples = CachedSamples(tiny_cache.path)
    config = train_config(batch_size=2, warmup_steps=0, lr=1e-3)
    reference = AdapterTrainer(config, samples, torch.device("cpu"))
    trainer = AdapterTrainer(config, samples, torch.device("cpu"), autocast_dtype=dtype)
    assert trainer.unet.dtype == dtype
    assert {p.dtype for p in trainer.adapter.parameters()} == {torch.float32}  # master weights
    open_gates(reference.adapter, 0.5)
    open_gates(trainer.adapter, 0.5)
    before = {k: v.clone() for k, v in trainer.adapter.state_dict().items()}
    expected, metrics = reference.step(0), trainer.step(0)
    assert np.isfinite(metrics.loss) and np.isfinite(metrics.grad_norm)
    assert metrics.loss == pytest.approx(expected.loss, rel=0.05)
    assert metrics.grad_norm == pytest.approx(expected.grad_norm, rel=0.25)
    after = trainer.adapter.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], v) for k, v in before.items())
