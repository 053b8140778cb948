import json

from PIL import Image

from ifadapter import IFAdapter, tiny
from ifadapter.cli import main


def test_demo_writes_images_checkpoint_and_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mean_abs_pixel_difference_adapter_vs_base"] > 0
    assert (tmp_path / "adapter" / "ifadapter.safetensors").is_file()
    assert Image.open(tmp_path / "images" / "adapter" / "00000_0_boxes.png").size == (64, 64)


def test_generate_from_a_layout_file(tmp_path, base_dir, components):
    adapter = IFAdapter.for_unet(components["unet"], **tiny.adapter_config())
    adapter.save_pretrained(tmp_path / "adapter")
    layouts = tmp_path / "layouts.jsonl"
    layouts.write_text(
        json.dumps(
            {"caption": "a cat", "instances": [{"box": [0.1, 0.1, 0.6, 0.6], "caption": "a cat"}]}
        )
        + "\n"
        + json.dumps({"caption": "nothing", "instances": []})
        + "\n"
    )
    code = main(
        [
            "generate",
            "--base",
            str(base_dir),
            "--adapter",
            str(tmp_path / "adapter"),
            "--layouts",
            str(layouts),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "2",
            "--num-images",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "out").glob("*_boxes.png"))) == 4


def test_bad_layout_is_one_line_and_exit_2(tmp_path, base_dir, capsys):
    layouts = tmp_path / "bad.json"
    layouts.write_text(
        json.dumps({"caption": "x", "instances": [{"box": [0.5, 0, 0.4, 1], "caption": "y"}]})
    )
    code = main(
        [
            "generate",
            "--base",
            str(base_dir),
            "--adapter",
            str(tmp_path),
            "--layouts",
            str(layouts),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.count("\n") == 0 and "layout 0: instance 0: box" in error and "inverted" in error
    assert (
        main(
            [
                "generate",
                "--base",
                str(base_dir),
                "--adapter",
                str(tmp_path),
                "--layouts",
                str(tmp_path / "missing.json"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
