"""benchmarks/bench_copies.py's copies of a clip (the benchmark itself scores 72 videos, so it is not run here)."""

from __future__ import annotations

import pytest
import torch

# common before cv2 (see test_bench_robustness.py).
from common.synthetic import render_video
from tests.benchmarks.scripts import load_benchmark

bench = load_benchmark("bench_copies")
ORBIT = render_video("boxes", "orbit", frames=6, size=(120, 160)).frames  # (6, 120, 160, 3) landscape


def test_mirrored_and_backwards_are_the_same_pictures_rearranged():
    assert torch.equal(bench.mirrored(ORBIT)[2, :, 0], ORBIT[2, :, -1])
    assert torch.equal(bench.backwards(ORBIT)[0], ORBIT[-1]) and torch.equal(bench.backwards(bench.backwards(ORBIT)), ORBIT)


@pytest.mark.parametrize("frames, shape", [(ORBIT, (6, 120, 90, 3)), (ORBIT.transpose(1, 2), (6, 90, 120, 3))],
                         ids=["landscape-to-portrait", "portrait-to-landscape"])
def test_crop_cuts_the_long_side_to_three_quarters_of_the_short_one_about_the_centre(frames, shape):
    crop = bench.centre_crop(frames)
    assert crop.shape == shape
    if frames.shape[2] > frames.shape[1]:
        assert torch.equal(crop, frames[:, :, 35:125])
    else:
        assert torch.equal(crop, frames[:, 35:125])


def test_resized_keeps_the_aspect_and_the_copies_report_their_scale():
    big, scale = bench.COPIES["1360 px"](ORBIT)
    assert big.shape == (6, 1020, 1360, 3) and big.dtype == torch.uint8 and scale == pytest.approx(1360 / 160)
    small, scale = bench.COPIES["360 px"](ORBIT)
    assert small.shape == (6, 270, 360, 3) and scale == pytest.approx(360 / 160)
    # Same picture: the upscaled copy brought back to the original size is close to it.
    back = bench.resized(big, 160)
    assert back.shape == ORBIT.shape and float((back.float() - ORBIT.float()).abs().mean()) < 4
    assert all(bench.COPIES[name](ORBIT)[1] == 1.0 for name in ("original", "mirrored", "backwards", "crop 3:4"))
