"""Real footage (../shared/data): registration holds, corruption raises the score, movers are left out."""

import math

import pytest

from common.config import ScoreConfig
from common.scoring import score_video
from common.synthetic import corrupt_frames
from common.video import load_video, uniform_indices

pytestmark = pytest.mark.real_data
CONFIG = ScoreConfig(max_side=480)
PRIOR_FOV = math.degrees(2 * math.atan(1 / 2.4))  # COLMAP's prior focal, 1.2 x the long side: 45.2 degrees


def _frames(folder, count=None):
    frames = load_video(folder, max_side=CONFIG.max_side).frames
    return frames[uniform_indices(len(frames), count)] if count else frames


@pytest.mark.parametrize("name, count", [("statue", None), ("kitchen", None), ("statue", 8), ("kitchen", 8)],
                         ids=["statue", "kitchen", "statue-8-frames", "kitchen-8-frames"])
def test_real_sequence_registers_and_beats_its_corruption(shared_data, name, count):
    folder = shared_data / "real" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    frames = _frames(folder, count)
    clean = score_video(frames, CONFIG)
    assert clean.status == "ok", clean.reason
    assert clean.registered_frames >= 0.7 * clean.frames, f"{clean.registered_frames} of {clean.frames} registered"
    if name == "statue":  # a real camera's focal, far from the prior's 45 degrees: the matches demand it (FocalRule)
        assert abs(clean.fov_deg - PRIOR_FOV) > 5, clean.fov_deg
    if name == "kitchen":  # wide baselines: the fast SfM pass matches little, a second pass registers it
        # 8 frames of an orbit, views about 45 degrees apart: affine-covariant SIFT, plane-sweep depth
        assert f"geometry.sfm_{'sparse' if count else 'dense'}" in clean.timings_s, clean.timings_s
    corrupted = score_video(corrupt_frames(frames, "warp", seed=1, amplitude_px=8.0), CONFIG)
    if corrupted.status == "ok":
        assert clean.score < corrupted.score, (clean.score, corrupted.score)


@pytest.mark.parametrize("name", ["bear", "backpack"])
def test_real_video_with_a_moving_subject_is_scored_and_beats_its_corruption(shared_data, name):
    """Scored, not unscorable; what was found moving is reported. (The bear walks along the
    panning camera's epipolar lines, where no two-view test can tell motion from depth, so its
    moving fraction may be 0: see docs/backends.md.)"""
    path = shared_data / "real-dynamic" / f"{name}.mp4"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    frames = load_video(path, wanted=lambda total: uniform_indices(total, 32), max_side=CONFIG.max_side).frames
    clean = score_video(frames, CONFIG)
    assert clean.status == "ok", clean.reason
    assert clean.moving_fraction is not None and clean.moving_fraction < CONFIG.max_moving_fraction
    corrupted = score_video(corrupt_frames(frames, "warp", seed=1, amplitude_px=8.0), CONFIG)
    if corrupted.status == "ok":
        assert clean.score < corrupted.score, (clean.score, corrupted.score)


def test_a_drift_is_judged_with_the_clean_clips_camera(shared_data):
    """The mirrored bear clip, a pan whose focal length the matches barely constrain, and its 6 px
    drift. Bundle adjustment let the drifted copy's focal follow the drift (to a 30.5 degree field
    of view, just inside the old 30 degree gate) and it scored 10% better than the clean clip. A
    self-calibrated focal is now kept only where the matches demand it (`FocalRule`): both copies
    get the prior's, and the drift ranks worse."""
    path = shared_data / "real-dynamic" / "bear.mp4"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    frames = load_video(path, wanted=lambda total: uniform_indices(total, 49), max_side=720).frames.flip(2).contiguous()
    clean = score_video(frames, ScoreConfig())
    drift = score_video(corrupt_frames(frames, "drift", seed=1, amplitude_px=6.0), ScoreConfig())
    assert clean.fov_deg == pytest.approx(PRIOR_FOV, abs=0.5) and drift.fov_deg == pytest.approx(PRIOR_FOV, abs=0.5)
    assert clean.score < drift.score, (clean.score, drift.score)
