"""`vgpa serve`: run the HTTP API on Ray Serve until Ctrl-C.

With no cluster address it starts an embedded local Ray (no dashboard) bound to loopback only
(`services.local_ray`), deploys `services.app:build_app`, prints the URL once the scorer is ready,
and on Ctrl-C or SIGTERM shuts Serve and Ray down. Only the HTTP port listens on `--host`; if any
other socket of the process tree is bound beyond loopback, it stops instead of serving. With
`--address` it deploys onto that cluster and, on Ctrl-C or SIGTERM, deletes the application it
deployed.

`--config FILE` takes either a Serve config file (like cluster/serve_config.yaml: the `args` of
the application whose import_path is services.app:build_app, and its `http_options`) or a plain
YAML/JSON `ServiceArgs` mapping.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import click

APP_NAME = "videogpa"
IMPORT_PATH = "services.app:build_app"
APP_IMPORT_PATH = "services.app:app"  # what `serve build services.app:app` writes
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def load_config_file(path: Path) -> tuple[dict, dict]:
    """(ServiceArgs dict, http_options dict) from a Serve config file or a plain args file."""
    import yaml

    text = Path(path).read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    data = data or {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} does not hold a mapping", param_hint="--config")
    if "applications" not in data:
        return data, {}
    apps = [a for a in data["applications"] if a.get("import_path") in (IMPORT_PATH, APP_IMPORT_PATH)]
    if not apps:
        raise click.BadParameter(f"{path} has no application with import_path {IMPORT_PATH}", param_hint="--config")
    if apps[0].get("deployments"):
        click.echo("note: per-deployment overrides in the config file are applied by `serve run/deploy FILE`; "
                   "`vgpa serve` derives deployment options from `args` only.", err=True)
    return apps[0].get("args") or {}, data.get("http_options") or {}


def run_self_check(url: str, token: Optional[str] = None, video: Optional[Path] = None) -> dict:
    """Score `video` (default: the rendered demo video) once through HTTP; raises ServiceError on failure."""
    from clients.http_client import VideoGPAClient

    with tempfile.TemporaryDirectory(prefix="vgpa-selfcheck-") as tmp:
        if video is None:
            from common.synthetic import render_demo_video

            video = render_demo_video(Path(tmp) / "demo.mp4")
        with VideoGPAClient(url, token=token, retries=3) as client:
            return client.score(video)


@click.command(help="Serve the videogpa HTTP API (Ray Serve) until Ctrl-C.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A Serve config file (cluster/serve_config.yaml) or a YAML/JSON ServiceArgs mapping.")
@click.option("--host", default=None, help=f"Address to listen on (default {DEFAULT_HOST}; 0.0.0.0 for all).")
@click.option("--port", default=None, type=int, help=f"HTTP port (default {DEFAULT_PORT}).")
@click.option("--address", default=None, help="Ray cluster address (ray://... or host:port); default: an embedded local Ray.")
@click.option("--num-cpus", default=None, type=int, help="Logical CPUs of the embedded Ray (default: max(4, cores)).")
@click.option("--sampler-model", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A local diffusers CogVideoX (text- or image-to-video) or Wan (text- or image-to-video) folder: also serve POST /sample.")
@click.option("--self-check", is_flag=True, help="Once ready, score the demo video through HTTP and print the result.")
@click.option("--check-video", default=None, type=click.Path(exists=True, path_type=Path),
              help="Video for --self-check (default: render the demo video).")
@click.option("--exit-after-check", is_flag=True, hidden=True, help="Stop after the self-check (for tests).")
def serve(config_file: Optional[Path], host: Optional[str], port: Optional[int], address: Optional[str],
          num_cpus: Optional[int], sampler_model: Optional[Path], self_check: bool, check_video: Optional[Path], exit_after_check: bool) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pydantic import ValidationError

    from services.config import ServiceArgs

    args, http_options = load_config_file(config_file) if config_file else ({}, {})
    if sampler_model is not None:
        args = {**args, "sampler": {**(args.get("sampler") or {}), "model_dir": str(sampler_model.resolve())}}
    try:
        cfg = ServiceArgs.model_validate(args)
    except ValidationError as err:
        raise click.BadParameter(str(err), param_hint="--config") from None
    host = host or http_options.get("host") or DEFAULT_HOST
    port = port or http_options.get("port") or DEFAULT_PORT

    stop = threading.Event()

    def _on_signal(signum, _frame) -> None:
        click.echo(f"\nreceived {signal.Signals(signum).name}, shutting down...", err=True)
        stop.set()

    import ray
    from ray import serve as ray_serve

    from services.app import build_app
    from services.local_ray import exposed_listeners, is_loopback, listening_sockets, start_local_ray

    embedded = address is None
    t0 = time.perf_counter()
    if embedded:
        start_local_ray(num_cpus or max(4, os.cpu_count() or 1), object_store_memory=512 * 1024**2)
    else:
        ray.init(address=address)
    # Installed after ray.init, which replaces the SIGTERM handler with a bare sys.exit; and
    # explicitly for SIGINT, which a process started in the background by a non-interactive
    # shell inherits as ignored. Both must stop us the same graceful way.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    code = 0
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        ray_serve.run(build_app(cfg.model_dump(mode="json", by_alias=True)), name=APP_NAME, route_prefix="/",
                      blocking=False)
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown_host}:{port}"
        from clients.http_client import ServiceError, VideoGPAClient

        with VideoGPAClient(url) as client:
            client.wait_ready(timeout=600)
        if embedded:
            exposed = exposed_listeners(listening_sockets(), allowed_ports=() if is_loopback(host) else (port,))
            if exposed:
                raise click.ClickException(
                    "refusing to serve: these sockets of the embedded Ray listen beyond loopback: "
                    + ", ".join(f"{s.process}[{s.pid}] {s.host}:{s.port}" for s in exposed))
        click.echo(f"videogpa is serving at {url}  (docs: {url}/docs, ready after {time.perf_counter() - t0:.1f} s)")
        if self_check:
            try:
                result = run_self_check(url, cfg.auth_token(), check_video)
                click.echo(f"self-check: status={result['status']} score={result.get('score')} "
                           f"reason={result.get('reason')} metric={result.get('metric_id')}")
            except ServiceError as err:
                click.echo(f"self-check failed: {err}", err=True)
                code = 1
                stop.set()
        if exit_after_check:
            stop.set()
        if not stop.is_set():
            click.echo("Press Ctrl-C to stop.")
        while not stop.wait(0.5):
            pass
    finally:
        try:
            if embedded:
                ray_serve.shutdown()
            else:
                ray_serve.delete(APP_NAME)
        finally:
            ray.shutdown()
        click.echo("stopped.", err=True)
    if code:
        sys.exit(code)


COMMANDS = [serve]
