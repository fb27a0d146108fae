"""The default, weight-free backend: pycolmap structure-from-motion + depth from triangulated optical flow.

1. Cameras: SIFT features, sequential matching (with quadratic overlap for longer-range pairs)
   and incremental mapping over a dense subset of the video, one shared pinhole camera. When the
   fast settings leave a scored frame unregistered, a thorough pass (finer SIFT, more features,
   exhaustive matching) runs once.
2. Depth: dense DIS optical flow from each scored frame to two registered neighbours (one on
   each side in time, far enough for a usable triangulation angle), triangulated with the
   recovered cameras. A pixel's depth from one neighbour is kept when it passes a
   forward-backward flow check, lies in front of both cameras and has at least
   `min_angle_deg` of triangulation angle; estimates are fused by their median, and the
   confidence is the fraction of neighbours that gave one.

COLMAP's cameras are OpenCV cameras with world-to-camera `cam_from_world`, the convention of
`common.camera`; intrinsics are in pixels of the frames as written (the scored frames), with the
principal point shifted by half a pixel (COLMAP's pixel centres are at +0.5).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2  # must be imported before pycolmap: both bundle libpng, and the other order crashes cv2.imwrite
import numpy as np
import pycolmap
import torch
from torch import Tensor

from common.camera import camera_centers
from common.geometry.base import GeometryBackend, ReconstructionFailed, SceneGeometry
from common.video import uniform_indices

pycolmap.logging.minloglevel = 2  # errors only: COLMAP's INFO lines would drown the CLI's output


@dataclass(frozen=True)
class SfmSettings:
    first_octave: int | None  # -1 upsamples first: many more features, 4x slower; None: -1 for small frames
    max_features: int
    exhaustive: bool
    overlap: int = 10
    camera_model: str = "SIMPLE_PINHOLE"  # SIMPLE_RADIAL also fits the lens distortion of real cameras
    min_pose_inliers: int = 30  # 2D-3D inliers needed to register a new frame (COLMAP's default: 30)


FAST = SfmSettings(first_octave=None, max_features=4096, exhaustive=False)
_SMALL_FRAME_SIDE = 540  # px: below this SIFT needs the upsampled octave to find enough features
# Relaxed registration (10 inliers at 10%) is what registers every frame of hard real footage
# (wide baselines, low texture): on the kitchen sequence at 480 px, 25 of 25 frames instead of 21.
THOROUGH = SfmSettings(first_octave=-1, max_features=8192, exhaustive=True, min_pose_inliers=10)
_MAX_EXHAUSTIVE_FRAMES = 64  # beyond this, exhaustive matching costs more than it brings: sequential, wider


@dataclass
class Cameras:
    K: np.ndarray  # (3, 3) shared intrinsics
    poses: dict[int, Tensor]  # frame position -> (4, 4) float64 world-to-camera, registered frames only
    scene_depth: dict[int, float]  # frame position -> median depth of its SfM points (picks neighbours)
    # frame position -> (n, 3) float64 rows (u, v, z): its SfM points' pixels (our convention) and camera depths
    observations: dict[int, np.ndarray] = field(default_factory=dict)


class ColmapFlowBackend(GeometryBackend):
    """Weight-free geometry from pycolmap SfM and DIS optical-flow triangulation.

    Args:
        min_angle_deg: smallest triangulation angle (degrees) for a flow depth to count.
        fb_tolerance: forward-backward flow tolerance as a fraction of the image's long side.
        flow_max_side: optical flow runs on frames downscaled to this long side (px) and is
            upsampled for triangulation at full resolution (4x fewer pixels at 720 px).
        fast_frames: frames that the fast SfM pass uses (plus the scored ones); the thorough
            fallback uses all frames it is given.
        num_threads: threads for COLMAP (-1: all cores).
    """

    name = "colmap-flow"

    def __init__(
        self,
        min_angle_deg: float = 1.0,
        fb_tolerance: float = 0.003,
        flow_max_side: int = 360,
        fast_frames: int = 16,
        num_threads: int = -1,
    ) -> None:
        self.fast_frames = fast_frames
        self.min_angle_deg = min_angle_deg
        self.flow_max_side = flow_max_side
        self.fb_tolerance = fb_tolerance
        self.num_threads = num_threads

    def reconstruct(self, frames: Tensor, scored: Sequence[int], video_indices: Sequence[int]) -> SceneGeometry:
        timings: dict[str, float] = {}
        M, H, W, _ = frames.shape
        start = time.perf_counter()
        cameras = self.cameras(frames, scored)
        timings["sfm"] = time.perf_counter() - start
        K, world_to_cam, registered_set = cameras.K, cameras.poses, set(cameras.poses)
        if not registered_set:
            raise ReconstructionFailed("structure-from-motion found no consistent cameras (static camera, no parallax or no texture?)")

        start = time.perf_counter()
        flow_size = _flow_size(H, W, self.flow_max_side)
        gray: dict[int, np.ndarray] = {}

        def small_gray(i: int) -> np.ndarray:
            if i not in gray:
                image = cv2.cvtColor(frames[i].numpy(), cv2.COLOR_RGB2GRAY)
                gray[i] = cv2.resize(image, flow_size, interpolation=cv2.INTER_AREA) if flow_size != (W, H) else image
            return gray[i]

        T = len(scored)
        depth = torch.zeros(T, H, W)
        confidence = torch.zeros(T, H, W)
        registered = torch.tensor([i in registered_set for i in scored])
        poses = torch.eye(4, dtype=torch.float64).repeat(T, 1, 1)
        flows: dict[tuple[int, int], np.ndarray] = {}
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)  # per call: not thread-safe
        for t, i in enumerate(scored):
            if i not in registered_set:
                continue
            poses[t] = world_to_cam[i]
            neighbours = self._neighbours(i, registered_set, world_to_cam, cameras.scene_depth)
            estimates = []
            for j in neighbours:
                for key in ((i, j), (j, i)):
                    if key not in flows:
                        flows[key] = _upsample_flow(dis.calc(small_gray(key[0]), small_gray(key[1]), None), H, W)
                estimates.append(self._triangulate(flows[(i, j)], flows[(j, i)], K, world_to_cam[i], world_to_cam[j]))
            if estimates:
                stack = torch.from_numpy(np.stack(estimates))  # (n, H, W), NaN where invalid
                valid = ~torch.isnan(stack)
                depth[t] = torch.nan_to_num(stack.nanmedian(dim=0).values, nan=0.0).float()
                confidence[t] = valid.float().sum(0) / max(len(neighbours), 2)
        timings["flow_depth"] = time.perf_counter() - start
        return SceneGeometry(
            depth=depth,
            confidence=confidence,
            K=torch.from_numpy(K).expand(T, 3, 3).clone(),
            world_to_cam=poses,
            registered=registered,
            timings_s=timings,
        )

    # --- 1. cameras -----------------------------------------------------------------------------

    def cameras(self, frames: Tensor, scored: Sequence[int]) -> Cameras:
        """SfM cameras of `frames` (M, H, W, 3) uint8, keyed by position in `frames`.

        The fast pass sees `fast_frames` of them (plus the scored ones); when it leaves a scored
        frame unregistered, a thorough pass runs once on all of them: wide-baseline footage needs
        every frame it has. Also used by the hybrid backend (`common.geometry.hybrid`).
        """
        fast_subset = sorted(set(uniform_indices(len(frames), self.fast_frames)) | set(scored))
        cameras = self._structure_from_motion(frames, FAST, fast_subset)
        if not all(i in cameras.poses for i in scored):
            thorough = self._structure_from_motion(frames, THOROUGH, range(len(frames)))
            if sum(i in thorough.poses for i in scored) > sum(i in cameras.poses for i in scored):
                cameras = thorough
        return cameras

    def _structure_from_motion(self, frames: Tensor, settings: SfmSettings, positions: Sequence[int]) -> "Cameras":
        pycolmap.set_random_seed(0)  # RANSAC and mapping draw random samples: the same video, the same cameras
        with tempfile.TemporaryDirectory(prefix="vgpa-sfm-") as tmp:
            tmp = Path(tmp)
            images = tmp / "images"
            images.mkdir()
            for i in positions:
                frame = frames[i].numpy()
                # BMP: no compression library involved, the fastest round trip to COLMAP's reader.
                cv2.imwrite(str(images / f"{i:06d}.bmp"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            database = tmp / "database.db"
            extraction = pycolmap.FeatureExtractionOptions()
            first_octave = settings.first_octave
            if first_octave is None:
                first_octave = -1 if max(frames.shape[1:3]) <= _SMALL_FRAME_SIDE else 0
            extraction.sift.first_octave = first_octave
            extraction.sift.max_num_features = settings.max_features
            extraction.num_threads = self.num_threads
            pycolmap.extract_features(
                database,
                images,
                camera_mode=pycolmap.CameraMode.SINGLE,
                reader_options=pycolmap.ImageReaderOptions(camera_model=settings.camera_model),
                extraction_options=extraction,
                device=pycolmap.Device.cpu,
            )
            matching = pycolmap.FeatureMatchingOptions()
            matching.num_threads = self.num_threads
            if settings.exhaustive and len(positions) <= _MAX_EXHAUSTIVE_FRAMES:
                pycolmap.match_exhaustive(database, matching_options=matching, device=pycolmap.Device.cpu)
            else:
                overlap = settings.overlap * (2 if settings.exhaustive else 1)
                pairing = pycolmap.SequentialPairingOptions(overlap=overlap, quadratic_overlap=True)
                pycolmap.match_sequential(database, matching_options=matching, pairing_options=pairing, device=pycolmap.Device.cpu)
            mapping = pycolmap.IncrementalPipelineOptions()
            mapping.min_model_size = 3
            mapping.mapper.abs_pose_min_num_inliers = settings.min_pose_inliers
            mapping.mapper.abs_pose_min_inlier_ratio = 0.25 if settings.min_pose_inliers >= 30 else 0.1
            mapping.max_num_models = 3
            mapping.random_seed = 0  # the same video gives the same cameras
            mapping.extract_colors = False
            mapping.num_threads = self.num_threads
            models = pycolmap.incremental_mapping(database, images, tmp, mapping)
        if not models:
            return Cameras(np.eye(3), {}, {})
        model = max(models.values(), key=lambda m: m.num_reg_images())
        camera = next(iter(model.cameras.values()))
        poses = {}
        for image in model.images.values():
            if not image.has_pose:
                continue
            pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
            poses[int(Path(image.name).stem)] = torch.from_numpy(np.vstack([pose.matrix(), [0, 0, 0, 1]]))
        K = camera.calibration_matrix()
        # COLMAP puts the centre of the top-left pixel at (0.5, 0.5); our convention at (0, 0).
        K[0, 2] -= 0.5
        K[1, 2] -= 0.5
        observations = _point_observations(model)
        return Cameras(K, poses, {i: float(np.median(obs[:, 2])) for i, obs in observations.items()}, observations)

    # --- 2. depth -------------------------------------------------------------------------------

    def _neighbours(self, i: int, registered: set[int], poses: dict, cameras_depth: dict) -> list[int]:
        """The closest registered frame on each side whose baseline gives ~min_angle of parallax."""
        depth = cameras_depth.get(i, 1.0)
        centre = camera_centers(poses[i][None])[0]
        chosen = []
        for side in (-1, 1):
            candidates = sorted((j for j in registered if (j - i) * side > 0), key=lambda j: abs(j - i))
            pick = None
            for j in candidates:
                pick = j
                baseline = float((camera_centers(poses[j][None])[0] - centre).norm())
                if math.degrees(math.atan2(baseline, depth)) >= 2 * self.min_angle_deg:
                    break
            if pick is not None:
                chosen.append(pick)
        if len(chosen) < 2:  # at an end of the video: take a second one from the side that has frames
            others = sorted((j for j in registered if j != i and j not in chosen), key=lambda j: abs(j - i))
            for j in others[: 2 - len(chosen)]:
                chosen.append(j)
        return chosen

    def _triangulate(self, flow_ij: np.ndarray, flow_ji: np.ndarray, K: np.ndarray, pose_i: Tensor, pose_j: Tensor) -> np.ndarray:
        """Depth (H, W) of frame i from its flow to frame j; NaN where a check fails.

        Midpoint triangulation of the rays through pixel x in frame i and x + flow in frame j.
        Vectors are kept as planar (H, W) float32 components: numpy's reductions over a last
        axis of size 3 are several times slower than the same arithmetic written out.
        """
        H, W = flow_ij.shape[:2]
        v, u = np.mgrid[0:H, 0:W].astype(np.float32)
        u2, v2 = u + flow_ij[..., 0], v + flow_ij[..., 1]
        back = cv2.remap(flow_ji, u2, v2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
        tolerance = self.fb_tolerance * max(H, W)
        fb_x, fb_y = flow_ij[..., 0] + back[..., 0], flow_ij[..., 1] + back[..., 1]
        consistent = fb_x * fb_x + fb_y * fb_y < tolerance * tolerance
        consistent &= (u2 >= 0) & (u2 <= W - 1) & (v2 >= 0) & (v2 <= H - 1)

        K_inv = np.linalg.inv(K)
        Pi, Pj = pose_i.numpy(), pose_j.numpy()
        Ri, Rj = Pi[:3, :3], Pj[:3, :3]
        # Centred on camera i (C_i = 0) for float32 precision; ray directions have camera z = 1,
        # so a ray's parameter is the camera depth.
        Cj = ((-Rj.T @ Pj[:3, 3]) - (-Ri.T @ Pi[:3, 3])).astype(np.float32)
        Mi, Mj = (Ri.T @ K_inv).astype(np.float32), (Rj.T @ K_inv).astype(np.float32)
        di = [Mi[r, 0] * u + Mi[r, 1] * v + Mi[r, 2] for r in range(3)]
        dj = [Mj[r, 0] * u2 + Mj[r, 1] * v2 + Mj[r, 2] for r in range(3)]
        dot = lambda p, q: p[0] * q[0] + p[1] * q[1] + p[2] * q[2]  # noqa: E731
        a, b, c = dot(di, di), dot(di, dj), dot(dj, dj)
        d, e = -dot(di, Cj), -dot(dj, Cj)  # w0 = C_i - C_j = -C_j
        denom = a * c - b * b
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = (b * e - c * d) / denom  # depth in frame i
            t = (a * e - b * d) / denom  # depth in frame j
            midpoint = [0.5 * (s * di[r] + Cj[r] + t * dj[r]) for r in range(3)]
            to_j = [midpoint[r] - Cj[r] for r in range(3)]
            cos_angle = dot(midpoint, to_j) / np.sqrt(dot(midpoint, midpoint) * dot(to_j, to_j))
            depth_i = dot(midpoint, Ri[2].astype(np.float32))  # camera z of the midpoint in frame i
        angle_ok = cos_angle < math.cos(math.radians(self.min_angle_deg))
        valid = consistent & angle_ok & (s > 0) & (t > 0) & (depth_i > 0) & np.isfinite(depth_i)
        return np.where(valid, depth_i, np.nan).astype(np.float32)


def _flow_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(width, height) for cv2 at which optical flow is computed."""
    scale = min(1.0, max_side / max(height, width))
    return (max(16, round(width * scale)), max(16, round(height * scale)))


def _upsample_flow(flow: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flow (h, w, 2) in pixels of the small frames -> (H, W, 2) in pixels of the full frames."""
    h, w = flow.shape[:2]
    if (h, w) == (height, width):
        return flow
    big = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
    big[..., 0] *= width / w
    big[..., 1] *= height / h
    return big


def _point_observations(model) -> dict[int, np.ndarray]:
    """frame position -> (n, 3) rows (u, v, z) of its triangulated points: pixel in our convention, camera z."""
    observations = {}
    for image in model.images.values():
        if not image.has_pose:
            continue
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        seen = [(p.xy, model.points3D[p.point3D_id].xyz) for p in image.points2D if p.has_point3D()]
        if seen:
            uv = np.asarray([xy for xy, _ in seen], dtype=np.float64) - 0.5  # COLMAP's pixel centres are at +0.5
            z = (np.asarray([xyz for _, xyz in seen]) @ pose.rotation.matrix().T + pose.translation)[:, 2]
            observations[int(Path(image.name).stem)] = np.column_stack([uv, z])
    return observations
