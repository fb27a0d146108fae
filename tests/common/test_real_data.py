"""Real footage (../shared/data/real): registration holds, and geometric corruption raises the score."""

import pytest

from common.config import ScoreConfig
from common.scoring import score_video
from common.synthetic import corrupt_frames
from common.video import load_video

pytestmark = pytest.mark.real_data
CONFIG = ScoreConfig(max_side=480)


@pytest.mark.parametrize("name", ["statue", "kitchen"])
def test_real_sequence_registers_and_beats_its_corruption(shared_data, name):
    folder = shared_data / "real" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    clean = score_video(folder, CONFIG)
    assert clean.status == "ok", clean.reason
    assert clean.registered_frames == clean.frames, f"{clean.registered_frames} of {clean.frames} registered"
    frames = load_video(folder, max_side=CONFIG.max_side).frames
    corrupted = score_video(corrupt_frames(frames, "warp", seed=1), CONFIG)
    if corrupted.status == "ok":
        assert clean.score < corrupted.score, (clean.score, corrupted.score)
