import hashlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from ifadapter import IFAdapter, IFAdapterSDXLPipeline, tiny
from tests.support.paths import CONFIGS
from tests.support.shards import default_rows, shapes_row, write_dataset


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny SDXL-architecture pipeline saved the way real checkpoints are."""
    path = tmp_path_factory.mktemp("tiny-sdxl")
    StableDiffusionXLPipeline(**tiny.components(seed=0)).save_pretrained(path)
    return path


@pytest.fixture
def components():
    return tiny.components(seed=0)


def open_gates(adapter: IFAdapter, value: float = 1.0) -> IFAdapter:
    with torch.no_grad():
        for layer in adapter.ism_layers.values():
            layer.gate.fill_(value)
    return adapter


@pytest.fixture
def make_pipeline(base_dir):
    def make(gate: float | None = None, seed: int = 0, **config) -> IFAdapterSDXLPipeline:
        base = StableDiffusionXLPipeline.from_pretrained(base_dir)
        torch.manual_seed(seed)
        adapter = IFAdapter.for_unet(base.unet, **{**tiny.adapter_config(), **config})
        if gate is not None:
            open_gates(adapter, gate)
        pipe = IFAdapterSDXLPipeline.from_pretrained(base_dir, adapter=adapter)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


# ----------------------------------------------------------------- Ray and training

TINY_PROFILE = CONFIGS / "tiny.yaml"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session (two CPUs, as on the project's machines); its address lets
    a subprocess join it as a second driver."""
    import ray

    # Ray Train's controller polls its workers every 2 s by default; tests finish sooner.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory):
    """A directory holding out/tiny-models/, where configs/tiny.yaml expects the tiny models
    (its model paths are relative to the directory the engine runs from)."""
    from annotate.tiny.models import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-root")
    write_tiny_models(root / "out" / "tiny-models")
    return root


@pytest.fixture(scope="session")
def shard_dataset(tmp_path_factory):
    """Ten square and two wide images over two shards, plus two rows that must be quarantined:
    a box outside [0, 1] and bytes that are no image."""
    rows = default_rows(10)
    wide = [
        shapes_row(f"tests-wide-{i}", [((0.1, 0.2, 0.4, 0.9), "red", "square")], width=96)
        for i in range(2)
    ]
    bad_box = shapes_row("tests-bad-box", [((0.1, 0.1, 0.5, 0.5), "red", "circle")])
    bad_box["instances"].append(
        {"box": [0.5, 0.5, 1.2, 0.9], "label": "square", "score": 0.5, "caption": "a square"}
    )
    broken = shapes_row("tests-broken", [((0.1, 0.1, 0.5, 0.5), "red", "circle")])
    broken["image"] = b"not an image"
    broken["sha256"] = hashlib.sha256(broken["image"]).hexdigest()
    directory = tmp_path_factory.mktemp("shards")
    return write_dataset(directory, [[*rows[:6], bad_box], [*rows[6:], *wide, broken]])


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def train_config(base_dir, shard_dataset, shared_cache_dir, tmp_path):
    """The tiny profile on the test shards and base; keyword arguments override its keys."""
    from training.config import load_train_config

    def make(**overrides):
        paths = {
            "base": str(base_dir),
            "data": str(shard_dataset),
            "output": str(tmp_path / "out"),
            "cache_dir": str(shared_cache_dir),
        }
        return load_train_config(TINY_PROFILE, **{**paths, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_cache(ray_cluster, base_dir, shard_dataset, shared_cache_dir, tmp_path_factory):
    """The cache of the tiny profile over the test shards, built once."""
    from training.cache import build_cache
    from training.config import load_train_config

    config = load_train_config(
        TINY_PROFILE,
        base=str(base_dir),
        data=str(shard_dataset),
        output=str(tmp_path_factory.mktemp("cache-run")),
        cache_dir=str(shared_cache_dir),
    )
    return build_cache(config)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """``tiny_vlm(architecture)``: the directory of a tiny random-weight VLM checkpoint
    (qwen2_vl, qwen2_5_vl, internvl), built on first use and kept for the session."""
    from annotate.tiny.vlm import write_tiny_vlm

    root = tmp_path_factory.mktemp("tiny-vlm")
    built = {}

    def get(architecture: str = "qwen2_vl"):
        if architecture not in built:
            built[architecture] = write_tiny_vlm(root / architecture, architecture)
        return built[architecture]

    return get


@pytest.fixture(scope="session")
def qwen2_vl_client(tiny_vlm):
    """The in-process client on the tiny Qwen2-VL, shared by the captioning tests."""
    from annotate.vlm.in_process import TransformersChatClient

    return TransformersChatClient(str(tiny_vlm("qwen2_vl")), "cpu", max_batch=8)


@pytest.fixture
def one_torch_thread():
    """Tiny models on one torch thread: on the shared two-core machine two OpenMP threads
    contend with other jobs and generation runs tens of times slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
