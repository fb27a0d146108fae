"""Learned geometry backends: conversion to our camera convention, the hybrid backend end to end, errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from common.camera import intrinsics_from_fov, invert_rigid, look_at, project_points, rescale_intrinsics, unproject_depth
from common.config import ScoreConfig
from common.errors import ConfigError
from common.geometry import available_backends, create_backend
from common.geometry.hybrid import fit_scale
from common.geometry.learned import to_scene_geometry
from common.scoring import score_video
from common.synthetic import camera_path, make_scene, render, render_video

SIZE = (120, 160)


def _model_intrinsics(height: int, width: int, fov: float = 60.0) -> torch.Tensor:
    """What DA3 / VGGT report for a centred camera: principal point at (w/2, h/2), pixel centres at +0.5."""
    K = intrinsics_from_fov(height, width, fov).clone()
    K[0, 2] += 0.5
    K[1, 2] += 0.5
    return K


def test_rescaled_intrinsics_project_to_the_same_place_in_the_scored_frames():
    K_model = _model_intrinsics(84, 112)
    K = rescale_intrinsics(K_model, (84, 112), SIZE)
    assert torch.allclose(K, intrinsics_from_fov(*SIZE, 60.0), atol=1e-9)
    # A point seen at continuous model coordinate x (corner origin) is at x * W / w - 0.5 in ours.
    point = torch.tensor([[0.3, -0.2, 2.0]], dtype=torch.float64)
    uv_model, _ = project_points(point, K_model, torch.eye(4, dtype=torch.float64))
    uv, _ = project_points(point, K, torch.eye(4, dtype=torch.float64))
    assert torch.allclose(uv, uv_model * torch.tensor([160 / 112, 120 / 84], dtype=torch.float64) - 0.5)


@pytest.mark.parametrize("cam_to_world", [False, True])
def test_known_pose_comes_out_unchanged_in_our_convention(cam_to_world):
    scene = make_scene("boxes")
    world_to_cam = camera_path(scene, "orbit", 3)
    given = invert_rigid(world_to_cam) if cam_to_world else world_to_cam
    geometry = to_scene_geometry(
        torch.ones(3, 84, 112), None, given[:, :3, :].float(), _model_intrinsics(84, 112).expand(3, 3, 3), SIZE,
        cam_to_world=cam_to_world,
    )
    assert geometry.world_to_cam.shape == (3, 4, 4)
    assert torch.allclose(geometry.world_to_cam, world_to_cam, atol=1e-6)
    assert geometry.depth.shape == (3, *SIZE) and geometry.K.shape == (3, 3, 3)
    assert bool(geometry.registered.all())


def test_model_resolution_depth_lifts_to_the_true_scene():
    """Ground truth rendered at a model's resolution, converted at the edge, matches the scored frames' truth."""
    scene = make_scene("boxes")
    poses = camera_path(scene, "orbit", 2)
    small = render(scene, poses, intrinsics_from_fov(84, 112, 60.0), 84, 112)
    truth = render(scene, poses, intrinsics_from_fov(*SIZE, 60.0), *SIZE)
    conf = torch.rand(2, 84, 112) + 1.0
    geometry = to_scene_geometry(small.depth, conf, poses[:, :3, :], _model_intrinsics(84, 112).expand(2, 3, 3), SIZE)
    assert 0 <= float(geometry.confidence.min()) and float(geometry.confidence.max()) <= 1
    # World points of the converted geometry land where the true geometry puts them.
    ours = unproject_depth(geometry.depth, geometry.K, geometry.world_to_cam)
    true = unproject_depth(truth.depth, truth.K, truth.world_to_cam)
    keep = (geometry.depth > 0) & (truth.depth > 0)
    distance = (ours - true).norm(dim=-1)[keep] / truth.depth[keep]
    assert float(distance.median()) < 0.01


def test_fit_scale_recovers_depth_and_inverse_depth_predictions():
    video = render_video("boxes", "orbit", frames=2, size=SIZE)
    depth = video.depth[0].double()
    v, u = torch.nonzero(depth > 0, as_tuple=True)
    pick = torch.randperm(len(u), generator=torch.Generator().manual_seed(0))[:50]
    sfm_scale = 0.25  # SfM units: a quarter of the renderer's
    observations = np.column_stack([u[pick].numpy(), v[pick].numpy(), sfm_scale * depth[v[pick], u[pick]].numpy()])
    scale, used = fit_scale((3.0 * depth).float(), observations, is_depth=True)
    assert used == 50 and scale == pytest.approx(sfm_scale / 3.0, rel=1e-5)
    inverse = torch.where(depth > 0, 1.0 / (2.0 * depth.clamp(min=1e-9)), torch.zeros_like(depth)).float()
    scale, used = fit_scale(inverse, observations, is_depth=False)
    recovered = 1.0 / (scale * inverse[v[pick], u[pick]].double())
    assert torch.allclose(recovered, sfm_scale * depth[v[pick], u[pick]], rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    """A randomly initialised Depth Anything (transformers) saved like a downloaded model folder."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-depth-anything")
    backbone = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14,
        image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
    )
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(config)
    with torch.no_grad():
        model.head.conv3.bias.fill_(1.0)  # a positive output everywhere (the head ends in a ReLU)
    model.save_pretrained(folder)
    transformers.DPTImageProcessor(size={"height": 56, "width": 70}, keep_aspect_ratio=False, ensure_multiple_of=14).save_pretrained(folder)
    return folder


def test_hybrid_backend_scales_depth_to_the_sfm_points_and_keeps_sfm_cameras(tiny_depth_model):
    backend = create_backend("hybrid", tiny_depth_model)
    assert backend.name == "hybrid+depth_anything"
    video = render_video("boxes", "orbit", frames=12, size=SIZE)
    scored = [0, 4, 8, 11]
    cameras = backend.sfm.cameras(video.frames, scored)
    geometry = backend.combine(cameras, backend.predict(video.frames[scored]), scored)
    assert geometry.depth.shape == (4, *SIZE) and bool(geometry.registered.all())
    for t, i in enumerate(scored):
        assert torch.allclose(geometry.world_to_cam[t], cameras.poses[i])
        obs = cameras.observations[i]
        u, v = np.rint(obs[:, 0]).astype(int), np.rint(obs[:, 1]).astype(int)
        ratio = geometry.depth[t].numpy()[v, u] / obs[:, 2]
        assert np.median(ratio) == pytest.approx(1.0, rel=1e-3)  # median-ratio fit: in SfM units
    assert torch.allclose(geometry.K[0], torch.from_numpy(cameras.K))


def test_hybrid_backend_scores_end_to_end_with_its_name_in_metric_id(tiny_depth_model):
    video = render_video("boxes", "orbit", frames=12, size=SIZE)
    config = ScoreConfig(backend="hybrid", weights=tiny_depth_model, max_side=160, frames=6, recon_frames=12)
    result = score_video(video.frames, config)
    assert result.backend == "hybrid+depth_anything"
    assert result.metric_id.startswith("hybrid+depth_anything.r9/")  # its cameras are colmap-flow r9 (r4 changed the flow depth only)
    assert result.metric_id != config.metric_id("colmap-flow", result.perceptual_metric)
    assert result.registered_frames == 6
    assert result.status in ("ok", "unscorable")
    if result.status == "ok":
        assert np.isfinite(result.score) and result.score >= 0


def test_learned_backends_are_registered():
    assert {"colmap-flow", "hybrid", "da3", "vggt"} <= set(available_backends())


def test_missing_weights_say_what_to_download_and_where(tmp_path):
    with pytest.raises(ConfigError, match="Depth-Anything-V2.*--weights DIR"):
        create_backend("hybrid", None)
    with pytest.raises(ConfigError, match="config.json missing"):
        create_backend("hybrid", tmp_path)


@pytest.mark.parametrize("name, package, download", [("da3", "depth_anything_3", "DA3-LARGE"), ("vggt", "vggt", "VGGT-1B")])
def test_optional_backends_name_the_missing_package_or_weights(tmp_path, name, package, download):
    if importlib.util.find_spec(package) is None:
        with pytest.raises(ConfigError, match="pip install"):
            create_backend(name, tmp_path / "weights")
    else:
        with pytest.raises(ConfigError, match=download):
            create_backend(name, tmp_path / "missing")


def test_depth_anything_3_runs_and_converts_to_our_convention():
    """A randomly initialised DA3-small (configs ship in the package), fp32 on the CPU."""
    pytest.importorskip("depth_anything_3.api", reason="depth-anything-3 is optional (see docs/backends.md)")
    backend = create_backend("da3", "random:da3-small")
    backend.process_res = 168  # frames of 120x160 are processed at 126x168: intrinsics must be rescaled
    video = render_video("boxes", "orbit", frames=6, size=SIZE)
    geometry = backend.reconstruct(video.frames, [0, 2, 3, 5], list(range(6)))
    assert geometry.depth.shape == (4, *SIZE) and geometry.K.shape == (4, 3, 3)
    # DA3 puts a centred principal point at (w/2, h/2) of its resolution; ours is ((W-1)/2, (H-1)/2).
    assert torch.allclose(geometry.K[:, 0, 2], torch.full((4,), 79.5, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(geometry.K[:, 1, 2], torch.full((4,), 59.5, dtype=torch.float64), atol=1e-3)
    R = geometry.world_to_cam[:, :3, :3]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(4, 3, 3), atol=1e-4)
    assert torch.equal(geometry.world_to_cam[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(4, 4))
    assert 0 <= float(geometry.confidence.min()) and float(geometry.confidence.max()) <= 1
    result = score_video(video.frames, ScoreConfig(max_side=160, frames=4, recon_frames=6), backend=backend)
    assert result.backend == "da3" and result.metric_id.startswith("da3/") and result.registered_frames == 4


def test_relative_models_are_read_as_inverse_depth_and_metric_ones_as_depth():
    transformers = pytest.importorskip("transformers")
    from common.geometry.hybrid import predicts_depth

    assert not predicts_depth(transformers.DepthAnythingConfig())  # Depth Anything V2 "relative": disparity
    assert predicts_depth(transformers.DepthAnythingConfig(depth_estimation_type="metric"))
    assert not predicts_depth(transformers.DPTConfig())  # DPT / MiDaS: inverse depth
    assert predicts_depth(transformers.DepthProConfig())


def test_backend_options_reach_the_constructor_and_a_non_default_resolution_is_named():
    pytest.importorskip("depth_anything_3.api", reason="depth-anything-3 is optional (see docs/backends.md)")
    backend = create_backend("da3", "random:da3-small", process_res=56, device="cpu")
    assert backend.process_res == 56 and backend.name == "da3@56" and backend.thread_safe
    assert create_backend("da3", "random:da3-small").name == "da3"
    with pytest.raises(ConfigError, match="does not take these options"):
        create_backend("colmap-flow", None, process_res=56)
