"""The hostile-input corpus of issue 11 against the real service: status, time and the scorer's peak memory.

    .venv/bin/python benchmarks/bench_hostile.py [--rounds 3]

Starts the app on an embedded Ray (loopback only), as `vgpa serve` does, and sends every case of
`tests/services/hostile.py` at the issue's sizes (two 20000 x 20000 PNG bombs, a zip bomb of two
3 GB members, ...), a few bad numbers, and a slow-loris round (more slow clients than body slots).
Per case it prints the HTTP status, the time to the answer and the scorer replica's peak memory
increase (its peak RSS is reset through /proc/<pid>/clear_refs before each case and read from
VmHWM after). Meanwhile a thread polls /healthz every 0.2 s. Targets: every case 4xx within 2 s,
peak increase <= 200 MB, no replica restart, /healthz under 1 s throughout.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BODY_SLOTS = 4
UPLOAD_TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak RSS increase of one process over a block (Linux: clear_refs 5 resets VmHWM to the current RSS)."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self) -> "PeakMemory":
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.start_kb = proc_status_kb(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.increase_mb = (proc_status_kb(self.pid, "VmHWM") - self.start_kb) / 1024


class HealthPoller(threading.Thread):
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.latencies, self.failures, self.stop = url, [], 0, threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = http.get(f"{self.url}/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - t0)
                self.failures += not ok
                self.stop.wait(0.2)


def slow_loris(url: str, clients: int) -> list[int]:
    """`clients` uploads that send one byte a second; the statuses they end with."""
    host, port = url.removeprefix("http://").split(":")
    head = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\n")
    statuses: list[int] = []

    def client() -> None:
        with socket.create_connection((host, int(port)), timeout=1) as sock:
            sock.sendall(head)
            end = time.monotonic() + 4 * UPLOAD_TIMEOUT_S
            while time.monotonic() < end:
                try:
                    sock.sendall(b"x")
                    data = sock.recv(4096)
                    if data:
                        statuses.append(int(data.split(b" ", 2)[1]))
                    return
                except socket.timeout:
                    continue
                except OSError:
                    return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(statuses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="times the whole corpus is sent (the issue's replica "
                        "was replaced after three zip bombs in a row)")
    args = parser.parse_args()

    from ray import serve

    from services.app import build_app
    from services.local_ray import start_local_ray
    from tests.services.conftest import make_video, wait_ready
    from tests.services.hostile import corpus

    work = Path(tempfile.mkdtemp(prefix="vgpa-bench-hostile-"))
    t0 = time.perf_counter()
    cases = [(case, case.build(work / "corpus")) for case in corpus()]
    good = make_video(work / "good.mp4")
    print(f"corpus built in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for _, p in cases))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start_local_ray(4, object_store_memory=512 * 1024**2, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    service = {
        "work_dir": str(work / "service"), "max_upload_mb": 64, "auth_token_env": None,
        "ingress_max_ongoing_requests": BODY_SLOTS, "upload_timeout_s": UPLOAD_TIMEOUT_S, "upload_idle_timeout_s": 3,
        "scorer": {"score": {"frames": 4, "max_side": 240, "recon_frames": 8}, "num_replicas": 1,
                   "health_check_period_s": 2},
    }
    serve.run(build_app(service), name="bench-hostile", route_prefix="/", blocking=False)
    wait_ready(url)
    scorer = serve.get_deployment_handle("Scorer", app_name="bench-hostile")
    before = scorer.replica_info.remote().result(timeout_s=60)
    poller = HealthPoller(url)
    poller.start()

    rows: list[tuple[str, int, float, float]] = []

    def send(name: str, path: Path, **fields) -> None:
        with PeakMemory(before["pid"]) as peak, open(path, "rb") as f:
            t = time.perf_counter()
            r = httpx.post(f"{url}/score", files={"video": (path.name, f)}, data={k: str(v) for k, v in fields.items()},
                           timeout=120)
            seconds = time.perf_counter() - t
        rows.append((name, r.status_code, seconds, peak.increase_mb))
        if r.status_code < 400 or r.status_code >= 500 or "error" not in r.json():
            print(f"  unexpected answer for {name}: {r.status_code} {r.text[:200]}")

    try:
        for round_ in range(args.rounds):
            for case, path in cases:
                send(case.name if round_ == 0 else f"{case.name} (round {round_ + 1})", path)
        for field, value in (("lambda", "inf"), ("lambda", "1e308"), ("timeout_s", "nan"), ("frames", str(2**70))):
            send(f"{field}={value}", good, **{field: value})
        t = time.perf_counter()
        loris = slow_loris(url, BODY_SLOTS + 2)
        rows.append((f"slow loris x{BODY_SLOTS + 2}: {loris}", max(loris) if loris else 0, time.perf_counter() - t, 0.0))
        r = httpx.post(f"{url}/score", files={"video": (good.name, good.read_bytes())}, timeout=300)
        after = scorer.replica_info.remote().result(timeout_s=60)
    finally:
        poller.stop.set()
        poller.join()
        serve.shutdown()
        import ray

        ray.shutdown()

    print(f"\n| case | status | time (s) | scorer peak +MB |\n|---|---|---|---|")
    for name, status, seconds, mb in rows:
        print(f"| {name} | {status} | {seconds:.2f} | {mb:.0f} |")
    hostile = [row for row in rows if not row[0].startswith("slow loris")]
    print(f"\nworst: {max(s for _, _, s, _ in hostile):.2f} s, {max(m for _, _, _, m in hostile):.0f} MB; "
          f"all 4xx: {all(400 <= st < 500 for _, st, _, _ in hostile)}")
    print(f"/healthz: {len(poller.latencies)} polls, max {max(poller.latencies):.3f} s, "
          f"median {sorted(poller.latencies)[len(poller.latencies) // 2]:.3f} s, failures {poller.failures}")
    print(f"scorer replica restarts: {0 if after == before else 1} (same actor and pid: {after == before}); "
          f"good video afterwards: {r.status_code}")


if __name__ == "__main__":
    main()
