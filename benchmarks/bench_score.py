"""`vgpa score` end to end on a 49-frame 480x720 video with the default backend.

Runs the real command in a child process and reports its wall time, peak memory (max RSS of
the child) and the per-stage breakdown, next to the targets (6 s, 3 GB on 2 CPU cores).
    python benchmarks/bench_score.py [--frames 49] [--size 480x720] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.synthetic import render_video
from common.video import write_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", default="480x720")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    H, W = map(int, args.size.split("x"))
    folder = Path(tempfile.mkdtemp(prefix="vgpa-bench-"))
    path = write_video(folder / "orbit.mp4", render_video("boxes", "orbit", frames=args.frames, size=(H, W)).frames)
    print(f"video: {args.frames} frames {W}x{H} (H.264), default backend, device {args.device}")
    command = [sys.executable, "-c", "from clients.cli import main; main()", "score", str(path), "--json", "--quiet", "--device", args.device]
    for run in range(args.runs):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(done.stderr)
        result = json.loads(done.stdout)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        print(f"run {run + 1}: wall {wall:.2f} s (target <= 6 s), peak memory {peak_gb:.2f} GB (target <= 3 GB), "
              f"status {result['status']}, score {result['score']}, registered {result['registered_frames']}/{result['frames']}")
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in result["timings_s"].items())
        print(f"  stages (inside the process): {stages}")
        print(f"  process start-up and imports: {wall - result['timings_s']['total']:.2f} s")


if __name__ == "__main__":
    main()
