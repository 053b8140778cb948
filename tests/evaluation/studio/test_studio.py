"""The studio's logic without a browser: canvas boxes <-> layouts, the files it loads, the
verdicts, and the engine (same images as ``ifadapter generate``, one generation at a time)."""

import json
import threading

import numpy as np
import pytest
from PIL import Image

from annotate.toy.world import ToyInstance, ToyScene, render
from evaluation.studio.engine import Studio
from evaluation.studio.judging import ToyJudging
from evaluation.studio.layouts import from_canvas, layout_json, read_layouts, to_canvas
from ifadapter.cli import main
from ifadapter.layout import Instance, Layout
from ifadapter.sampling import Sampling
from tests.support.paths import FIXTURES, REPO

TOY_LAYOUTS = REPO / "models" / "toy-adapter" / "layouts.jsonl"


def toy_layout(index: int = 0) -> Layout:
    return Layout.from_dict(json.loads(TOY_LAYOUTS.read_text().splitlines()[index]))


def test_a_loaded_layout_comes_back_from_the_canvas_exactly():
    """Whole-pixel canvas boxes that were not moved keep the file's coordinates and order, so a
    loaded layout generates what ``ifadapter generate`` makes of the file."""
    layout = toy_layout()
    boxes = to_canvas(layout, (512, 512))
    assert all(isinstance(box["xmin"], int) for box in boxes)
    checked = from_canvas(layout.caption, list(reversed(boxes)), (512, 512), loaded=layout)
    assert checked.layout == layout and checked.notes == []
    assert json.loads(layout_json(checked.layout)) == layout.to_dict()


def test_bad_boxes_are_left_out_with_a_note_and_the_rest_is_kept():
    drawn = [  # as the canvas lists them: the newest first
        {"xmin": 10, "ymin": 10, "xmax": 10, "ymax": 60, "label": "a flat box"},
        {"xmin": 600, "ymin": 10, "xmax": 700, "ymax": 60, "label": "far away"},
        {"xmin": 400, "ymin": 400, "xmax": 600, "ymax": 540, "label": "a blue solid square"},
        {"xmin": 20, "ymin": 20, "xmax": 120, "ymax": 120, "label": "  "},
        {"xmin": 0, "ymin": 0, "xmax": 256, "ymax": 256, "label": "a red solid circle"},
    ]
    checked = from_canvas(" a caption ", drawn, (512, 512))
    assert checked.layout.caption == "a caption"
    assert [i.caption for i in checked.layout.instances] == [
        "a red solid circle",
        "a blue solid square",
    ]
    assert checked.layout.instances[0].box == (0.0, 0.0, 0.5, 0.5)
    assert checked.layout.instances[1].box == (400 / 512, 400 / 512, 1.0, 1.0)
    assert checked.notes == [
        "box 2: no description; left out (double-click the box to describe it)",
        "box 3 (a blue solid square): reached past the edge of the canvas; clipped to it",
        "box 4 (far away): outside the canvas or of zero size; left out",
        "box 5 (a flat box): outside the canvas or of zero size; left out",
    ]


def test_a_moved_box_is_read_from_the_canvas():
    layout = toy_layout()
    boxes = to_canvas(layout, (512, 512))
    boxes[0] = {**boxes[0], "xmin": boxes[0]["xmin"] + 20, "xmax": boxes[0]["xmax"] + 20}
    checked = from_canvas(layout.caption, list(reversed(boxes)), (512, 512), loaded=layout)
    *unmoved, moved = checked.layout.instances  # a moved box counts as a new one: last
    assert moved.caption == layout.instances[0].caption
    assert moved.box[0] == boxes[0]["xmin"] / 512
    assert unmoved == layout.instances[1:]  # the others: exact, in order


def test_files_load_as_generate_reads_them_and_bad_instances_are_left_out(tmp_path):
    layouts = [toy_layout(0), toy_layout(1)]
    jsonl = "".join(json.dumps(layout.to_dict()) + "\n" for layout in layouts)
    assert read_layouts(jsonl, "l.jsonl").layouts == layouts
    assert read_layouts(json.dumps([x.to_dict() for x in layouts]), "l.json").layouts == layouts
    bad = {
        "caption": "x",
        "instances": [
            {"box": [0.5, 0.1, 0.4, 0.9], "caption": "inverted"},
            {"box": [0.1, 0.1, 0.4, 0.4], "caption": ""},
            {"box": [0.1, 0.1, 0.4, 0.4], "caption": "kept"},
            "not an instance",
        ],
    }
    loaded = read_layouts(json.dumps(bad), "bad.json")
    assert [i.caption for i in loaded.layouts[0].instances] == ["kept"]
    assert len(loaded.notes) == 3 and all(n.startswith("layout 1: instance") for n in loaded.notes)
    assert "inverted" in loaded.notes[0] and "caption is empty" in loaded.notes[1]
    with pytest.raises(ValueError, match="neither JSON nor JSON lines"):
        read_layouts('{"caption": "x", "instances": [', "broken.json")
    with pytest.raises(ValueError, match="holds no layout"):
        read_layouts("[1, 2]", "numbers.json")


def test_the_authors_released_layout_files_import():
    """dataset/*.json of the released code: pixel [x, y, w, h] on a square canvas (768 px in its
    infer.py), captions as one-element lists; past the canvas is clipped, nothing left is out."""
    loaded = read_layouts((FIXTURES / "released_layout.json").read_text(), "released.json")
    (layout,) = loaded.layouts
    assert layout.caption == "two toy shapes on a table"
    assert [i.caption for i in layout.instances] == [
        "a red solid circle",
        "a blue striped square",
        "a green dotted diamond",
    ]
    assert layout.instances[0].box == (0.125, 0.125, 0.5, 0.5)
    assert layout.instances[2].box == (600 / 768, 600 / 768, 1.0, 1.0)
    assert loaded.notes == [
        "layout 1: instance 3: reached past the 768-px canvas; clipped",
        "layout 1: instance 4: outside the 768-px canvas or empty; left out",
    ]
    small = read_layouts((FIXTURES / "released_layout.json").read_text(), "r.json", 1536)
    assert small.layouts[0].instances[0].box == (0.0625, 0.0625, 0.25, 0.25)


def test_verdicts_of_a_true_render_a_blank_image_and_an_unjudgeable_description():
    instances = (
        ToyInstance("circle", "red", "solid", (0.05, 0.05, 0.5, 0.5)),
        ToyInstance("square", "blue", "striped", (0.5, 0.45, 0.95, 0.9)),
    )
    image = render(ToyScene(instances))
    layout = Layout(
        "x",
        [
            *(Instance(i.box, i.caption) for i in instances),
            Instance((0.1, 0.6, 0.4, 0.9), "a cosy armchair"),
            Instance((0.6, 0.05, 0.9, 0.35), "a green solid triangle"),
        ],
    )
    verdicts = ToyJudging().judge(image, layout)
    assert [v.right for v in verdicts] == [True, True, False, False]
    assert verdicts[0].iou > 0.8 and verdicts[0].attributes == {
        "colour": True,
        "shape": True,
        "texture": True,
    }
    assert verdicts[2].summary == "no judge for this description" and not verdicts[2].judged
    assert verdicts[3].judged and not verdicts[3].found
    assert verdicts[3].summary.startswith("not found (IoU 0.00")
    wrong = ToyJudging().judge(
        image, Layout("x", [Instance(instances[0].box, "a red striped circle")])
    )[0]
    assert wrong.found and not wrong.right and "texture" in wrong.summary


@pytest.fixture(scope="module")
def studio():
    return Studio.load(str(REPO / "models" / "toy-base"), REPO / "models" / "toy-adapter", "cpu")


def test_the_studio_gives_the_image_generate_gives(studio, tmp_path, monkeypatch):
    """The same layout at the same seed: the studio's image is ``ifadapter generate``'s, pixel
    for pixel, for a file holding the layout alone; the base beside it uses the same seeds."""
    monkeypatch.chdir(REPO)
    layout = toy_layout(2)
    sampling = Sampling(steps=3, guidance=5.0, unconditional_layout="none", seed=7, num_images=2)
    result = studio.run(layout, sampling)
    (tmp_path / "one.json").write_text(layout_json(layout))
    argv = ["generate", "--base", "models/toy-base", "--adapter", "models/toy-adapter"]
    argv += ["--layouts", str(tmp_path / "one.json"), "--out", str(tmp_path / "out")]
    argv += ["--steps", "3", "--guidance", "5", "--unconditional-layout", "none"]
    assert main([*argv, "--seed", "7", "--num-images", "2", "--device", "cpu"]) == 0
    for j, image in enumerate(result.adapter_images):
        written = Image.open(tmp_path / "out" / f"00000_{j}.png")
        assert np.array_equal(np.asarray(written), np.asarray(image))
    assert not np.array_equal(
        np.asarray(result.base_images[0]), np.asarray(result.adapter_images[0])
    )
    assert result.seeds == [7, 8]
    assert [len(v) for v in result.adapter_verdicts] == [len(layout.instances)] * 2


def test_generate_images_do_not_depend_on_the_batch_size(tmp_path, monkeypatch):
    """Image k of a run has seed + k whatever the batches: a file of three layouts in batches of
    two gives the images of the same file in one batch, and its third layout's images are those
    of a one-layout file at seed + 2 * images (up to one grey level: a batch of another size
    rounds its float arithmetic differently)."""
    monkeypatch.chdir(REPO)
    layouts = [toy_layout(i) for i in range(3)]
    (tmp_path / "three.jsonl").write_text("".join(json.dumps(x.to_dict()) + "\n" for x in layouts))
    (tmp_path / "third.json").write_text(layout_json(layouts[2]))
    base = ["generate", "--base", "models/toy-base", "--adapter", "models/toy-adapter"]
    base += ["--steps", "2", "--num-images", "2", "--device", "cpu"]
    runs = {
        "one": ["--layouts", str(tmp_path / "three.jsonl"), "--batch-size", "3"],
        "two": ["--layouts", str(tmp_path / "three.jsonl"), "--batch-size", "2"],
        "alone": ["--layouts", str(tmp_path / "third.json"), "--seed", "4"],
    }
    for name, extra in runs.items():
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0

    def pixels(run: str, name: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / run / name), dtype=np.int16)

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return int(np.abs(a - b).max()) <= 1

    names = sorted(p.name for p in (tmp_path / "one").glob("*_?.png"))
    assert len(names) == 6
    for name in names:
        assert same(pixels("one", name), pixels("two", name)), name
    for j in range(2):
        assert same(pixels("one", f"00002_{j}.png"), pixels("alone", f"00000_{j}.png"))


def test_generations_take_turns_and_report_progress(studio):
    """Two requests at once: the second starts after the first has finished (one UNet, one
    adapter conditioning); each reports its steps up to 1."""
    layout = toy_layout(1)
    sampling = Sampling(steps=2, guidance=5.0, seed=0)
    events: list[tuple[str, float, str]] = []
    lock = threading.Lock()

    def request(name: str) -> None:
        def progress(share: float, what: str) -> None:
            with lock:
                events.append((name, share, what))

        studio.run(layout, sampling, progress)

    threads = [threading.Thread(target=request, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    working = [(name, what) for name, _, what in events if "step" in what]
    first = working[0][0]
    switch = next(k for k, (name, _) in enumerate(working) if name != first)
    assert all(name != first for name, _ in working[switch:])  # no interleaving
    for name in ("a", "b"):
        shares = [share for n, share, _ in events if n == name]
        assert shares == sorted(shares) and shares[-1] == 1.0
        assert any("IFAdapter: step 2/2" in what for n, _, what in events if n == name)
        assert any("base model: step 2/2" in what for n, _, what in events if n == name)


def test_sizes_the_unet_cannot_take_are_refused(studio):
    assert studio.default_size == (64, 64) and studio.size_step == 16
    with pytest.raises(ValueError, match="width 60 must be a positive multiple of 16"):
        studio.run(toy_layout(), Sampling(steps=1, width=60, height=64))


def test_profile_judges_find_and_ask_as_the_benchmark_does(
    tmp_path, tiny_models_root, tiny_vlm, one_torch_thread
):
    """``--judges PROFILE``: the profile's detector (tiny Grounding-DINO, prompted with each
    description) and VLM judge (tiny Qwen2-VL in process) judge each instance; the table's
    columns are the judges. Random weights: the answers mean nothing, every step is real."""
    import yaml

    from evaluation.studio.judging import ProfileJudging

    profile = tmp_path / "judges.yaml"
    detector = tiny_models_root / "out" / "tiny-models" / "grounding-dino"
    section = {
        "benchmark": {"file": str(tmp_path / "b.json"), "shards": str(tmp_path), "count": 1},
        "detector": {"backend": "grounding_dino", "model": str(detector), "box_threshold": 0.0},
        "judges": [{"name": "qwen", "backend": "vlm_transformers", "model": str(tiny_vlm())}],
        "methods": [{"name": "real", "runner": "real"}],
        # random-weight boxes are small: a low threshold lets instances through to the judge
        "metrics": {"iou_threshold": 0.001, "clip": None, "fid": None},
    }
    profile.write_text(yaml.safe_dump({"evaluate": section}))
    judging = ProfileJudging(profile, "cpu")
    assert judging.columns == ("qwen",) and "grounding_dino" in judging.name
    layout = Layout(
        "a room",
        [
            Instance((0.0, 0.0, 1.0, 1.0), "a green velvet armchair"),
            Instance((0.5, 0.5, 0.9, 0.9), "a framed watercolor"),
        ],
    )
    verdicts = judging.judge(Image.new("RGB", (64, 64), (120, 160, 90)), layout)
    assert [v.number for v in verdicts] == [1, 2] and all(v.judged for v in verdicts)
    found = [v for v in verdicts if v.found]
    assert found, "the full-image box matches some detection at the low threshold"
    for verdict in found:
        assert set(verdict.attributes) == {"qwen"}
        assert verdict.right == verdict.attributes["qwen"]
    bad = tmp_path / "no-judges.yaml"
    no_judges = {**section, "judges": [], "metrics": {**section["metrics"], "ifs": False}}
    bad.write_text(yaml.safe_dump({"evaluate": no_judges}))
    with pytest.raises(ValueError, match="names no detector or no judge"):
        ProfileJudging(bad, "cpu")


def test_a_lora_on_the_base_changes_the_studio_images(tmp_path):
    """``--lora``: a LoRA saved as diffusers saves them is loaded onto the base beside the
    adapter; at scale 0 the images are the plain ones."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base, adapter = str(REPO / "models" / "toy-base"), REPO / "models" / "toy-adapter"
    pipe = StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
    )
    sampling = Sampling(steps=2, guidance=5.0, seed=3)

    def pixels(**lora) -> np.ndarray:
        studio = Studio.load(base, adapter, "cpu", **lora)
        return np.asarray(studio.run(toy_layout(1), sampling).adapter_images[0], dtype=float)

    plain = pixels()
    styled = Studio.load(base, adapter, "cpu", lora=str(tmp_path / "lora"))
    assert styled.lora == str(tmp_path / "lora")
    assert np.abs(pixels(lora=str(tmp_path / "lora")) - plain).mean() > 1
    assert np.array_equal(pixels(lora=str(tmp_path / "lora"), lora_scale=0.0), plain)
