"""Ground-truth geometry (e.g. from `common.synthetic`): checks reprojection and scoring on their own."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from common.camera import as_4x4
from common.geometry.base import GeometryBackend, SceneGeometry


class OracleBackend(GeometryBackend):
    """Answers with the geometry it was given for every frame of the video.

    Args:
        depth: (N, H, W) camera z of every frame of the video (0 = unknown).
        K: (N, 3, 3) or (3, 3). world_to_cam: (N, 4, 4) or (N, 3, 4).
    The frames being scored must have the (H, W) of `depth` (score with a max_side that keeps it).
    """

    name = "oracle"

    def __init__(self, depth: Tensor, K: Tensor, world_to_cam: Tensor) -> None:
        self.depth = depth.float()
        n = depth.shape[0]
        self.K = (K if K.ndim == 3 else K.expand(n, 3, 3)).double()
        self.world_to_cam = as_4x4(world_to_cam).double()

    @classmethod
    def from_render(cls, video) -> "OracleBackend":
        """From a `common.synthetic.RenderedVideo`."""
        return cls(video.depth, video.K, video.world_to_cam)

    def cropped(self, borders: tuple[int, int, int, int]) -> "OracleBackend":
        """The same geometry for frames cut by (top, bottom, left, right) pixels: depth cut, principal point moved."""
        if not any(borders):
            return self
        top, bottom, left, right = borders
        _, height, width = self.depth.shape
        K = self.K.clone()
        K[:, 0, 2] -= left
        K[:, 1, 2] -= top
        return OracleBackend(self.depth[:, top:height - bottom, left:width - right], K, self.world_to_cam)

    def reconstruct(self, frames: Tensor, scored: Sequence[int], video_indices: Sequence[int]) -> SceneGeometry:
        rows = [video_indices[i] for i in scored]
        depth = self.depth[rows]
        if tuple(depth.shape[1:]) != tuple(frames.shape[1:3]):
            raise ValueError(
                f"oracle depth is {tuple(depth.shape[1:])} but frames are {tuple(frames.shape[1:3])}: "
                "score at the rendered resolution"
            )
        return SceneGeometry(
            depth=depth,
            confidence=(depth > 0).float(),
            K=self.K[rows],
            world_to_cam=self.world_to_cam[rows],
            registered=torch.ones(len(rows), dtype=torch.bool),
        )
