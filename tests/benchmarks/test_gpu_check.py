"""benchmarks/gpu_check.py in its tiny CPU form: every part runs (or says why not) and writes its figures.

The script is meant for a GPU machine; this test runs it as a user would (a subprocess, `--tiny`,
a bounded time) so that it is known to work before a GPU ever runs it. It checks the JSON's
structure and contents, never timings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PARTS = ("raster", "scorer", "service", "sampling", "training")
#: The package each part needs beyond the core stack: without it the part must be skipped, with the reason.
NEEDS = {"scorer": "depth_anything_3", "service": "depth_anything_3", "training": "deepspeed"}

pytestmark = pytest.mark.ray  # the scorer and service parts start their own local Ray


def run_check(out: Path, *args: str, timeout: float = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)  # its own Ray, never the test session's
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    report["_stdout"] = proc.stdout
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_check(tmp_path_factory.mktemp("gpu-check"))


def test_every_part_is_reported_in_order_with_figures_or_a_reason(report):
    assert report["tiny"] is True and report["device"] == "cpu"
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part.get("error"), part.get("traceback"))
        if part["status"] == "skipped":
            assert NEEDS.get(name) and importlib.util.find_spec(NEEDS[name]) is None, (name, part["reason"])
            assert NEEDS[name] in part["reason"]
            continue
        assert part["figures"], name
        for key, fig in part["figures"].items():
            assert set(fig) == {"value", "unit", "target", "met", "note"}, (name, key)
            assert fig["met"] is None  # targets are judged on the full-size GPU run only
            assert fig["value"] is None or isinstance(fig["value"], (int, float)), (name, key)
            assert fig["unit"], (name, key)
            assert key in report["_stdout"]  # printed beside its target


def test_raster_on_the_device_is_identical_to_the_one_thread_cpu_reference(report):
    raster = report["parts"]["raster"]
    assert raster["checks"]["identical_to_cpu"] is True
    assert raster["figures"]["time_ms"]["value"] > 0 and raster["figures"]["time_ms"]["target"] == "<= 10 ms"
    assert raster["settings"]["points"] == 3 * 48 * 72


def test_scorer_batches_videos_on_one_replica(report):
    scorer = report["parts"]["scorer"]
    if scorer["status"] == "skipped":
        pytest.skip(scorer["reason"])
    checks = scorer["checks"]
    assert checks["all_answered"] and checks["errors"] == []
    assert checks["batched"] is True and checks["peak_concurrent_videos"] == scorer["settings"]["max_batch_size"] == 2
    assert 0 < scorer["figures"]["share_outside_model"]["value"] < 1
    assert scorer["figures"]["videos_per_s"]["target"] == ">= 10 videos/s"
    assert scorer["figures"]["peak_gpu_memory_gb"]["value"] is None  # a CPU replica says so
    assert set(scorer["stage_seconds_per_video"]) >= {"decode", "geometry.da3", "total"}


def test_service_answers_every_concurrent_client(report):
    service = report["parts"]["service"]
    if service["status"] == "skipped":
        pytest.skip(service["reason"])
    assert service["checks"]["all_ok"] and service["checks"]["status_codes"] == {"200": 4}
    figures = service["figures"]
    assert figures["latency_p50_s"]["value"] <= figures["latency_p95_s"]["value"]


def test_sampling_and_training_run_the_project_code_paths(report):
    sampling, training = report["parts"]["sampling"], report["parts"]["training"]
    assert sampling["settings"]["latents"] == [1, 3, 9, 32, 32]  # decoded (B, C, F, H, W)
    assert sampling["figures"]["videos_per_gpu_hour_50_steps"]["value"] > 0
    if training["status"] == "skipped":
        pytest.skip(training["reason"])
    assert training["settings"]["zero_stage"] == 2 and training["settings"]["workers"] == 1
    assert training["settings"]["lora_alpha"] == 2 * training["settings"]["lora_rank"]
    ours, copy = training["figures"]["reference_memory_ratio"]["value"], training["figures"]["frozen_copy_memory_ratio"]["value"]
    assert ours < copy and copy - ours == pytest.approx(1.0)  # a frozen copy holds one more whole model


def test_parts_are_selectable_and_full_size_without_cuda_is_skipped_with_the_reason(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full-size run would really run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--parts", "raster,sampling", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == ["raster", "sampling"]
    assert all(p["status"] == "skipped" and "CUDA" in p["reason"] for p in report["parts"].values())
