"""The engine end to end on a real (local, two-CPU) Ray with the tiny models."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from annotate.cli import add_parser
from annotate.engine.plan import PlanMismatch
from annotate.engine.writer import shard_schema
from annotate.schema import QUARANTINE_DIR, QUARANTINE_SCHEMA, Manifest, check_schema
from ifadapter.utils.profiles import ConfigError
from tests.annotate.test_sources import write_coco
from tests.support.annotate_inputs import REPO, TINY_PROFILE, write_bad_inputs, write_scenes


def run_cli(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="ifadapter")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["annotate", *map(str, argv)])
    args.runner(args)


def dataset(directory: Path) -> tuple[list[dict], list[dict]]:
    """Rows and quarantine rows, after checking the manifest, checksums and schemas."""
    manifest = Manifest.read(directory)
    manifest.verify(directory)
    rows = []
    for path in manifest.shard_paths(directory):
        table = pq.read_table(path)
        check_schema(table.schema)
        rows += table.to_pylist()
    quarantined = []
    for entry in manifest.quarantine:
        table = pq.read_table(directory / entry.path)
        check_schema(table.schema, QUARANTINE_SCHEMA, "quarantine")
        quarantined += table.to_pylist()
    assert manifest.inputs == len(rows) + len(quarantined) == manifest.rows + manifest.quarantined
    return rows, quarantined


def write_profile(path: Path, **output) -> Path:
    """The tiny profile with other output settings and small batches (results trickle in)."""
    profile = yaml.safe_load(TINY_PROFILE.read_text())
    profile["annotate"]["output"].update(output)
    for stage in ("decode", "tagger", "detector", "captioner"):
        profile["annotate"][stage]["batch_size"] = 2
    path.write_text(yaml.safe_dump(profile))
    return path


def test_folder_end_to_end_with_bad_inputs(
    ray_cluster, tiny_models_root, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tiny_models_root)
    images = tmp_path / "images"
    good = write_scenes(images, 10) + write_scenes(images / "more", 2, start=10)
    cases = write_bad_inputs(images / "odd")
    (images / "odd" / "readme.txt").write_text("not an input: no image extension")
    out = tmp_path / "shards"

    run_cli(
        "--config",
        TINY_PROFILE,
        "--input",
        images,
        "--output",
        out,
        "--export-coco",
        tmp_path / "coco.json",
    )
    printed = capsys.readouterr().out
    inputs = len(good) + len(cases)
    assert f"{inputs} of {inputs} inputs annotated" in printed and "images/s" in printed
    assert "too_many_pixels 1" in printed and "COCO JSON:" in printed

    rows, quarantined = dataset(out)
    assert len(list(out.glob("shard-*.parquet"))) == 2  # 20 inputs, 16 per shard
    expected_rows = {str(p) for p in good} | {
        str(images / "odd" / name) for name, (_, code) in cases.items() if code is None
    }
    assert {r["uri"] for r in rows} == expected_rows
    assert {q["uri"].rsplit("/", 1)[1]: q["reason"].split(":")[0] for q in quarantined} == {
        name: code for name, (_, code) in cases.items() if code is not None
    }
    assert len({r["image_id"] for r in rows}) == len(rows)
    by_name = {Path(r["uri"]).name: r for r in rows}
    assert (by_name["exif-rotated.jpg"]["width"], by_name["exif-rotated.jpg"]["height"]) == (48, 96)
    assert pq.read_schema(out / "shard-00000.parquet").equals(shard_schema(pa.schema([])))
    for row in rows:
        assert row["image_id"] == f"folder-{row['sha256'][:16]}" and row["image"] is None
        assert 0 < len(row["tags"]) <= 8 and row["caption"] == ", ".join(row["tags"])
        for instance in row["instances"]:
            x0, y0, x1, y1 = instance["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert (
                instance["label"] in row["tags"] and instance["caption"] == f"a {instance['label']}"
            )
        annotator = json.loads(row["annotator"])
        assert (
            annotator["detect"]["box_threshold"] == 0.25
            and annotator["caption"]["backend"] == "template"
        )
    assert sum(len(r["instances"]) for r in rows) > 0
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert len(coco["images"]) == len(rows)
    assert len(coco["annotations"]) == sum(len(r["instances"]) for r in rows)

    before = (out / "_manifest.json").read_text()
    run_cli("--config", TINY_PROFILE, "--input", images, "--output", out)
    assert f"all {inputs} inputs were already annotated" in capsys.readouterr().out
    assert (out / "_manifest.json").read_text() == before
    # The directory reads as the dataset with standard readers: the quarantine (and the
    # manifest) are skipped by their leading underscore.
    assert pq.read_table(out).num_rows == len(rows)
    assert set(pq.read_table(out).column("uri").to_pylist()) == expected_rows

    # A dataset written before quarantine/ became _quarantine/ is moved on the next run.
    (out / QUARANTINE_DIR).rename(out / "quarantine")
    manifest = json.loads(before)
    for entry in manifest["quarantine"]:
        entry["path"] = entry["path"].replace(QUARANTINE_DIR, "quarantine", 1)
    (out / "_manifest.json").write_text(json.dumps(manifest))
    run_cli("--config", TINY_PROFILE, "--input", images, "--output", out)
    assert not (out / "quarantine").exists() and dataset(out) == (rows, quarantined)

    (images / "late.png").write_bytes(good[0].read_bytes())
    with pytest.raises(PlanMismatch, match="holds a run with other settings"):
        run_cli("--config", TINY_PROFILE, "--input", images, "--output", out)
    with pytest.raises(ConfigError, match="does not exist"):
        run_cli("--config", tmp_path / "none.yaml", "--input", images, "--output", out)


def test_coco_subset_and_uri_list_sources(ray_cluster, tiny_models_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_models_root)
    annotations = write_coco(tmp_path / "coco")
    run_cli("--config", TINY_PROFILE, "--input", annotations, "--output", tmp_path / "coco-shards")
    rows, quarantined = dataset(tmp_path / "coco-shards")
    assert quarantined == [] and [r["coco_id"] for r in rows] == [10, 20, 30]
    assert rows[0]["source_caption"] == "A red ball." and rows[0]["caption"] == "A red ball."
    assert [b["label"] for b in rows[0]["coco_boxes"]] == ["ball", "box"]
    assert all(r["image_id"].startswith("coco-") for r in rows)

    listing = tmp_path / "list.parquet"
    images = sorted((tmp_path / "coco" / "mini2017").glob("*.png"))
    uris = [f"coco/mini2017/{p.name}" for p in images] + ["coco/mini2017/missing.png"]
    pq.write_table(pa.table({"URL": uris, "TEXT": ["one", "two", None, "gone"]}), listing)
    run_cli(
        "--config",
        TINY_PROFILE,
        "--input",
        f"file://{listing}",
        "--output",
        tmp_path / "uri-shards",
        "--source-name",
        "laion",
    )
    rows, quarantined = dataset(tmp_path / "uri-shards")
    assert [r["source_caption"] for r in rows] == ["one", "two", None]
    assert rows[0]["caption"] == "one" and all(r["image_id"].startswith("laion-") for r in rows)
    assert [(q["stage"], q["reason"].split(":")[0]) for q in quarantined] == [
        ("read", "unreadable")
    ]


def test_killed_mid_run_then_rerun_gives_every_input_exactly_once(
    ray_cluster, tiny_models_root, tmp_path, monkeypatch
):
    images = tmp_path / "images"
    inputs = {str(p) for p in write_scenes(images, 22)}
    cases = write_bad_inputs(images / "odd")
    inputs |= {str(images / "odd" / name) for name in cases}
    profile = write_profile(tmp_path / "profile.yaml", rows_per_shard=2)
    out = tmp_path / "shards"
    command = [
        sys.executable,
        "-c",
        "import sys; from tests.annotate.engine.test_engine import run_cli; run_cli(*sys.argv[1:])",
        "--config",
        str(profile),
        "--input",
        str(images),
        "--output",
        str(out),
        "--ray-address",
        ray_cluster,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    job = subprocess.Popen(
        command,
        cwd=tiny_models_root,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline:
        if any(out.glob("shard-*.parquet")):
            os.killpg(job.pid, signal.SIGKILL)  # a real kill: no clean-up runs
            break
        time.sleep(0.01)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    partitions = len(inputs) // 2
    done_at_kill = len(list(out.glob("shard-*.parquet")))
    assert 0 < done_at_kill < partitions and not (out / "_manifest.json").exists()

    monkeypatch.chdir(tiny_models_root)
    run_cli("--config", profile, "--input", images, "--output", out)
    rows, quarantined = dataset(out)
    seen = Counter(r["uri"] for r in rows) + Counter(q["uri"] for q in quarantined)
    assert set(seen) == inputs and set(seen.values()) == {1}
    assert len(list(out.glob("shard-*.parquet"))) == partitions
