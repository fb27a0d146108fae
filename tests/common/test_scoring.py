"""The score on synthetic scenes with known geometry: oracle path, ordering clean < corrupted, verdicts."""

import json

import pytest
import torch

from common.config import ScoreConfig
from common.errors import ConfigError
from common.geometry.oracle import OracleBackend
from common.scoring import score_video
from common.synthetic import render_video

SIZE = (180, 240)
CONFIG = ScoreConfig(max_side=240)  # keep the rendered resolution
# Orbit and truck paths register reliably in the fast SfM pass; forward-only dolly paths need the
# thorough pass and are the hardest case for incremental SfM: they register less reliably.
SCENES = [("boxes", "orbit"), ("room", "truck")]


@pytest.fixture(scope="module")
def clean_scores():
    """Default-backend results of the clean videos, shared by the ordering tests."""
    return {scene: score_video(render_video(*scene, frames=24, size=SIZE).frames, CONFIG) for scene in SCENES}


def test_oracle_reprojects_clean_frames_with_near_zero_error(tmp_path):
    video = render_video("boxes", "orbit", frames=24, size=SIZE)
    result = score_video(video.frames, CONFIG, backend=OracleBackend.from_render(video), preview_dir=tmp_path)
    assert result.status == "ok" and result.backend == "oracle"
    assert result.mse < 0.003  # what is left is nearest-pixel resampling of the textures
    assert result.perceptual < 0.05
    assert result.coverage > 0.9
    assert len(result.per_frame) == 10 and all(row.ok for row in result.per_frame)
    assert len(result.previews) == 10
    assert all(p.endswith(".png") for p in result.previews)

    warped = render_video("boxes", "orbit", frames=24, size=SIZE, corruption="warp")
    corrupted = score_video(warped.frames, CONFIG, backend=OracleBackend.from_render(video))
    assert corrupted.score > 5 * result.score


@pytest.mark.parametrize("scene", SCENES, ids=lambda s: "-".join(s))
@pytest.mark.parametrize("corruption", ["warp", "drift", "deform"])
def test_clean_scores_lower_than_corrupted(clean_scores, scene, corruption):
    clean = clean_scores[scene]
    corrupted = score_video(render_video(*scene, frames=24, size=SIZE, corruption=corruption).frames, CONFIG)
    assert clean.status == "ok", clean.reason
    assert clean.registered_frames == clean.frames
    # An unscorable corrupted video is not a confident good score either; an ok one must be worse.
    if corrupted.status == "ok":
        assert clean.score < corrupted.score, (clean.score, corrupted.score)


def test_static_camera_is_unscorable():
    video = render_video("boxes", "static", frames=12, size=SIZE)
    result = score_video(video.frames, CONFIG)
    assert result.status == "unscorable"
    assert "static" in result.reason
    assert result.score is None


def test_result_carries_settings_and_is_json(clean_scores):
    result = clean_scores[SCENES[0]]
    data = json.loads(json.dumps(result.to_json_dict()))
    for key in ("status", "reason", "score", "mse", "perceptual", "perceptual_metric", "metric_id", "coverage",
                "motion", "backend", "frames", "per_frame", "timings_s"):
        assert key in data
    assert data["metric_id"] == "colmap-flow/dssim/lambda=1/T=10/side=240"
    assert data["score"] == pytest.approx(data["mse"] + data["lambda"] * data["perceptual"])
    assert data["frame_indices"][0] == 0 and data["frame_indices"][-1] == 23
    assert data["motion"] > 0.001


def test_lambda_and_frames_change_the_metric_id():
    video = render_video("boxes", "orbit", frames=12, size=SIZE)
    oracle = OracleBackend.from_render(video)
    a = score_video(video.frames, CONFIG, backend=oracle)
    b = score_video(video.frames, CONFIG.model_copy(update={"lambda_": 0.0, "frames": 6}), backend=oracle)
    assert a.metric_id != b.metric_id and b.frames == 6
    assert b.score == pytest.approx(b.mse)


def test_lpips_runs_from_a_local_backbone_file_and_is_named(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    features = {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    weights = tmp_path / "vgg16.pth"
    torch.save(features, weights)
    video = render_video("boxes", "orbit", frames=6, size=(60, 80))
    config = ScoreConfig(max_side=80, frames=3, perceptual="lpips-vgg", lpips_weights=weights)
    result = score_video(video.frames, config, backend=OracleBackend.from_render(video))
    assert result.perceptual_metric == "lpips-vgg" and "/lpips-vgg/" in result.metric_id
    assert result.perceptual is not None and result.perceptual >= 0


def test_missing_lpips_weights_are_a_clear_error(tmp_path):
    video = render_video("boxes", "orbit", frames=4, size=(60, 80))
    config = ScoreConfig(max_side=80, perceptual="lpips-alex", lpips_weights=tmp_path / "nowhere.pth")
    with pytest.raises(ConfigError, match="alexnet-owt-7be5be79.pth|nowhere.pth"):
        score_video(video.frames, config, backend=OracleBackend.from_render(video))
