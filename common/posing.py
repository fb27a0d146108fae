"""Cameras for scored frames that the geometry backend left without one, from their neighbours in time.

A frame that does not register (or registers where nothing reprojects into it) used to be left
out of the score. In a video that is a hole in the reward: a generated clip that morphs into
another scene in its last third has its last frames fail, and the rest scored as well as a
consistent clip (measured: docs/backends.md, "Frames that fail to register"). In a video the
camera of a frame is known well from the frames around it, so the frame is posed from them and
compared like any other: a frame that fits the scene scores about as if it had registered, and a
frame that does not fit scores what it costs.

Two steps, in the convention of `common.camera` (OpenCV world-to-camera, pixels of the scored frames):
1. `interpolate_pose`: between the registered frames nearest in time on each side (rotation on the
   geodesic, centre on the straight line), or at constant velocity beyond the last one.
2. `refine_pose`: the pose that best maps the 3D points of the nearest registered frames to where
   dense optical flow finds them in the frame (Levenberg-Marquardt from the interpolated pose, over
   the points within a shrinking pixel tolerance: no random sampling, so the same input gives the same pose).

Only where the registered cameras move little between neighbouring scored frames
(`step_px`): in a sparse capture, frames 10-45 degrees apart, a neighbour's pose says little, and
a frame that did not register stays out as before.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from common.camera import as_4x4, camera_centers, rotation_angle, unproject_depth

# Flow for the refinement is computed with the long side at most this (px): enough for a pose; posing
# two frames of a 720 px clip (flow, RANSAC and fits) takes about 80 ms.
_FLOW_SIDE = 360
# Pixel tolerances (at 720 px on the long side) of the refinement rounds: the interpolated pose of
# a hand-held camera is off by up to ~30 px (leave-one-out on the shared real clips), a refined one by ~1-2.
_TOLERANCES_720 = (48.0, 16.0, 6.0, 3.0)
_MIN_POINTS = 50
_MAX_POINTS = 6000


def interpolate_pose(times: Sequence[float], world_to_cam: Tensor, at: float) -> Tensor:
    """The pose at time `at` from poses at increasing `times`.

    Args:
        times: (n,) increasing times (frame indices) of the known poses, n >= 2.
        world_to_cam: (n, 4, 4) their poses.
        at: the time wanted (not one of `times`).

    Returns:
        (4, 4) float64 world-to-camera: between the nearest known pose on each side, the rotation
        turned by the fraction of the time on the geodesic and the centre moved on the straight line;
        outside `times`, continued at the velocity of the two nearest poses.
    """
    if len(times) < 2:
        raise ValueError("interpolate_pose needs at least two known poses")
    times = np.asarray(times, dtype=np.float64)
    poses = as_4x4(world_to_cam).double().cpu().numpy()
    after = int(np.searchsorted(times, at))
    a, b = (after - 1, after) if 0 < after < len(times) else ((0, 1) if after == 0 else (len(times) - 2, len(times) - 1))
    fraction = (at - times[a]) / (times[b] - times[a])
    Ra, Rb = poses[a, :3, :3], poses[b, :3, :3]
    turn, _ = cv2.Rodrigues(Rb @ Ra.T)
    R = cv2.Rodrigues(turn * fraction)[0] @ Ra
    centres = camera_centers(torch.from_numpy(poses[[a, b]])).numpy()
    centre = centres[0] + fraction * (centres[1] - centres[0])
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R, -R @ centre
    return torch.from_numpy(pose)


def step_px(world_to_cam: Tensor, K: Tensor, depth: float) -> Tensor:
    """(n - 1,) how far the image moves between consecutive cameras, in pixels: the focal length
    times (rotation angle + centre distance / `depth`), an upper bound for points at `depth`.

    world_to_cam: (n, 4, 4); K: (n, 3, 3); depth: a typical scene depth (the median).
    """
    poses = as_4x4(world_to_cam).double()
    turn = rotation_angle(poses[1:, :3, :3] @ poses[:-1, :3, :3].transpose(-1, -2))
    centres = camera_centers(poses)
    moved = (centres[1:] - centres[:-1]).norm(dim=-1) / max(depth, 1e-12)
    focal = K[:-1, 0, 0].double()
    return focal * (turn + moved)


def refine_pose(points: np.ndarray, pixels: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray, long_side: int) -> tuple[np.ndarray, int]:
    """The pose that maps world `points` (n, 3) nearest to their observed `pixels` (n, 2).

    Levenberg-Marquardt (OpenCV's solvePnPRefineLM) from `world_to_cam` (4, 4), over the points
    within a tolerance of their observation, in rounds of shrinking tolerance (48, 16, 6, 3 px at 720
    px on the long side). Returns (the pose, points within the last tolerance); the pose it was given
    where fewer than 50 points agree with it.
    """
    pose = world_to_cam.astype(np.float64).copy()
    points, pixels = points.astype(np.float64), pixels.astype(np.float64)
    camera = K.astype(np.float64)
    kept = 0
    for tolerance in _TOLERANCES_720:
        tolerance *= long_side / 720
        rvec, _ = cv2.Rodrigues(pose[:3, :3])
        tvec = pose[:3, 3:].copy()
        projected, _ = cv2.projectPoints(points, rvec, tvec, camera, None)
        in_front = (points @ pose[:3, :3].T + pose[:3, 3])[:, 2] > 0
        close = in_front & (np.linalg.norm(projected[:, 0] - pixels, axis=1) < tolerance)
        if int(close.sum()) < _MIN_POINTS:
            break
        rvec, tvec = cv2.solvePnPRefineLM(points[close], pixels[close], camera, None, rvec, tvec)
        pose[:3, :3], pose[:3, 3] = cv2.Rodrigues(rvec)[0], tvec[:, 0]
        kept = int(close.sum())
    return pose, kept


def fit_pose(points: np.ndarray, pixels: np.ndarray, K: np.ndarray, start: np.ndarray, long_side: int) -> np.ndarray:
    """The pose (4, 4) under which most world `points` (n, 3) land within 3 px (at 720 px on the long
    side) of their observed `pixels` (n, 2): `refine_pose` from `start`, or from a RANSAC fit of all the
    points (OpenCV's solvePnPRansac, SQPnP, whose sampling is seeded the same in every call), which
    finds the camera where `start` is too far off (a fast hand-held camera beyond its last neighbour)."""
    candidates = [refine_pose(points, pixels, K, start, long_side)]
    found, rvec, tvec, inliers = cv2.solvePnPRansac(
        points, pixels, K, None, iterationsCount=200, reprojectionError=_TOLERANCES_720[-1] * long_side / 720,
        confidence=0.999, flags=cv2.SOLVEPNP_SQPNP,
    )
    if found and inliers is not None and len(inliers) >= _MIN_POINTS:
        fitted = np.eye(4)
        fitted[:3, :3], fitted[:3, 3] = cv2.Rodrigues(rvec)[0], tvec[:, 0]
        candidates.append(refine_pose(points, pixels, K, fitted, long_side))
    pose, _ = max(candidates, key=lambda candidate: candidate[1])  # the first on a tie
    return pose


def neighbour_poses(
    frames: Tensor,
    depth: Tensor,
    usable: Tensor,
    K: Tensor,
    world_to_cam: Tensor,
    registered: Tensor,
    times: Sequence[int],
    wanted: Sequence[int],
    max_step: float,
    typical_depth: float,
) -> dict[int, Tensor]:
    """Poses for the `wanted` positions, from the registered frames around them.

    Args:
        frames: (T, H, W, 3) uint8 scored frames. depth: (T, H, W) camera z; usable: (T, H, W) bool,
            the pixels whose depth may be trusted (confident, static, not an overlay).
        K: (T, 3, 3); world_to_cam: (T, 4, 4); registered: (T,) bool; times: (T,) frame indices.
        wanted: positions (into the T frames) to pose.
        max_step: the most the image may move between neighbouring scored frames (the median
            `step_px` of the registered ones, per interval of scored frames; pixels); a faster (or
            sparser) camera gets no poses.
        typical_depth: the scene's median depth, for `step_px`.

    Returns:
        position -> (4, 4) float64 world-to-camera; empty where the camera moves too far between frames.
    """
    known = [k for k in registered.nonzero().squeeze(1).tolist() if k not in wanted]  # a wanted frame's own camera is not trusted
    if len(known) < 2 or not wanted:
        return {}
    poses = as_4x4(world_to_cam).double()
    # Per interval between scored frames: a frame that failed leaves a wider gap, not a faster camera.
    gaps = torch.tensor(np.diff([times[k] for k in known]), dtype=torch.float64)
    spacing = float(np.median(np.diff(times)))
    if float((step_px(poses[known], K[known], typical_depth) / gaps).median()) * spacing > max_step:
        return {}
    T, H, W, _ = frames.shape
    scale = min(1.0, _FLOW_SIDE / max(H, W))
    size = (max(8, round(W * scale)), max(8, round(H * scale)))
    gray = [cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for frame in frames.numpy()]
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    world: dict[int, Tensor] = {}  # (H, W, 3) world points of a source frame, lifted when first needed
    found = {}
    for t in wanted:
        start = interpolate_pose([times[k] for k in known], poses[known], times[t]).numpy()
        before = [k for k in known if times[k] < times[t]]
        after = [k for k in known if times[k] > times[t]]
        nearest = before[-1:] + after[:1]  # the nearest registered frame on each side (its flow is the most exact)
        points, pixels = [], []
        for s in nearest:
            if s not in world:
                world[s] = unproject_depth(depth[s:s + 1].double(), K[s:s + 1].double(), poses[s:s + 1])[0]
            got = _tracked_points(gray[s], gray[t], flow, world[s], usable[s], (W / size[0], H / size[1]))
            if got is not None:
                points.append(got[0])
                pixels.append(got[1])
        pose = start
        if points:
            pose = fit_pose(np.concatenate(points), np.concatenate(pixels), K[t].double().numpy(), start, max(H, W))
        found[t] = torch.from_numpy(pose)
    return found


def _tracked_points(
    source: np.ndarray, target: np.ndarray, dis, world: Tensor, usable: Tensor, scale: tuple[float, float]
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """World points of `source`'s usable pixels (on the flow's grid) and where the flow finds them in
    `target`, in full-resolution pixels; only where the flow there and back agrees to a pixel."""
    forward = dis.calc(source, target, None)
    backward = dis.calc(target, source, None)
    h, w = source.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    there = np.stack([x + forward[..., 0], y + forward[..., 1]], axis=-1)
    back = cv2.remap(backward, there[..., 0], there[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(1e4, 1e4))
    agrees = np.linalg.norm(forward + back, axis=-1) < 1.0
    inside = (there[..., 0] >= 0) & (there[..., 0] <= w - 1) & (there[..., 1] >= 0) & (there[..., 1] <= h - 1)
    sx, sy = scale
    H, W = usable.shape
    # Flow pixel (x, y) covers full-resolution pixel ((x + 0.5) * sx - 0.5, ...) (pixel centres at
    # integers): its point is taken at the nearest full-resolution pixel, moved by the flow there.
    u, v = (x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5
    col, row = np.clip(np.rint(u), 0, W - 1).astype(int), np.clip(np.rint(v), 0, H - 1).astype(int)
    keep = agrees & inside & usable.numpy()[row, col]
    # A regular grid of at most about _MAX_POINTS tracks: enough for six unknowns, and RANSAC's cost stays small.
    stride = max(1, math.ceil(math.sqrt(h * w / _MAX_POINTS)))
    on_grid = np.zeros_like(keep)
    on_grid[stride // 2::stride, stride // 2::stride] = True
    keep &= on_grid
    if int(keep.sum()) < _MIN_POINTS:
        return None
    points = world.numpy()[row[keep], col[keep]]
    pixels = np.stack([col[keep] + forward[..., 0][keep] * sx, row[keep] + forward[..., 1][keep] * sy], axis=-1)
    return points, pixels
