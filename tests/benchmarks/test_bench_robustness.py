"""benchmarks/bench_robustness.py's edits of a clip (the scoring of what they add is tested in
tests/common; the benchmark itself takes minutes a set, so it is not run here)."""

from __future__ import annotations

import torch

# common before cv2: importing common sets OpenCV's pixel limit, which cv2 reads when it loads
# (tests/common/test_video.py checks it, and this module is collected first).
from common.synthetic import false_colour, render_video
from common.video import constant_borders, shot_cuts

import cv2  # noqa: E402

from tests.benchmarks.scripts import load_benchmark  # noqa: E402

bench = load_benchmark("bench_robustness")
ORBIT = render_video("boxes", "orbit", frames=20, size=(120, 160)).frames


def test_letterbox_adds_black_bars_of_an_eighth_that_the_scorer_finds():
    boxed = bench.letterboxed(ORBIT)
    assert boxed.shape == (20, 120 + 2 * 15, 160, 3) and torch.equal(boxed[:, 15:-15], ORBIT)
    assert constant_borders(boxed) == (17, 17, 0, 0)


def test_cut_replaces_the_last_30_percent_with_the_other_clip_cropped_to_the_smaller_size():
    other = false_colour(render_video("room", "truck", frames=30, size=(100, 180)).frames)
    cut = bench.cut_to(ORBIT, other)
    assert cut.shape == (20, 100, 160, 3)
    assert torch.equal(cut[:14], ORBIT[:14, :100]) and torch.equal(cut[14:], other[14:20, :, :160])
    assert shot_cuts(cut) == [14]


def test_zoom_starts_at_the_frame_and_ends_scaled_about_the_centre():
    zoom = bench.zoomed(ORBIT, end=2.0)
    assert zoom.shape == ORBIT.shape and torch.equal(zoom[0], ORBIT[0])
    # At 2x the last frame is its centre half, enlarged.
    centre = cv2.resize(ORBIT[-1, 30:90, 40:120].numpy(), (160, 120), interpolation=cv2.INTER_LINEAR)
    to_centre = float((zoom[-1].float() - torch.from_numpy(centre).float()).abs().mean())
    to_frame = float((zoom[-1].float() - ORBIT[-1].float()).abs().mean())
    assert to_centre < 6 and to_centre < 0.3 * to_frame, (to_centre, to_frame)
