"""A camera that turns in place (a tripod pan): no parallax, so no structure-from-motion, yet a 3D
interpretation; the scorer fits it from the flow and judges the video by it."""

import math

import numpy as np
import pytest
import torch

from common.config import ScoreConfig
from common.geometry.colmap_flow import ColmapFlowBackend
from common.geometry.turning import PairFlow, fit_turning, transfer
from common.scoring import score_video
from common.synthetic import corrupt_frames, render_video

SIZE = (240, 360)  # at 180 x 240 SfM "registers" the pan, with cameras that move (docs/backends.md)
CONFIG = ScoreConfig(max_side=360)


def _yaw(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]])


def _pairs(K, rotations, translations, strides=(1, 2, 3), seed=0):
    """Flow correspondences of random points at depths 2-6 seen by cameras (R, t) (world-to-camera)."""
    rng = np.random.default_rng(seed)
    height, width = 240, 360
    pairs = []
    for stride in strides:
        for i in range(len(rotations) - stride):
            j = i + stride
            pixels = rng.uniform([0, 0], [width - 1, height - 1], size=(400, 2))
            depth = rng.uniform(2.0, 6.0, size=(400, 1))
            camera_i = np.c_[pixels, np.ones(400)] @ np.linalg.inv(K).T * depth
            world = (camera_i - translations[i]) @ rotations[i]  # R^T (x - t), row-wise
            camera_j = world @ rotations[j].T + translations[j]
            projected = camera_j @ K.T
            pairs.append(PairFlow(i, j, pixels, projected[:, :2] / projected[:, 2:3]))
    return pairs


def test_a_turning_camera_is_recovered_from_its_flow_and_parallax_is_not_taken_for_one():
    K = np.array([[300.0, 0.0, 179.5], [0.0, 300.0, 119.5], [0.0, 0.0, 1.0]])
    rotations = [_yaw(3.0 * k) for k in range(8)]
    still = [np.zeros(3)] * 8
    fit = fit_turning(_pairs(K, rotations, still), list(range(8)), (240, 360), prior_focal=432.0, fundamental_miss={})
    assert fit is not None and sorted(fit.rotations) == list(range(8))
    assert fit.K[0, 0] == pytest.approx(300.0, rel=0.01)
    relative = fit.rotations[7] @ fit.rotations[0].T
    assert math.degrees(math.acos((np.trace(relative) - 1) / 2)) == pytest.approx(21.0, abs=0.2)
    assert fit.residual_px < 0.5 and fit.explains(floor_px=0.5, ratio=3.0)
    # Its homography takes frame 0's pixels to frame 7's like the true rotation does.
    points = np.array([[10.0, 20.0], [180.0, 120.0], [350.0, 230.0]])
    truth = transfer(K @ rotations[7] @ np.linalg.inv(K), points)
    assert np.abs(transfer(fit.homography(0, 7), points) - truth).max() < 2.0

    # The same turns while the camera also slides sideways: parallax that a fundamental matrix
    # explains (miss ~0) and no rotation can.
    sliding = [np.array([0.05 * k, 0.0, 0.0]) for k in range(8)]
    pairs = _pairs(K, rotations, sliding)
    moved = fit_turning(pairs, list(range(8)), (240, 360), prior_focal=432.0,
                        fundamental_miss={(p.i, p.j): 0.05 for p in pairs if p.j == p.i + 1})
    assert moved is not None and moved.residual_px > 10 * moved.epipolar_px and not moved.explains(floor_px=0.5, ratio=3.0)


def test_a_chain_broken_by_missing_flow_keeps_its_longest_run():
    K = np.array([[300.0, 0.0, 179.5], [0.0, 300.0, 119.5], [0.0, 0.0, 1.0]])
    rotations = [_yaw(2.0 * k) for k in range(6)]
    pairs = [p for p in _pairs(K, rotations, [np.zeros(3)] * 6, strides=(1,)) if (p.i, p.j) != (1, 2)]
    fit = fit_turning(pairs, list(range(6)), (240, 360), prior_focal=432.0, fundamental_miss={})
    assert sorted(fit.rotations) == [2, 3, 4, 5]
    assert fit_turning([], list(range(6)), (240, 360), prior_focal=432.0, fundamental_miss={}) is None


@pytest.fixture(scope="module")
def pan():
    """A 16-frame tripod pan of the boxes (16 degrees in place) and its 6 px drifted copy."""
    clean = render_video("boxes", "pan", frames=16, size=SIZE).frames
    return clean, corrupt_frames(clean, "drift", amplitude_px=6.0)


def test_a_tripod_pan_is_scored_by_its_rotation_and_ranks_above_its_drift(pan):
    clean, drifted = pan
    result = score_video(clean, CONFIG)
    assert result.status == "ok", result.reason
    assert result.registered_frames == result.frames == 10
    assert result.fov_deg == pytest.approx(60.0, abs=6.0)  # the renderer's field of view
    assert "geometry.turning" in result.timings_s
    assert result.moving_fraction == 0.0 and result.turning_in_place
    worse = score_video(drifted, CONFIG)
    assert worse.status == "ok", worse.reason
    assert worse.score > 1.5 * result.score
    # Without the turning model the same pan has no 3D interpretation at all.
    refused = score_video(clean, CONFIG, backend=ColmapFlowBackend(turning=False))
    assert refused.status == "unscorable" and "no consistent cameras" in refused.reason
    assert "turning" not in refused.reason


def test_frames_that_neither_sfm_nor_a_turning_camera_explain_are_unscorable_and_say_so():
    """Independent textured frames: flow with no consistent motion, no cameras of either kind."""
    generator = np.random.default_rng(0)
    noise = generator.integers(0, 256, size=(16, SIZE[0] // 8, SIZE[1] // 8, 3), dtype=np.uint8)
    frames = np.stack([np.kron(f, np.ones((8, 8, 1), dtype=np.uint8)) for f in noise])  # blocky texture
    result = score_video(torch.from_numpy(frames), CONFIG)
    assert result.status == "unscorable"
    assert "a camera turning in place does not explain the flow either" in result.reason, result.reason


def test_a_pan_that_sfm_also_registers_is_judged_by_the_better_interpretation():
    """At 180 x 240 SfM "registers" the pan with cameras that travel and the prior's focal; the turning
    camera reprojects it better and is kept. A camera that travels keeps its SfM cameras."""
    small = ScoreConfig(max_side=240)
    pan = render_video("boxes", "pan", frames=16, size=(180, 240)).frames
    sfm_only = score_video(pan, small, backend=ColmapFlowBackend(turning=False))
    both = score_video(pan, small)
    assert sfm_only.status == both.status == "ok"
    assert not sfm_only.turning_in_place and both.turning_in_place
    assert both.score < sfm_only.score
    assert both.fov_deg == pytest.approx(60.0, abs=6.0) and abs(sfm_only.fov_deg - 60.0) > 10.0
    travelling = score_video(render_video("room", "truck", frames=12, size=(180, 240)).frames, small)
    assert travelling.status == "ok" and not travelling.turning_in_place
