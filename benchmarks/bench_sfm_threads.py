"""The scorer's work split over one thread against two (`common.parallel.cpu_workers`): same scores, less time?

For each chosen set of `bench_validity.py` (its cached H.264 files), the clean clip and its 6 px
drift are scored twice in the same run: with the SfM's SIFT extraction and the depth stage's
frames forced onto one thread (the scorer before 2026-12-07) and with the default (two threads
where torch has two). The order of the
two alternates from file to file, so neither always runs on a warmer machine. Printed per file: both
scores (they must be bit-identical), both times, and the SfM stage's share; at the end the median
and worst time per video of each.

    python benchmarks/bench_sfm_threads.py [--sets statue,kitchen,...] [--kinds clean,drift6] [--cache DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common.geometry.colmap_flow as colmap_flow  # noqa: E402
from common.config import ScoreConfig  # noqa: E402
from common.parallel import cpu_workers  # noqa: E402
from common.scoring import score_video  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_validity as validity  # noqa: E402  (its sets and cached files)

ALL_SETS = ",".join(s.name for s in validity.video_sets())


def timed_score(path: Path, config: ScoreConfig, workers: int) -> tuple[float, float, float]:
    """(score or NaN if unscorable, seconds in all, seconds of the SfM) with the backend's split work on `workers` threads."""
    default = colmap_flow.cpu_workers
    colmap_flow.cpu_workers = lambda limit=2: min(workers, default(limit))
    try:
        start = time.perf_counter()
        result = score_video(path, config)
        seconds = time.perf_counter() - start
    finally:
        colmap_flow.cpu_workers = default
    score = result.score if result.status == "ok" else float("nan")
    return score, seconds, (result.timings_s or {}).get("geometry.sfm", 0.0)


def same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN: unscorable both times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=ALL_SETS)
    parser.add_argument("--kinds", default="clean,drift6")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vgpa-validity-2")
    args = parser.parse_args()
    sets = validity.chosen_sets(args.sets)
    config = ScoreConfig()
    print(validity.machine_line(config) + f"; {cpu_workers()} workers by default")
    print(f"  {'video':<20} {'score, 1 thread':>16} {'2 threads':>10}  {'time, 1 thread (SfM)':>21}  {'2 threads (SfM)':>16}")
    times: dict[int, list[float]] = {1: [], 2: []}
    identical = 0
    for name, video_set in sets.items():
        files = validity.build_files(video_set, args.cache)
        for k, kind in enumerate(args.kinds.split(",")):
            order = (1, 2) if (len(times[1]) + k) % 2 == 0 else (2, 1)
            runs = {workers: timed_score(files[kind], config, workers) for workers in order}
            for workers, (_, seconds, _) in runs.items():
                times[workers].append(seconds)
            identical += same(runs[1][0], runs[2][0])
            (one, t1, s1), (two, t2, s2) = runs[1], runs[2]
            print(f"  {name + ' ' + kind:<20} {one:>16.6f} {two:>10.6f}  {t1:>11.1f} s ({s1:4.1f} s)  {t2:>6.1f} s ({s2:4.1f} s)"
                  + ("" if same(one, two) else "  DIFFERENT"), flush=True)
    for workers in (1, 2):
        print(f"{workers} thread{'s' if workers > 1 else ''}: median {statistics.median(times[workers]):.1f} s, "
              f"worst {max(times[workers]):.1f} s per video over {len(times[workers])}")
    print(f"identical scores: {identical} of {len(times[1])}")


if __name__ == "__main__":
    main()
