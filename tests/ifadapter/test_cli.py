import json
import subprocess
import sys

import pytest
import yaml

from flows.demo import ABLATIONS, DEMO_PROFILE
from ifadapter import IFAdapter, tiny
from ifadapter.cli import build_parser, main
from tests.support.flows import flow_env


@pytest.mark.slow
def test_quick_demo_writes_the_report_and_metrics(tmp_path):
    """``ifadapter demo --quick`` as a user runs it (its own process: Prefect binds its log
    handlers to the process's streams): the whole flow on small toy worlds, under Prefect's
    temporary local server, ending in the files the README promises."""
    out = tmp_path / "demo"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ifadapter.cli",
            "demo",
            "--out",
            str(out),
            "--quick",
            "--export",
            str(tmp_path / "adapter"),
        ],
        cwd=tmp_path,  # the demo must not depend on the directory it is started from
        env=flow_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo finished" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    profile = yaml.safe_load(DEMO_PROFILE.read_text())
    names = {method["name"] for method in profile["evaluate"]["methods"]}
    assert set(metrics["methods"]) == names and {"base", "ifadapter", "real-vae"} <= names
    for values in metrics["methods"].values():
        assert 0 <= values["ifs_rate"] <= 1 and 0 <= values["placement"] <= 1
        assert values["ap"] is not None and values["instances"] > 0
    assert metrics["methods"]["real"]["placement"] == 1.0
    html = (out / "report.html").read_text()
    assert all(name in html for name in names)
    exported = tmp_path / "adapter"  # --export: the adapter with what made it and what it scored
    assert IFAdapter.from_pretrained(exported).config.layers
    files = ("demo.yaml", "metrics.json", "report.html", "train_metrics.jsonl", "layouts.jsonl")
    for name in files:
        assert (exported / name).is_file(), name


@pytest.mark.slow
def test_quick_demo_trains_the_papers_ablation_separately(tmp_path):
    """``ifadapter demo --ablation no-eot``: the adapter is trained without the EoT token and the
    report scores that variant under its own name, with no inference-time ablation (they need
    the token group the variant lacks)."""
    out = tmp_path / "demo"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "ifadapter.cli", "demo", "--out", str(out), "--quick"),
            *("--ablation", "no-eot"),
        ],
        cwd=tmp_path,
        env=flow_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"base", "ifadapter-trained-no-eot", "real", "real-vae"}
    (adapter,) = (out / "train").glob("*/adapter")
    config = IFAdapter.from_pretrained(adapter).config
    assert not config.eot_token and config.appearance_tokens
    assert "ifadapter-trained-no-eot" in (out / "report.html").read_text()


def test_demo_offers_exactly_the_ablations_the_demo_profile_knows():
    """The CLI spells the choices out rather than import flows.demo (0.39 s against the CLI's
    0.07 s of imports, on every command): this keeps the two lists one."""
    (demo,) = [
        action.choices["demo"]
        for action in build_parser()._actions
        if getattr(action, "choices", None) and "demo" in action.choices
    ]
    (ablation,) = [action for action in demo._actions if action.dest == "ablation"]
    assert set(ablation.choices) == set(ABLATIONS)


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


def test_help_and_version_answer_without_loading_models():
    """``--help`` of every command and ``--version`` import no torch, diffusers, Ray or Prefect:
    they answer at once (heavy imports wait until a command runs)."""
    probe = (
        "import sys\n"
        "from ifadapter.cli import main\n"
        "for argv in sys.argv[1:]:\n"
        "    try:\n"
        "        main(argv.split())\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, (argv, done.code)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'ray', 'prefect', 'gradio')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    commands = ["--help", "--version"] + [
        f"{c} --help"
        for c in (
            "demo",
            "generate",
            "annotate",
            "train",
            "evaluate",
            "pipeline",
            "convert-released",
            "studio",
        )
    ]
    result = subprocess.run(
        [sys.executable, "-c", probe, *commands], capture_output=True, text=True, env=flow_env()
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ifadapter 0." in result.stdout and "--benchmark-input" in result.stdout


def test_a_base_that_is_not_there_is_one_line(tmp_path, capsys):
    """The README's training command with a base that was never made: one line naming it (not a
    traceback about the model hub), exit status 2; the same for generate."""
    argv = ["train", "--config", "configs/tiny.yaml", "--base", "out/nowhere/base"]
    assert main([*argv, "--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "base out/nowhere/base: no such directory" in error
    (tmp_path / "not-a-pipeline").mkdir()
    layouts = tmp_path / "layouts.json"
    layouts.write_text(json.dumps({"caption": "x", "instances": []}))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "config.json").write_text("{}")
    argv = ["generate", "--layouts", str(layouts), "--out", str(tmp_path / "o")]
    argv += ["--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "not-a-pipeline")]
    assert main(argv) == 2
    assert "is not an SDXL pipeline directory (no model_index.json)" in capsys.readouterr().err
