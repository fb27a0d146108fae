"""The documented way to run the mining job as a Ray job: `ray job submit ... -- /path/to/.venv/bin/vgpa mine ...`.

A real local Ray head (bound to 127.0.0.1, with its job server) is started from this interpreter's
environment, the tiny text-to-video model's job is submitted through `JobSubmissionClient`, and the
records it wrote are read back. The entrypoint is the venv's own `vgpa` by absolute path: the job
server starts it with the head's PATH, where `python` may be the system one (no cv2, no torch).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission")
pytest.importorskip("diffusers")

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
SCORE = {"frames": 4, "recon_frames": 8, "max_side": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vgpa_entrypoint() -> str:
    """The venv's `vgpa` (what docs/mining.md names), or the same CLI through this interpreter."""
    script = Path(sys.executable).parent / "vgpa"
    return str(script) if script.is_file() else f"{sys.executable} -m clients.cli"


@pytest.fixture
def ray_head():
    """`ray start --head --block` on loopback with the job server; stopped (by its own pids) afterwards.

    Every port is a free one: the session's own Ray (tests/conftest.py) holds the defaults, e.g. the
    dashboard agent's 52365, without which the job server has no agent to run a job.
    """
    import psutil

    from services.local_ray import LOCAL_RAY_ENV

    temp = Path(tempfile.mkdtemp(prefix="vgpa-job-", dir="/tmp"))  # short: Ray's socket paths live under it
    dashboard = free_port()
    ray_cli = Path(sys.executable).parent / "ray"
    command = [str(ray_cli)] if ray_cli.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]
    command += ["start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", "--num-cpus=4", "--object-store-memory=300000000",
                f"--temp-dir={temp}", "--disable-usage-stats"]
    env = {**os.environ, **LOCAL_RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield {"address": address, "pid": head.pid}
    finally:
        # Every process of *this* head (by pid) is asked to stop at once and killed 2 s later: `ray stop`'s
        # one-by-one graceful stop took 30 s (GCS, raylet and agents outlive a SIGTERM by seconds), and
        # nothing of a test head needs to outlive it.
        processes = [head_process := psutil.Process(head.pid)]
        try:
            processes += head_process.children(recursive=True)
        except psutil.Error:
            pass
        for proc in processes:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(processes, timeout=2)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_job_server(address: str, timeout_s: float = 180):
    from ray.job_submission import JobSubmissionClient

    end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        try:
            return JobSubmissionClient(address)
        except Exception as err:  # noqa: BLE001 - not up yet
            last = err
            time.sleep(1)
    raise TimeoutError(f"no Ray job server at {address} after {timeout_s} s ({last!r})")


def submit_when_ready(client, entrypoint: str, runtime_env: dict, timeout_s: float = 180) -> str:
    """Submit once the head's job agent has registered (the job server answers before it does)."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > end:
                raise
            time.sleep(2)


def test_mining_job_submitted_to_a_local_head_writes_its_records(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    from services.local_ray import exposed_listeners, listening_sockets
    from training.fixtures.tiny_cogvideox import save_tiny_cogvideox
    from training.mining.records import load_records
    from training.prompts import write_prompt_file

    model = save_tiny_cogvideox(tmp_path / "t2v")
    prompts = write_prompt_file(tmp_path / "p.jsonl", [{"prompt_id": "car", "prompt": "a red car on a coast road"}])
    (tmp_path / "mine.yaml").write_text(f"steps: 2\nscore: {json.dumps(SCORE)}\n")
    out = tmp_path / "out"
    client = wait_for_job_server(ray_head["address"])
    assert exposed_listeners(listening_sockets(ray_head["pid"])) == []  # the head listens on loopback only

    entrypoint = (f"{vgpa_entrypoint()} mine --prompts {prompts} --model {model} --out {out} --seeds 2 --local "
                  f"--config {tmp_path / 'mine.yaml'}")
    # PYTHONPATH: the job runs this checkout's code (a fresh clone's editable install points here anyway).
    env_vars = {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    job = submit_when_ready(client, entrypoint, {"env_vars": env_vars})
    end = time.monotonic() + 540
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < end, f"the mining job did not finish:\n{client.get_job_logs(job)[-4000:]}"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "No module named" not in logs

    records = load_records(out)
    assert len(records) == 2 and {r["prompt_id"] for r in records} == {"car"}
    for r in records:
        assert r["status"] in ("ok", "unscorable"), r["reason"]
        assert Path(r["video"]).is_file() and Path(r["latents"]).is_file() and "T=4" in r["metric_id"]
    summary = json.loads((out / "mine_summary.json").read_text())
    assert summary["mode"] == "local" and summary["videos_this_run"] == 2
