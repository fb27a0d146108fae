"""Evaluation metrics of a video's 3D consistency, as pure functions (used by `vgpa eval`).

- Reprojection PSNR / SSIM / LPIPS: each scored frame against the renders of the other frames'
  points (the scorer's own path, `common.scoring.pairwise_errors`), on covered pixels only; the
  covered fraction is reported beside them. Higher PSNR / SSIM, lower LPIPS is more consistent.
- MVCS (multi-view consistency score): the depth of frame i moved into frame i+1 with the cameras,
  z-buffered (a point hidden behind another point of frame i is not compared), against frame
  i+1's own depth. A moved pixel that lands behind a nearer surface of its 5x5 neighbourhood is
  an occlusion, not an error. Per pixel the relative error |z_moved - z| / z (clipped at 1) is
  independent of the reconstruction's scale; MVCS = exp(-mean error), 1 = perfectly consistent.
- Epipolar error: SIFT matches (ratio test) between consecutive frames, a fundamental matrix
  fitted with RANSAC (1 px), the mean Sampson distance (its square root, in pixels) over all
  matches, each truncated at `max_error_px` (a false match weighs that much, not an arbitrary
  amount; the mean over RANSAC inliers alone would be below the threshold by construction and
  blind to corruption), and the RANSAC inlier rate. A pair without enough matches, without image
  motion (a static camera gives no epipolar geometry) or where RANSAC fails is *unmeasurable*: it
  is counted and reported, never averaged in as a value.

Every function takes data in the convention of `common.camera` and returns plain Python values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import cv2
import numpy as np
import torch
from torch import Tensor

from common.camera import unproject_depth
from common.config import ScoreConfig
from common.geometry.base import SceneGeometry
from common.perceptual import DSSIM, PerceptualMetric, create_metric, lpips_weights_path
from common.raster import rasterize_points

# --- reprojection ---------------------------------------------------------------------------------


@dataclass
class ReprojectionMetrics:
    psnr: Optional[float]  # dB, mean over frames with covered pixels
    ssim: Optional[float]  # mean over frames of the mean SSIM on covered pixels
    lpips: Optional[float]  # None when LPIPS backbone weights are not on this machine
    coverage: float  # mean covered fraction over registered frames
    frames_measured: int


def load_lpips(config: ScoreConfig, device: str = "cpu") -> Optional[PerceptualMetric]:
    """LPIPS-VGG when its backbone weights are on this machine (config.lpips_weights or torchvision's cache), else None."""
    if lpips_weights_path("vgg", config.lpips_weights) is None:
        return None
    return create_metric("lpips-vgg", config.lpips_weights, torch.device(device))


def reprojection_metrics(
    frames: Tensor, geometry: SceneGeometry, config: Optional[ScoreConfig] = None, lpips_net: Optional[PerceptualMetric] = None
) -> ReprojectionMetrics:
    """PSNR / SSIM / LPIPS of frames (T, H, W, 3) float in [0, 1] against their reprojections.

    The scorer's own comparison (`common.scoring.pairwise_errors`): every other frame's confident
    static points rendered into the frame, compared on covered static pixels at the scorer's
    comparison scale. LPIPS: `lpips_net`, or LPIPS-VGG when its weights are on disk (`load_lpips`);
    None otherwise.
    """
    from common.scoring import pairwise_errors  # scoring imports the geometry registry; keep this module light

    config = config or ScoreConfig()
    errors = pairwise_errors(frames, geometry, config, DSSIM())
    if lpips_net is None:
        lpips_net = load_lpips(config, str(frames.device))
    lpips_errors = pairwise_errors(frames, geometry, config, lpips_net) if lpips_net is not None else None
    psnr, ssim, lp = [], [], []
    registered = geometry.registered.cpu()
    for t in range(frames.shape[0]):
        mse, dssim = errors.frame_errors(t)
        if not registered[t] or mse is None:
            continue
        psnr.append(10 * math.log10(1.0 / max(mse, 1e-10)))
        ssim.append(1 - 2 * dssim)  # DSSIM = (1 - SSIM) / 2
        if lpips_errors is not None:
            lp.append(lpips_errors.frame_errors(t)[1])
    coverage = [float(errors.covered[t]) for t in range(frames.shape[0]) if registered[t]]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return ReprojectionMetrics(mean(psnr), mean(ssim), mean(lp), float(np.mean(coverage)) if coverage else 0.0, len(psnr))


# --- MVCS -----------------------------------------------------------------------------------------


@dataclass
class MVCS:
    value: Optional[float]  # exp(-mean relative depth error) in (0, 1]; None when no pair was measured
    mean_relative_error: Optional[float]
    pairs_measured: int
    pairs_unmeasurable: int


def mvcs(
    geometry: SceneGeometry, min_confidence: float = 0.5, max_error: float = 1.0, occlusion_ratio: float = 1.1
) -> MVCS:
    """Multi-view consistency of consecutive frames' depth maps (see the module docstring).

    A pair is unmeasurable when either frame is unregistered or fewer than 1% of frame i+1's
    pixels receive a moved depth.
    """
    from common.scoring import _shows_through  # the scorer's occlusion rule for 1-pixel splats

    depth = geometry.depth.float()
    T, H, W = depth.shape
    K = geometry.K.float()
    w2c = geometry.world_to_cam.float()
    confident = (geometry.confidence >= min_confidence) & (depth > 0)
    errors, unmeasurable = [], 0
    for i in range(T - 1):
        j = i + 1
        if not (geometry.registered[i] and geometry.registered[j]):
            unmeasurable += 1
            continue
        world = unproject_depth(depth[i : i + 1], K[i : i + 1], w2c[i : i + 1])[0][confident[i]]
        if world.shape[0] == 0:
            unmeasurable += 1
            continue
        _, zbuffer, mask = rasterize_points(world, torch.zeros(len(world), 1), K[j : j + 1], w2c[j : j + 1], H, W)
        zbuffer, mask = zbuffer.reshape(1, H, W), mask.reshape(1, H, W)
        mask = mask & ~_shows_through(zbuffer, mask, ratio=occlusion_ratio)
        mask = mask[0] & confident[j]
        if mask.float().mean() < 0.01:
            unmeasurable += 1
            continue
        target = depth[j][mask]
        relative = ((zbuffer[0][mask] - target).abs() / target).clamp(max=max_error)
        errors.append(float(relative.mean()))
    if not errors:
        return MVCS(None, None, 0, unmeasurable)
    mean_error = float(np.mean(errors))
    return MVCS(math.exp(-mean_error), mean_error, len(errors), unmeasurable)


# --- epipolar error -------------------------------------------------------------------------------


@dataclass
class EpipolarPair:
    first: int
    second: int
    matches: int
    error_px: Optional[float] = None  # mean of min(sqrt(Sampson distance), max_error_px) over all matches
    inlier_rate: Optional[float] = None
    unmeasurable: Optional[str] = None  # why, when the pair could not be measured


@dataclass
class EpipolarError:
    error_px: Optional[float]  # mean over measured pairs; None when no pair was measurable
    inlier_rate: Optional[float]
    pairs_measured: int
    pairs_unmeasurable: int
    pairs: list[EpipolarPair] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def sampson_distance(F: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """First-order geometric error (squared pixels) of matches x1 (N, 2) <-> x2 (N, 2) under F (x2^T F x1 = 0)."""
    h1 = np.column_stack([x1, np.ones(len(x1))])
    h2 = np.column_stack([x2, np.ones(len(x2))])
    Fx1 = h1 @ F.T  # (N, 3): F x1
    Ftx2 = h2 @ F  # (N, 3): F^T x2
    numerator = np.einsum("ij,ij->i", h2, Fx1) ** 2
    denominator = Fx1[:, 0] ** 2 + Fx1[:, 1] ** 2 + Ftx2[:, 0] ** 2 + Ftx2[:, 1] ** 2
    return numerator / np.maximum(denominator, 1e-12)


def epipolar_error(
    frames_uint8: Tensor | np.ndarray,
    *,
    ratio: float = 0.75,
    min_matches: int = 16,
    min_motion_px: float = 1.0,
    ransac_threshold_px: float = 1.0,
    max_error_px: float = 5.0,
    max_features: int = 4000,
) -> EpipolarError:
    """Epipolar consistency of consecutive frames (N, H, W, 3) uint8 RGB.

    A pair is unmeasurable with fewer than `min_matches` matches, a median match displacement
    below `min_motion_px` (no camera motion: F is undefined) or no fundamental matrix from RANSAC.
    """
    frames = frames_uint8.numpy() if isinstance(frames_uint8, Tensor) else np.asarray(frames_uint8)
    sift = cv2.SIFT_create(nfeatures=max_features)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    features = []
    for frame in frames:
        keypoints, descriptors = sift.detectAndCompute(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), None)
        points = np.float64([k.pt for k in keypoints]).reshape(-1, 2)  # OpenCV: pixel centres at integers
        features.append((points, descriptors))
    pairs = []
    for i in range(len(frames) - 1):
        (p1, d1), (p2, d2) = features[i], features[i + 1]
        pair = EpipolarPair(i, i + 1, 0)
        pairs.append(pair)
        if d1 is None or d2 is None or len(d1) < 2 or len(d2) < 2:
            pair.unmeasurable = "too few features"
            continue
        good = [m for m, n in matcher.knnMatch(d1, d2, k=2) if m.distance < ratio * n.distance]
        pair.matches = len(good)
        if len(good) < min_matches:
            pair.unmeasurable = f"{len(good)} matches (needs {min_matches})"
            continue
        x1 = p1[[m.queryIdx for m in good]]
        x2 = p2[[m.trainIdx for m in good]]
        motion = float(np.median(np.linalg.norm(x2 - x1, axis=1)))
        if motion < min_motion_px:
            pair.unmeasurable = f"no camera motion (median match displacement {motion:.2f} px)"
            continue
        F, inliers = cv2.findFundamentalMat(x1, x2, cv2.FM_RANSAC, ransac_threshold_px, 0.999, 10000)
        if F is None or F.shape != (3, 3) or inliers is None or int(inliers.sum()) < 8:
            pair.unmeasurable = "no fundamental matrix found"
            continue
        inliers = inliers.ravel().astype(bool)
        pair.error_px = float(np.minimum(np.sqrt(sampson_distance(F, x1, x2)), max_error_px).mean())
        pair.inlier_rate = float(inliers.mean())
    measured = [p for p in pairs if p.unmeasurable is None]
    return EpipolarError(
        error_px=float(np.mean([p.error_px for p in measured])) if measured else None,
        inlier_rate=float(np.mean([p.inlier_rate for p in measured])) if measured else None,
        pairs_measured=len(measured),
        pairs_unmeasurable=len(pairs) - len(measured),
        pairs=pairs,
    )
