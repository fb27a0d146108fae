"""Frames the backend leaves without a camera are posed from their neighbours and compared (common.posing)."""

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from clients.commands.score import format_result
from common.config import ScoreConfig
from common.geometry.oracle import OracleBackend
from common.posing import fit_pose, interpolate_pose, neighbour_poses, refine_pose, step_px
from common.scoring import score_video
from common.synthetic import cross_fade, render_video
from common.video import load_video, uniform_indices

SIZE = (180, 240)
CONFIG = ScoreConfig(max_side=240)


def _pose(yaw: float, centre) -> np.ndarray:
    """World-to-camera (4, 4) of a camera turned `yaw` radians about +y, at `centre`."""
    c, s = math.cos(yaw), math.sin(yaw)
    R = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R, -R @ np.asarray(centre, dtype=float)
    return pose


def test_interpolate_pose_follows_a_camera_of_constant_velocity_between_and_beyond_known_poses():
    truth = {t: _pose(0.02 * t, [0.1 * t, -0.03 * t, 0.05 * t]) for t in range(12)}
    known = [0, 4, 8]
    poses = torch.from_numpy(np.stack([truth[t] for t in known]))
    for at in (2, 5, 7, 10, 11):  # between two known poses, and beyond the last
        np.testing.assert_allclose(interpolate_pose(known, poses, at).numpy(), truth[at], atol=1e-9)
    with pytest.raises(ValueError, match="two known poses"):
        interpolate_pose([0], poses[:1], 1)


def test_a_pose_is_fitted_to_tracked_points_despite_outliers_and_a_start_far_off():
    rng = np.random.default_rng(0)
    K = np.array([[300.0, 0, 160], [0, 300, 120], [0, 0, 1]])
    points = rng.uniform([-2, -1.5, 4], [2, 1.5, 8], size=(600, 3))
    true = _pose(0.1, [0.3, 0.05, -0.2])
    pixels, _ = cv2.projectPoints(points, cv2.Rodrigues(true[:3, :3])[0], true[:3, 3], K, None)
    pixels = pixels[:, 0]
    pixels[:180] += rng.uniform(-60, 60, size=(180, 2))  # 30% of the tracks went astray
    near = _pose(0.13, [0.25, 0.05, -0.1])  # an interpolated start, a few pixels off
    refined, agreeing = refine_pose(points, pixels, K, near, long_side=320)
    np.testing.assert_allclose(refined, true, atol=1e-4)  # outliers that land within 6 px pull a little
    assert agreeing >= 420
    far = _pose(0.6, [1.5, 0.0, 0.5])  # beyond the reach of the shrinking tolerances: RANSAC finds it
    np.testing.assert_allclose(fit_pose(points, pixels, K, far, long_side=320), true, atol=1e-4)
    assert np.abs(refine_pose(points, pixels, K, far, long_side=320)[0] - true).max() > 0.1


class _Unregistered(OracleBackend):
    """The oracle, with some scored frames left without a camera: a backend that failed to register them."""

    def __init__(self, video, positions: list[int]) -> None:
        super().__init__(video.depth, video.K, video.world_to_cam)
        self.positions = positions

    def reconstruct(self, frames, scored, video_indices):
        geometry = super().reconstruct(frames, scored, video_indices)
        registered, depth, world_to_cam = geometry.registered.clone(), geometry.depth.clone(), geometry.world_to_cam.clone()
        registered[self.positions] = False
        depth[self.positions] = 0
        world_to_cam[self.positions] = torch.eye(4, dtype=world_to_cam.dtype)
        return replace(geometry, registered=registered, depth=depth, world_to_cam=world_to_cam)


def test_a_frame_without_a_camera_is_posed_from_its_neighbours_and_scores_as_if_registered():
    video = render_video("boxes", "orbit", frames=24, size=SIZE)
    registered = score_video(video.frames, CONFIG, backend=OracleBackend.from_render(video))
    posed = score_video(video.frames, CONFIG, backend=_Unregistered(video, [4, 9]))
    assert posed.status == "ok" and posed.registered_frames == 8 and posed.failed_frames == []
    rows = {row.index: row for row in posed.per_frame}
    # The middle frame as if registered; the last, beyond its last neighbour, within a few hundredths
    # (at this size, the flow to its one neighbour 5 frames away is off by a fraction of a pixel).
    for t, tolerance in ((4, 0.005), (9, 0.04)):
        row, reference = rows[posed.frame_indices[t]], registered.per_frame[t]
        assert row.posed_from_neighbours and not row.registered and row.ok
        assert row.mse + row.perceptual == pytest.approx(reference.mse + reference.perceptual, abs=tolerance)
    assert posed.score == pytest.approx(registered.score, rel=0.1)
    assert score_video(video.frames, CONFIG, backend=_Unregistered(video, [4, 9])).score == posed.score  # no random sampling
    assert "/posed=0.25" in posed.metric_id
    table = format_result("clip", posed.to_json_dict())
    assert "8 registered, 2 posed from neighbours" in table and "yes (posed from neighbours)" in table


def test_frames_that_morph_into_another_scene_cost_what_they_cost_instead_of_nothing():
    video = render_video("boxes", "orbit", frames=24, size=SIZE)
    other = render_video("room", "truck", frames=24, size=SIZE)
    morphed = video.frames.clone()
    morphed[19:] = other.frames[19:]  # the last scored frames (20 and 23, positions 8 and 9) show another scene
    backend = _Unregistered(video, [8, 9])  # ... and the backend registers none of them
    clean = score_video(video.frames, CONFIG, backend=OracleBackend.from_render(video))
    left_out = score_video(morphed, CONFIG.model_copy(update={"pose_from_neighbours": False}), backend=backend)
    posed = score_video(morphed, CONFIG, backend=backend)
    assert left_out.failed_frames == [video_index for video_index in left_out.frame_indices[8:]]
    assert left_out.score < 1.2 * clean.score  # the hole: left out, the other scene cost nothing
    assert posed.failed_frames == [] and posed.score > 3 * clean.score, (clean.score, posed.score)


def test_frames_are_posed_only_where_the_camera_moves_less_than_max_step_between_scored_frames():
    video = render_video("boxes", "orbit", frames=24, size=SIZE)
    every_other = list(range(0, 24, 2))
    geometry = OracleBackend.from_render(video).reconstruct(video.frames, every_other, list(range(24)))
    depth = float(geometry.depth[geometry.depth > 0].median())
    step = float(step_px(geometry.world_to_cam, geometry.K, depth).median())  # pixels per interval of scored frames
    registered = torch.ones(len(every_other), dtype=torch.bool)
    registered[[3, 4]] = False  # a gap twice as wide around them is not a faster camera
    args = (video.frames[every_other], geometry.depth, geometry.depth > 0, geometry.K, geometry.world_to_cam, registered,
            every_other, [3, 4])
    assert set(neighbour_poses(*args, max_step=1.1 * step, typical_depth=depth)) == {3, 4}
    assert neighbour_poses(*args, max_step=0.9 * step, typical_depth=depth) == {}


def test_real_footage_that_morphs_into_another_clip_scores_worse_than_the_clip(shared_data):
    """A hand-held clip (backpack) whose last 30% cross-fades into another (bear): the default
    backend registers none of the last frames. Left out, the clip scored within 2% of the clean one."""
    def frames_of(name: str) -> torch.Tensor:
        video = load_video(shared_data / "real-dynamic" / f"{name}.mp4", max_side=720)
        return video.frames[uniform_indices(len(video.frames), 49)]

    clip = frames_of("backpack")
    morphed = cross_fade(clip, frames_of("bear"), start=0.7)
    clean = score_video(clip)
    left_out = score_video(morphed, ScoreConfig(pose_from_neighbours=False))
    posed = score_video(morphed)
    assert clean.status == left_out.status == posed.status == "ok"
    assert not any(row.posed_from_neighbours for row in clean.per_frame)
    assert left_out.failed_frames and left_out.score < 1.05 * clean.score
    assert posed.failed_frames == [] and {r.index for r in posed.per_frame if r.posed_from_neighbours} == set(left_out.failed_frames)
    assert posed.score > 1.15 * clean.score, (clean.score, left_out.score, posed.score)


def test_cross_fade_keeps_the_first_70_percent_and_ends_on_the_other_clip():
    clip = render_video("boxes", "orbit", frames=20, size=(60, 80)).frames
    other = render_video("room", "truck", frames=10, size=(90, 120)).frames
    faded = cross_fade(clip, other, start=0.7)
    assert faded.shape == clip.shape and faded.dtype == torch.uint8
    assert torch.equal(faded[:14], clip[:14])
    ending = torch.nn.functional.interpolate(other[-1:].permute(0, 3, 1, 2).float(), size=(60, 80), mode="bilinear")
    assert float((faded[-1].float() - ending[0].permute(1, 2, 0)).abs().max()) <= 0.5 + 1e-4  # other[19 % 10] = other[9]
