"""The service's speed: start-up, per-request overhead against in-process scoring, throughput.

    python benchmarks/bench_service.py [--frames 49] [--size 480x720] [--runs 5] [--video FILE]

Reports
  1. start-up: from launching `vgpa serve` (embedded Ray) to the first 200 of /healthz, /readyz
     (scorer models loaded) and POST /score;
  2. overhead: median latency of POST /score on one video against `score_video` called in this
     process with the same settings (alternating, both warm), as a ratio (target < 1.15);
  3. throughput: requests per second with 1 and 2 scorer replicas, 4 concurrent clients.
Not a test: timings depend on the machine and its load; the machine is printed with them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_video(frames: int, size: tuple[int, int], cache: Path) -> Path:
    """The benchmark video (rendered once, then reused from `cache`)."""
    from common.synthetic import render_video
    from common.video import write_video

    path = cache / f"orbit-{frames}x{size[0]}x{size[1]}.mp4"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_video(path, render_video("boxes", "orbit", frames=frames, size=size).frames)
        print(f"rendered {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


def bench_startup(video: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marks: dict[str, float] = {}
    try:
        for name, method, path in (("/healthz", "GET", "/healthz"), ("/readyz", "GET", "/readyz"), ("POST /score", "POST", "/score")):
            while True:
                try:
                    if method == "GET":
                        r = httpx.get(url + path, timeout=10)
                    else:
                        with open(video, "rb") as f:
                            r = httpx.post(url + path, files={"video": (video.name, f)}, timeout=600)
                    if r.status_code == 200:
                        marks[name] = time.perf_counter() - t0
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > 900:
                    raise TimeoutError(f"no 200 from {name} within 900 s")
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("1. start-up of `vgpa serve` (embedded Ray), seconds from launch to the first 200:")
    for name, t in marks.items():
        print(f"     {name:12s} {t:6.1f} s")


def post(url: str, video: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with open(video, "rb") as f:
        r = httpx.post(f"{url}/score", files={"video": (video.name, f)}, timeout=900)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def bench_overhead_and_throughput(video: Path, runs: int, throughput: bool = True) -> None:
    import ray
    from ray import serve

    from common.config import ScoreConfig
    from common.scoring import score_video
    from services.app import build_app
    from services.local_ray import start_local_ray

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start_local_ray(4, object_store_memory=512 * 1024**2, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        def deploy(replicas: int, cpus_per_replica: float) -> None:
            # Ray sets OMP_NUM_THREADS to a replica's num_cpus: torch in the replica uses that many threads.
            scorer = {"num_replicas": replicas, "num_cpus": cpus_per_replica}
            serve.run(build_app({"scorer": scorer}), name="bench", route_prefix="/", blocking=False)
            while httpx.get(f"{url}/readyz", timeout=30).status_code != 200:
                time.sleep(0.5)

        # Same threads on both sides: one replica with all the cores, as this process has.
        cores = os.cpu_count() or 1
        deploy(1, float(cores))
        config = ScoreConfig()
        score_video(video, config)  # warm this process's backend and metric
        post(url, video)  # and the replica's first request
        local, remote, inner = [], [], []
        for _ in range(runs):  # alternate, so that load from elsewhere hits both alike
            t0 = time.perf_counter()
            score_video(video, config)
            local.append(time.perf_counter() - t0)
            latency, result = post(url, video)
            remote.append(latency)
            inner.append(result["timings_s"]["total"])  # score_video's own time inside the replica
        ml, mr = statistics.median(local), statistics.median(remote)
        print(f"2. POST /score vs in-process score_video, {runs} runs each, default settings, {cores} threads both:")
        print(f"     in-process median {ml:.2f} s (runs {', '.join(f'{x:.2f}' for x in local)})")
        print(f"     POST /score median {mr:.2f} s (runs {', '.join(f'{x:.2f}' for x in remote)})")
        print(f"     ratio {mr / ml:.3f} (target < 1.15); overhead {mr - ml:+.2f} s")
        # The same request seen from both ends: immune to load that changes between runs.
        ratios = [r / i for r, i in zip(remote, inner)]
        extra = [r - i for r, i in zip(remote, inner)]
        print(f"     same request, HTTP latency / score_video time in the replica: median {statistics.median(ratios):.3f} "
              f"(runs {', '.join(f'{x:.3f}' for x in ratios)}); service overhead median {statistics.median(extra):.2f} s")

        if not throughput:
            return
        print(f"3. throughput, 4 concurrent clients, 8 requests, replicas of {max(1, cores // 2)} CPU each:")
        for replicas in (1, 2):
            deploy(replicas, float(max(1, cores // 2)))
            for _ in range(replicas):
                post(url, video)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                latencies = [t for t, _ in pool.map(lambda _: post(url, video), range(8))]
            wall = time.perf_counter() - t0
            print(f"     {replicas} replica(s): {8 / wall:.3f} requests/s ({wall:.1f} s for 8; "
                  f"median latency {statistics.median(latencies):.1f} s)")
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", default="480x720")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--video", type=Path, default=None, help="Use this video instead of rendering one.")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    h, w = map(int, args.size.split("x"))
    video = args.video or make_video(args.frames, (h, w), Path(tempfile.gettempdir()) / "vgpa-bench")
    print(f"machine: {os.cpu_count()} CPU cores; video {video.name}")
    if not args.skip_startup:
        bench_startup(video)
    bench_overhead_and_throughput(video, args.runs, throughput=not args.skip_throughput)


if __name__ == "__main__":
    main()
