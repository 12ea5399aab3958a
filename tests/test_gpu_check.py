"""scripts/gpu_check.py runs its checks on the CPU (its dry run): it works when a GPU comes."""

from __future__ import annotations

import importlib.util
import json

import pytest

from .conftest import REPO_ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_its_checks_on_the_cpu(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "gpu_check", REPO_ROOT / "scripts" / "gpu_check.py"
    )
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.delenv("Q2L_OFFICIAL_CODE", raising=False)
    output = tmp_path / "report.json"
    checks = "environment,channels_last,nccl,decode,throughput"
    arguments = ["--device", "cpu", "--case", "demo", "--size", "32", "--batch", "4"]
    arguments += ["--steps", "1", "--rounds", "1", "--jpegs", "4", "--threads", "1"]
    code = gpu_check.main([*arguments, "--quick", "--only", checks, "--output", str(output)])
    report = json.loads(output.read_text())["checks"]
    assert code == 0, report
    assert set(report) == set(checks.split(","))
    assert (
        report["nccl"]["backend"] == "gloo"
        and report["nccl"]["ddp_step_max_weight_difference"] == 0
    )
    assert report["decode"]["mean_pixel_difference_device_vs_cpu"] == 0  # both libjpeg-turbo
    assert report["throughput"]["train_img_s"]["q2l"] > 0
