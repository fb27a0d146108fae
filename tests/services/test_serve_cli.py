"""`vgpa serve` end to end in a subprocess: embedded Ray on loopback only, ready URL, self-check through
HTTP, then Ctrl-C or SIGTERM (the same graceful stop)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("common.scoring")

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_self_check_loopback_and_stop(tmp_path, videos, stop_signal):
    from services.local_ray import exposed_listeners, listening_sockets

    port = _free_port()
    config = tmp_path / "service.yaml"
    config.write_text(
        "work_dir: {}\nscorer:\n  num_replicas: 1\n  score: {{frames: 4, max_side: 240, recon_frames: 8}}\n".format(tmp_path / "work")
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for inherited in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):  # `vgpa serve` must set up its Ray itself
        env.pop(inherited, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", "--config", str(config), "--port", str(port), "--num-cpus", "4",
         "--self-check", "--check-video", str(videos["good"])],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 480
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Press Ctrl-C") or time.monotonic() > deadline:
                break
        out = "".join(lines)
        assert f"serving at http://127.0.0.1:{port}" in out, out + "".join(err_lines[-30:])
        assert "self-check: status=" in out, out
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        # Asked for 127.0.0.1: nothing of the whole process tree (GCS, raylet, workers, agents,
        # replicas, the proxy) may listen beyond loopback.
        listeners = listening_sockets(proc.pid)
        assert any(s.port == port for s in listeners), listeners
        assert len(listeners) > 5, "the Ray processes are in the tree"
        assert exposed_listeners(listeners) == [], listeners
        proc.send_signal(stop_signal)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    assert rc == 0, "".join(err_lines[-30:])
    assert any("stopped." in line for line in err_lines)
    assert any(f"received {stop_signal.name}" in line for line in err_lines)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
