"""Hybrid backend: dense monocular depth from a `transformers` depth model + the default backend's SfM cameras.

1. Cameras: the weight-free structure-from-motion of `ColmapFlowBackend.cameras` (pycolmap), in
   our convention already, with each registered frame's sparse points as (u, v, z) observations.
2. Depth: `AutoModelForDepthEstimation` (Depth Anything V1/V2, DPT, Depth Pro, ...) on each scored
   frame, resized back to the frame with bilinear interpolation (half-pixel centres, our pixel
   convention). Relative models (Depth Anything "relative", DPT/MiDaS) predict an inverse depth
   up to scale; metric ones (Depth Anything "metric", Depth Pro, ZoeDepth) a depth.
3. Scale: per frame, the prediction is scaled to the SfM depth of the sparse points it sees by the
   median ratio (of depths for depth models, of inverse depths for inverse-depth models), so depth
   and cameras share the SfM's units. Frames with fewer than `min_points` points are unregistered.

Weights come from a local folder (`save_pretrained` layout: config.json, the weights and
preprocessor_config.json) and are never downloaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.errors import ConfigError
from common.geometry.base import GeometryBackend, ReconstructionFailed, SceneGeometry

DOWNLOAD_HINT = (
    "download a transformers depth model, e.g. the files of depth-anything/Depth-Anything-V2-Small-hf "
    "(config.json, model.safetensors, preprocessor_config.json), into a folder and pass it with "
    "--weights DIR (ScoreConfig.weights)"
)

# model_type -> True when its predicted_depth is a depth (not an inverse depth); see `predicts_depth`.
_METRIC_TYPES = {"depth_pro", "zoedepth", "glpn", "prompt_depth_anything"}


def predicts_depth(config) -> bool:
    """Whether a transformers depth model's `predicted_depth` is a depth (True) or an inverse depth (False)."""
    if config.model_type in _METRIC_TYPES:
        return True
    return getattr(config, "depth_estimation_type", "relative") == "metric"


def fit_scale(prediction: Tensor, observations: np.ndarray, is_depth: bool) -> tuple[Optional[float], int]:
    """Median-ratio scale of one frame's prediction (H, W) to its SfM points (n, 3) rows (u, v, z).

    Returns (scale, points used): depth = scale * prediction for depth models,
    depth = 1 / (scale * prediction) for inverse-depth models. scale is None without usable points.
    """
    H, W = prediction.shape
    u = np.rint(observations[:, 0]).astype(np.int64)
    v = np.rint(observations[:, 1]).astype(np.int64)
    z = observations[:, 2]
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H) & (z > 0)
    predicted = prediction.numpy()[v[inside], u[inside]].astype(np.float64)
    z = z[inside]
    usable = np.isfinite(predicted) & (predicted > 0)
    if not usable.any():
        return None, 0
    ratios = z[usable] / predicted[usable] if is_depth else (1.0 / z[usable]) / predicted[usable]
    return float(np.median(ratios)), int(usable.sum())


class HybridBackend(GeometryBackend):
    """Monocular depth (transformers) scaled to the SfM cameras of the default backend.

    Args:
        weights: folder with a transformers depth model and its image processor.
        min_points: SfM points a frame needs for its depth scale; fewer leaves it unregistered.
        device: torch device for the depth model ("cpu" default; fp32).
    """

    def __init__(self, weights: Optional[Path], min_points: int = 8, device: str = "cpu") -> None:
        if weights is None:
            raise ConfigError(f"the hybrid backend needs depth model weights: {DOWNLOAD_HINT}")
        weights = Path(weights)
        if not (weights / "config.json").is_file():
            raise ConfigError(f"no transformers model in {weights} (config.json missing): {DOWNLOAD_HINT}")
        if not (weights / "preprocessor_config.json").is_file():
            raise ConfigError(f"{weights} has no preprocessor_config.json (the model's image processor): {DOWNLOAD_HINT}")
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        from common.geometry.colmap_flow import ColmapFlowBackend

        try:
            self.model = AutoModelForDepthEstimation.from_pretrained(weights, dtype=torch.float32).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(weights)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the depth model in {weights} ({err}): {DOWNLOAD_HINT}") from None
        self.device = torch.device(device)
        self.is_depth = predicts_depth(self.model.config)
        self.min_points = min_points
        self.sfm = ColmapFlowBackend()
        self.name = f"hybrid+{self.model.config.model_type}"
        self.revision = self.sfm.cameras_revision  # its cameras are colmap-flow's; its depth is its own

    @torch.no_grad()
    def predict(self, frames: Tensor) -> Tensor:
        """(T, H, W, 3) uint8 -> (T, H, W) raw model output resized to the frames (depth or inverse depth)."""
        T, H, W, _ = frames.shape
        outputs = []
        for start in range(0, T, 4):  # a few frames at a time bounds activation memory
            batch = [f.numpy() for f in frames[start : start + 4]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            predicted = self.model(**inputs).predicted_depth.float()  # (B, h, w)
            outputs.append(F.interpolate(predicted[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0].cpu())
        return torch.cat(outputs)

    def reconstruct(self, frames: Tensor, scored: Sequence[int], video_indices: Sequence[int]) -> SceneGeometry:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        cameras = self.sfm.cameras(frames, scored)
        timings["sfm"] = time.perf_counter() - start
        timings.update(cameras.timings())
        if not cameras.poses:
            raise ReconstructionFailed("structure-from-motion found no consistent cameras (static camera, no parallax or no texture?)")
        start = time.perf_counter()
        prediction = self.predict(frames[list(scored)])
        timings["mono_depth"] = time.perf_counter() - start
        geometry = self.combine(cameras, prediction, scored)
        geometry.timings_s = timings
        return geometry

    def combine(self, cameras, prediction: Tensor, scored: Sequence[int]) -> SceneGeometry:
        """SfM `cameras` (colmap_flow.Cameras) + raw predictions (T, H, W) of the scored frames -> geometry."""
        T, H, W = prediction.shape
        depth = torch.zeros(T, H, W)
        confidence = torch.zeros(T, H, W)
        poses = torch.eye(4, dtype=torch.float64).repeat(T, 1, 1)
        registered = torch.zeros(T, dtype=torch.bool)
        for t, i in enumerate(scored):
            if i not in cameras.poses or i not in cameras.observations:
                continue
            scale, used = fit_scale(prediction[t], cameras.observations[i], self.is_depth)
            if scale is None or used < self.min_points or not np.isfinite(scale) or scale <= 0:
                continue
            valid = torch.isfinite(prediction[t]) & (prediction[t] > 0)
            raw = torch.where(valid, prediction[t], torch.ones_like(prediction[t]))
            frame_depth = scale * raw if self.is_depth else 1.0 / (scale * raw)
            depth[t] = torch.where(valid, frame_depth, torch.zeros_like(frame_depth))
            confidence[t] = valid.float()
            poses[t] = cameras.poses[i]
            registered[t] = True
        return SceneGeometry(
            depth=depth,
            confidence=confidence,
            K=torch.from_numpy(cameras.K).expand(T, 3, 3).clone(),
            world_to_cam=poses,
            registered=registered,
        )
