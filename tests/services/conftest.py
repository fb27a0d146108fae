"""Fixtures for the service tests: Serve on a loopback port of the session's Ray cluster, test videos."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_cluster) -> str:
    """Serve's HTTP proxy on 127.0.0.1 (started here unless another test module started it)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        client = _get_global_client()
    http = client.http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", None) else http.host
    return f"http://{host}:{http.port}"


def wait_ready(url: str, timeout: float = 600.0) -> None:
    """Poll GET /readyz until 200 (replicas constructed, models loaded)."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            r = httpx.get(f"{url}/readyz", timeout=10)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as err:
            last = repr(err)
        time.sleep(0.5)
    raise TimeoutError(f"service at {url} not ready after {timeout} s (last: {last})")


@contextmanager
def deployed(args: dict, name: str, url: str) -> Iterator[str]:
    """Deploy build_app(args) at route '/', wait for readiness, delete it afterwards."""
    from ray import serve

    from services.app import build_app

    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    try:
        wait_ready(url)
        yield url
    finally:
        serve.delete(name)


def make_video(path: Path, frames: int = 20, size: tuple[int, int] = (160, 240), static: bool = False) -> Path:
    """A small real test video: the demo scene (moving camera), or one frame repeated (static)."""
    from common.synthetic import render_demo_video, render_video
    from common.video import write_video

    if static:
        first = render_video("boxes", "orbit", frames=2, size=size).frames[:1]
        return write_video(path, first.repeat(frames, 1, 1, 1), fps=8)
    return render_demo_video(path, frames=frames, size=size)


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Inputs shared by the service tests: good, static, corrupt, one-frame, not-a-video, zip of frames."""
    import zipfile

    import numpy as np
    from PIL import Image

    pytest.importorskip("common.synthetic")
    root = tmp_path_factory.mktemp("service-videos")
    good = make_video(root / "good.mp4")
    out = {"good": good, "static": make_video(root / "static.mp4", static=True)}
    data = good.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    out["truncated"] = root / "truncated.mp4"
    (root / "notes.mp4").write_bytes(b"this is not a video at all\n" * 100)
    out["text"] = root / "notes.mp4"
    one = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype("uint8"))
    one.save(root / "one.gif")
    out["one_frame"] = root / "one.gif"
    # A zip of ordered frames decoded from the good video.
    from common.video import load_video, write_image_folder

    folder = write_image_folder(root / "frames", load_video(good, max_side=240).frames[::2])
    with zipfile.ZipFile(root / "frames.zip", "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, arcname=f.name)
    out["folder"] = folder
    out["zip"] = root / "frames.zip"
    return out


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page():
    """A page in Debian's headless chromium driven by Playwright (never `playwright install`)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()
