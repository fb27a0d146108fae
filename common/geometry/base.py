"""The one interface every geometry backend implements: frames in, depth + cameras out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from common.errors import VideoGPAError


class ReconstructionFailed(VideoGPAError):
    """The backend could not reconstruct the video. Scoring turns this into an `unscorable` verdict."""

    http_status = 200


@dataclass
class SceneGeometry:
    """Geometry of the T scored frames, in the convention of `common.camera`.

    depth: (T, H, W) camera z, 0 where unknown.
    confidence: (T, H, W) in [0, 1]; pixels below the scorer's threshold are not lifted to 3D.
    K: (T, 3, 3) intrinsics in pixels of the (H, W) frames.
    world_to_cam: (T, 4, 4) OpenCV world-to-camera.
    registered: (T,) bool; False where the backend found no camera (its depth is then all 0).
    moving: optional (T, H, W) bool, pixels that the backend found moving against the recovered
        cameras (people, animals, vehicles): never lifted to 3D, and left out of the error.
    timings_s: seconds per internal stage, merged into the score's timings.
    alternative: another 3D interpretation of the same frames (a camera turning in place, where
        structure-from-motion also found cameras that travel: `common.geometry.turning`); the
        scorer judges the video by both and keeps the one whose reprojection scores better.
    turning: the cameras only turn (no translation): every pixel reprojects by the rotation's
        homography, whatever its depth.
    """

    depth: Tensor
    confidence: Tensor
    K: Tensor
    world_to_cam: Tensor
    registered: Tensor
    moving: Tensor | None = None
    timings_s: dict | None = None
    alternative: "SceneGeometry | None" = None
    turning: bool = False

    def __post_init__(self) -> None:
        T, H, W = self.depth.shape
        expected = {"confidence": (T, H, W), "K": (T, 3, 3), "world_to_cam": (T, 4, 4), "registered": (T,)}
        if self.moving is not None:
            expected["moving"] = (T, H, W)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"SceneGeometry.{name} must be {shape}, got {got}")
        if self.registered.dtype != torch.bool:
            raise ValueError("SceneGeometry.registered must be bool")


class GeometryBackend(ABC):
    """Reconstructs the scored frames of a video.

    A backend may use more frames than it is asked to score: `frames` holds every decoded frame
    made available (a dense subset of the video) and `scored` says which of them are scored.
    """

    #: Short, stable name; part of a score's metric_id.
    name: str = "abstract"
    #: Raised when a change to the backend changes the scores it gives, so that scores from before
    #: and after are never compared (part of `score_id`); None for a backend never revised.
    revision: Optional[int] = None
    #: True when `reconstruct` may run in several threads at once and give what it gives alone. A
    #: scorer replica scoring several videos at once (max_batch_size > 1) serialises the calls of a
    #: backend that is not (pycolmap seeds one process-wide random generator per call, for example).
    thread_safe: bool = False

    @property
    def score_id(self) -> str:
        """The backend's part of a score's metric_id: its name, and its revision when it has one."""
        return self.name if self.revision is None else f"{self.name}.r{self.revision}"

    def cropped(self, borders: tuple[int, int, int, int]) -> "GeometryBackend":
        """This backend for frames with (top, bottom, left, right) pixels cut from their edges
        (`ScoreConfig.crop_borders`). A backend that reconstructs from the pixels needs nothing; one
        that answers with stored per-pixel geometry (the oracle) cuts it the same way."""
        return self

    @abstractmethod
    def reconstruct(self, frames: Tensor, scored: Sequence[int], video_indices: Sequence[int]) -> SceneGeometry:
        """Geometry of the scored frames.

        Args:
            frames: (M, H, W, 3) uint8 RGB, in temporal order.
            scored: T positions into `frames` of the frames to return geometry for.
            video_indices: (M,) index of each frame in the original video (a backend with ground
                truth, like the oracle, uses it to look its answers up).

        Raises:
            ReconstructionFailed: with a reason a person understands.
        """
