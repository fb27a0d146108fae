"""benchmarks/bench_sfm_threads.py's parts (the benchmark itself scores 44 videos, so it is not run here)."""

from __future__ import annotations

import math

import common.geometry.colmap_flow as colmap_flow
from common.config import ScoreConfig
from common.synthetic import render_video
from common.video import write_video
from tests.benchmarks.scripts import load_benchmark

bench = load_benchmark("bench_sfm_threads")


def test_unscorable_both_times_counts_as_the_same_score():
    assert bench.same(0.25, 0.25) and bench.same(math.nan, math.nan)
    assert not bench.same(0.25, 0.2500001) and not bench.same(0.25, math.nan)


def test_one_worker_and_two_score_a_video_alike_and_the_default_comes_back(tmp_path):
    default = colmap_flow.cpu_workers
    path = write_video(tmp_path / "truck.mp4", render_video("room", "truck", frames=12, size=(120, 160)).frames, fps=8)
    config = ScoreConfig(frames=6)
    (one, seconds, sfm), (two, _, _) = bench.timed_score(path, config, 1), bench.timed_score(path, config, 2)
    assert one == two and not math.isnan(one)
    assert seconds > sfm > 0
    assert colmap_flow.cpu_workers is default
