"""``ifadapter demo``: the whole pipeline on the toy world (docs/toy-world.md).

The demo profile (``configs/demo.yaml``) names the shipped toy base relative to the project.
The demo writes a copy of it into the output directory with those paths made absolute, so the
run works from any directory and the exact profile it ran stays beside its results, then runs
the ``ifadapter-pipeline`` flow: a training world and a held-out benchmark world are generated
and annotated by the oracle, the adapter is trained on the frozen toy base, and the benchmark
scores the base, the adapter and the world's own renders (plain and through the VAE) on every
scene of the held-out world with the exact verifiers. ``report.html`` and ``metrics.json`` are
copied to the top of the output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from annotate.toy.world import scenes
from ifadapter.utils.files import atomic_directory
from ifadapter.utils.profiles import read_profile

PROJECT = Path(__file__).resolve().parent.parent
DEMO_PROFILE = PROJECT / "configs" / "demo.yaml"
TRAIN_WORLD = "toy:seed=1,count=4000"
BENCHMARK_WORLD = "toy:seed=2,count=200"  # held out: scenes training never sees

# The short configuration (CI): every stage for real, on small worlds and a few steps.
QUICK_TRAIN_WORLD = "toy:seed=1,count=96"
QUICK_BENCHMARK_WORLD = "toy:seed=2,count=24"
EXAMPLE_WORLD_SEED = 7  # layouts shipped beside the adapter to try it on

# The paper's ablation (Table 3) as the paper ran it: a variant trained without one token group.
ABLATIONS = {"no-appearance": "appearance_tokens", "no-eot": "eot_token"}


def demo_profile(
    path: Path, quick: bool = False, steps: int | None = None, ablation: str | None = None
) -> Path:
    """The demo profile with absolute model paths (and the quick sizes, ``steps`` training
    steps, or an ``ablation`` variant), written to ``path``.

    An ablation trains the adapter without the token group it names; the report then scores
    that variant, named ``ifadapter-trained-<ablation>``, beside the base and the renders, in
    place of the full adapter and of any inference-time ablation of it (which needs both
    groups)."""
    profile = read_profile(DEMO_PROFILE)
    train = profile["train"]
    train["base"] = str(PROJECT / train["base"])
    if steps is not None:
        train["max_steps"] = steps
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; known: {sorted(ABLATIONS)}")
        train["adapter"][ABLATIONS[ablation]] = False
        methods = []
        for method in profile["evaluate"]["methods"]:
            if method["name"] == "ifadapter":
                methods.append({**method, "name": f"ifadapter-trained-{ablation}"})
            elif "token_groups" not in method:
                methods.append(method)
        profile["evaluate"]["methods"] = methods
    for method in profile["evaluate"]["methods"]:
        if "base" in method:
            method["base"] = str(PROJECT / method["base"])
    if quick:
        train.update(max_steps=4, batch_size=8, checkpoint_every=2, log_every=1, cpus_per_worker=1)
        profile["evaluate"]["benchmark"]["count"] = 8
        profile["evaluate"]["report"]["gallery"] = 4
        for method in profile["evaluate"]["methods"]:
            if "steps" in method:
                method["steps"] = 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def run_demo(
    out: Path,
    quick: bool = False,
    steps: int | None = None,
    export: Path | None = None,
    ablation: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs the pipeline flow on the toy world into ``out``; returns each stage's summary.
    ``export`` receives the trained adapter with the profile and the benchmark's results beside
    it (how ``models/toy-adapter`` is made); ``ablation`` trains a variant without one token
    group (``ABLATIONS``)."""
    from flows.pipeline import run_pipeline

    out = out.resolve()
    results = run_pipeline(
        config=demo_profile(out / "demo.yaml", quick, steps, ablation),
        input=QUICK_TRAIN_WORLD if quick else TRAIN_WORLD,
        benchmark_input=QUICK_BENCHMARK_WORLD if quick else BENCHMARK_WORLD,
        output=out,
    )
    evaluation = results["evaluate"]
    for key, name in (("report_path", "report.html"), ("metrics_path", "metrics.json")):
        shutil.copyfile(evaluation[key], out / name)
    if export is not None:
        export_adapter(Path(results["train"]["adapter"]), out, export)
    return results


def example_layouts(count: int = 8) -> str:
    """JSON lines ``ifadapter generate`` reads: multi-instance scenes of a world that neither
    training nor the benchmark uses."""
    layouts = [scene for scene in scenes(EXAMPLE_WORLD_SEED, 4 * count) if len(scene.instances) > 1]
    return "".join(
        json.dumps(
            {
                "caption": scene.caption,
                "instances": [
                    {"box": [round(v, 4) for v in i.box], "caption": i.caption}
                    for i in scene.instances
                ],
            }
        )
        + "\n"
        for scene in layouts[:count]
    )


def export_adapter(adapter: Path, out: Path, export: Path) -> None:
    """The adapter checkpoint plus what made it and what it scored: ``demo.yaml`` (the profile),
    ``metrics.json`` and ``report.html`` of the benchmark, ``train_metrics.jsonl`` (the curve),
    and ``layouts.jsonl`` to try it on."""
    with atomic_directory(export) as temporary:
        shutil.copytree(adapter, temporary)
        for name in ("demo.yaml", "metrics.json", "report.html"):
            shutil.copyfile(out / name, temporary / name)
        (temporary / "layouts.jsonl").write_text(example_layouts())
        shutil.copyfile(adapter.parent / "metrics.jsonl", temporary / "train_metrics.jsonl")
