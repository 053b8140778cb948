"""The GPU check (benchmarks/gpu_check.py) stays runnable between GPU sessions: its smoke size
runs every section on the tiny SDXL on the CPU and writes the JSON the docs describe."""

import json

from benchmarks import gpu_check


def test_gpu_check_smoke_run(tmp_path, one_torch_thread, capsys):
    out = tmp_path / "check" / "gpu_check.json"
    gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["profile"] == "smoke"
    assert set(result["steps"]) == set(result["tokens"]) == {"float16", "bfloat16"}
    for run in result["steps"].values():
        assert [row["instances"] for row in run["rows"]] == [0, *gpu_check.SMOKE.counts]
        assert all(row["finite"] and row["step_s"] > 0 for row in run["rows"])
    assert [row["level"] for row in result["levels"]] == ["4x4", "8x8"]
    assert [row["batch"] for row in result["training"]] == list(gpu_check.SMOKE.train_batches)
    assert all(row["gradients_finite"] for row in result["training"])
    assert "training step" in capsys.readouterr().out
