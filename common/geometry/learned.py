"""Adapters for feed-forward geometry models: Depth Anything 3 and VGGT (optional packages).

Both predict, for a set of views, depth and a confidence at the model's processed resolution,
OpenCV world-to-camera extrinsics (N, 3, 4) and intrinsics (N, 3, 3) in pixels of that
resolution. `to_scene_geometry` converts them to our convention (`common.camera`) at this edge:

- depth and confidence are resized to the scored frames (bilinear, half-pixel centres);
- K is rescaled to the scored frames. These models put the principal point of a centred camera at
  (w / 2, h / 2), i.e. pixel centres at +0.5 (like COLMAP), so with s = W / w:
  fx' = s * fx and cx' = s * cx - 0.5 (the same along y with H / h);
- a camera-to-world output (`cam_to_world=True`) is inverted; (3, 4) becomes (4, 4);
- confidence is divided by its per-frame median and clipped to [0, 1], so the scorer's 0.5
  threshold keeps pixels at least half as confident as the frame's typical pixel.

Neither package is required: they are imported when the backend is created, and a missing
package or missing weights is a `ConfigError` that says what to install or download and where.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.camera import as_4x4, invert_rigid, rescale_intrinsics
from common.errors import ConfigError
from common.geometry.base import GeometryBackend, SceneGeometry


def normalise_confidence(conf: Tensor) -> Tensor:
    """(N, h, w) positive confidences -> [0, 1]: divided by each frame's median, clipped at 1."""
    median = conf.flatten(1).median(dim=1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (conf / median).clamp(0, 1)


def to_scene_geometry(
    depth: Tensor,
    conf: Optional[Tensor],
    extrinsics: Tensor,
    intrinsics: Tensor,
    frame_size: tuple[int, int],
    *,
    cam_to_world: bool = False,
    pixel_centre: float = 0.5,
) -> SceneGeometry:
    """A model's outputs at its processed resolution -> `SceneGeometry` of frames of frame_size (H, W).

    Args:
        depth: (N, h, w) camera z (not ray length). conf: (N, h, w) or None (then 1 where depth > 0).
        extrinsics: (N, 3, 4) or (N, 4, 4), world-to-camera unless `cam_to_world`.
        intrinsics: (N, 3, 3) in pixels of (h, w).
    """
    depth = torch.as_tensor(np.asarray(depth)).float()
    N, h, w = depth.shape
    H, W = frame_size
    ext = as_4x4(torch.as_tensor(np.asarray(extrinsics)).double())
    if cam_to_world:
        ext = invert_rigid(ext)
    K = rescale_intrinsics(torch.as_tensor(np.asarray(intrinsics)).double(), (h, w), (H, W), pixel_centre)
    valid = torch.isfinite(depth) & (depth > 0)
    depth = torch.where(valid, depth, torch.zeros_like(depth))
    if conf is None:
        confidence = valid.float()
    else:
        confidence = normalise_confidence(torch.as_tensor(np.asarray(conf)).float().nan_to_num(0.0)) * valid
    resize = lambda x: F.interpolate(x[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]  # noqa: E731
    # Resizing depth blends across depth edges; those pixels lose confidence by the valid mask's blur too.
    depth_big = resize(depth)
    valid_big = resize(valid.float()) > 0.999
    return SceneGeometry(
        depth=torch.where(valid_big, depth_big, torch.zeros_like(depth_big)),
        confidence=resize(confidence) * valid_big,
        K=K,
        world_to_cam=ext,
        registered=torch.ones(N, dtype=torch.bool),
    )


def _device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else the CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _require_folder(weights: Optional[Path], what: str, hint: str) -> Path:
    if weights is None:
        raise ConfigError(f"the {what} backend needs local weights: {hint}")
    weights = Path(weights)
    if not weights.exists():
        raise ConfigError(f"{what} weights not found at {weights}: {hint}")
    return weights


# --- Depth Anything 3 -------------------------------------------------------------------------------

DA3_HINT = (
    "download a Depth Anything 3 model, e.g. the files of depth-anything/DA3-LARGE (config.json and "
    "model.safetensors), into a folder and pass it with --weights DIR"
)
DA3_INSTALL = (
    "the da3 backend needs the depth-anything-3 package: pip install --no-deps depth-anything-3==0.1.1 "
    "omegaconf einops addict plyfile trimesh evo e3nn moviepy==1.0.3 (see docs/backends.md; its declared "
    "requirements would downgrade numpy)"
)


class DepthAnything3Backend(GeometryBackend):
    """Depth Anything 3: depth, confidence, world-to-camera poses and intrinsics for all scored frames at once.

    Args:
        weights: folder for `DepthAnything3.from_pretrained`, or a model name such as "da3-large"
            prefixed with "random:" (a randomly initialised model from the package's configs: tests
            and speed checks only, see benchmarks/gpu_check.py).
        process_res: the model's processing resolution (long side, px). It changes the score, so a
            resolution other than the default 504 is part of the backend's name (`da3@252`), and
            therefore of `metric_id`.
        device: "auto" (CUDA when available, so that a scorer replica given a GPU runs the model
            on it), "cpu" or "cuda[:N]".
    """

    name = "da3"
    thread_safe = True  # torch inference without state between calls

    def __init__(self, weights: Optional[Path], process_res: int = 504, device: str = "auto") -> None:
        try:
            from depth_anything_3.api import DepthAnything3
        except ImportError:
            raise ConfigError(DA3_INSTALL) from None
        if weights is not None and str(weights).startswith("random:"):
            self.model = DepthAnything3(model_name=str(weights)[len("random:"):])
        else:
            folder = _require_folder(weights, "da3", DA3_HINT)
            try:
                self.model = DepthAnything3.from_pretrained(str(folder))
            except Exception as err:  # the package raises a variety of errors for a bad folder
                raise ConfigError(f"cannot load Depth Anything 3 from {folder} ({err}): {DA3_HINT}") from None
        self.model = self.model.to(_device(device)).float().eval()
        self.process_res = process_res
        if process_res != 504:
            self.name = f"da3@{process_res}"

    def reconstruct(self, frames: Tensor, scored: Sequence[int], video_indices: Sequence[int]) -> SceneGeometry:
        start = time.perf_counter()
        images = [frames[i].numpy() for i in scored]
        with torch.no_grad():
            prediction = self.model.inference(images, process_res=self.process_res)
        geometry = to_scene_geometry(
            prediction.depth, prediction.conf, prediction.extrinsics, prediction.intrinsics, tuple(frames.shape[1:3])
        )
        geometry.timings_s = {"da3": time.perf_counter() - start}
        return geometry


# --- VGGT -------------------------------------------------------------------------------------------

VGGT_HINT = (
    "download the VGGT weights (facebook/VGGT-1B: config.json and model.safetensors) into a folder "
    "and pass it with --weights DIR"
)
VGGT_INSTALL = (
    "the vggt backend needs the vggt package, which is not on PyPI: "
    "git clone https://github.com/facebookresearch/vggt && pip install --no-deps -e vggt"
)


class VGGTBackend(GeometryBackend):
    """VGGT: one forward pass over the scored frames, resized to `width` x (multiple of 14) px."""

    name = "vggt"
    thread_safe = True  # torch inference without state between calls

    def __init__(self, weights: Optional[Path], width: int = 518, device: str = "auto") -> None:
        try:
            from vggt.models.vggt import VGGT
        except ImportError:
            raise ConfigError(VGGT_INSTALL) from None
        folder = _require_folder(weights, "vggt", VGGT_HINT)
        try:
            self.model = VGGT.from_pretrained(str(folder))
        except Exception as err:
            raise ConfigError(f"cannot load VGGT from {folder} ({err}): {VGGT_HINT}") from None
        self.device = _device(device)
        self.model = self.model.to(self.device).float().eval()
        self.width = width
        if width != 518:
            self.name = f"vggt@{width}"

    def reconstruct(self, frames: Tensor, scored: Sequence[int], video_indices: Sequence[int]) -> SceneGeometry:
        from vggt.utils.pose_enc import pose_encoding_to_extri_intri

        start = time.perf_counter()
        H, W = frames.shape[1:3]
        h = max(14, round(H * self.width / W / 14) * 14)
        images = frames[list(scored)].permute(0, 3, 1, 2).float() / 255.0
        images = F.interpolate(images, size=(h, self.width), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            out = self.model(images[None].to(self.device))
            extrinsic, intrinsic = pose_encoding_to_extri_intri(out["pose_enc"], (h, self.width))
        geometry = to_scene_geometry(
            out["depth"][0, ..., 0].cpu(), out["depth_conf"][0].cpu(), extrinsic[0].cpu(), intrinsic[0].cpu(), (H, W)
        )
        geometry.timings_s = {"vggt": time.perf_counter() - start}
        return geometry
