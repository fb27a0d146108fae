"""The default, weight-free backend: pycolmap structure-from-motion + depth from triangulated optical flow.

1. Cameras: DSP-SIFT features, sequential matching (with quadratic overlap for longer-range pairs;
   every pair for short inputs) and global mapping over a dense subset of the video, one shared
   pinhole camera. When the fast settings leave too many scored frames unregistered, one second
   pass of bounded cost: a denser one (finer SIFT, every pair up to 25 frames) for clips that
   matched little, the same matches verified to a looser tolerance for clips that matched a lot.
   A sparse capture (at most 12 frames, views far apart) gets affine-covariant SIFT in that pass.
   A self-calibrated focal length is kept only where the matches demand it (`FocalRule`):
   otherwise, and whenever it narrows the field of view below 30 degrees, the focal is fixed at
   COLMAP's prior. Moving things (animals, people, vehicles) are found first, without cameras: each
   SfM frame's flow to its SfM neighbours against a fundamental matrix that RANSAC fits to it.
   They get no features: they would pull the cameras with them. Where the fast pass finds no
   camera, a camera that turns in place (a tripod pan: no parallax) is fitted to the flow instead
   (`common.geometry.turning`); where it explains the flow, every pixel gets one depth. Where most
   verified pairs look like a pan to COLMAP, that fit is also offered beside SfM's cameras, and
   the scorer keeps the interpretation that reprojects better.
2. Depth: dense DIS optical flow from each scored frame to two registered neighbours (one on
   each side in time, the closest with `neighbour_angle_deg` = 1.5 degrees of parallax: a wider
   baseline lowers the depth noise of slow cameras), triangulated with the
   recovered cameras. A pixel's depth from one neighbour is kept when it passes a
   forward-backward flow check, lies in front of both cameras, has at least
   `min_angle_deg` of triangulation angle and lies where the frame has texture (`min_texture`:
   on smooth surfaces the flow is interpolated, not measured); estimates are fused by their
   median, and the confidence is the fraction of neighbours that gave one. Between views turned
   more than `sweep_above_deg` apart (sparse captures) flow finds almost nothing: there a plane
   sweep with a left-right check gives the depth instead.

COLMAP's cameras are OpenCV cameras with world-to-camera `cam_from_world`, the convention of
`common.camera`; intrinsics are in pixels of the frames as written (the scored frames), with the
principal point shifted by half a pixel (COLMAP's pixel centres are at +0.5).
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2  # must be imported before pycolmap: both bundle libpng, and the other order crashes cv2.imwrite
import numpy as np
import pycolmap
import torch
from torch import Tensor

from common.camera import camera_centers, rescale_intrinsics, rotation_angle
from common.geometry.base import GeometryBackend, ReconstructionFailed, SceneGeometry
from common.geometry.turning import PairFlow, TurningFit, fit_turning, transfer
from common.parallel import OnceCache, Prefetch, cpu_workers, ordered_map
from common.video import evenly_filled, uniform_indices

pycolmap.logging.minloglevel = 2  # errors only: COLMAP's INFO lines would drown the CLI's output


@dataclass(frozen=True)
class SfmSettings:
    max_side: int  # SIFT runs on frames downscaled to this long side (px); cameras are scaled back
    first_octave: int  # -1 upsamples first: many more features, about 4x slower
    max_features: int
    overlap: int = 5  # sequential matching: each frame with its next `overlap` (plus quadratic jumps)
    exhaustive_up_to: int = 12  # sparse captures (this many frames or fewer): match every pair
    camera_model: str = "SIMPLE_PINHOLE"  # the scorer's raster is a pinhole: no distortion to fit
    # DSP-SIFT (descriptors pooled over 10 neighbouring scales): steadier matches on blurred, noisy
    # or low-contrast frames, hence better cameras, which set how finely the score resolves
    # (docs/backends.md, "DSP-SIFT"). It costs about 1.3 s more per fast pass.
    domain_size_pooling: bool = True
    # Affine-covariant SIFT (`estimate_affine_shape`): features that survive the foreshortening of
    # views 30-90 degrees apart (sparse captures); about 1.5x the extraction time.
    affine_shape: bool = False


# Global SfM (GLOMAP in pycolmap 4) registers slow, short generated clips that incremental SfM
# often initialises badly (a bad first pair sends the focal length to a few pixels), and its cost
# does not grow with retries. COLMAP runs on one thread: with more, feature order, RANSAC draws and
# bundle adjustment sums vary from run to run, and so did the cameras (a focal of 433 px in one run,
# 133 px in the next, on the same clip). The rest of the pipeline uses the other core.
FAST = SfmSettings(max_side=480, first_octave=0, max_features=2048)
# When the fast pass leaves too many scored frames unregistered and matched little (wide
# baselines, low texture), one denser pass: SIFT at 720 px (from the upsampled octave when the
# frames are smaller) with more features on up to `dense_frames` frames, every pair matched up to
# 25. On the kitchen capture (fast pass: 3 of 10 scored frames) it registers all of them on its 25
# frames in 6 s and ranks the clean capture above 4 of its 5 corruptions; the earlier setting,
# SIFT from the upsampled octave at 480 px, took 12 s and ranked 3. See ColmapFlowBackend._second_pass.
# Plain SIFT here: DSP-SIFT doubled the dense pass's time (kitchen: 7 s -> 14.5 s per video) and
# its cameras ranked one corruption fewer right.
DENSE = SfmSettings(max_side=720, first_octave=0, max_features=4096, overlap=8, exhaustive_up_to=25, domain_size_pooling=False)
# The second pass of a sparse capture (at most `exhaustive_up_to` frames, views far apart, every
# pair matched): affine-covariant SIFT from the upsampled octave. On the 8-frame kitchen orbit
# (views about 45 degrees apart) DENSE registered none of the clean capture's frames; these
# settings 7 of 8 of the clean, jittered, drifted, noisy and shifted copies (6 of the re-encoded
# one) in about 6 s (measured 2026-12-06; docs/backends.md, "Sparse captures").
SPARSE = SfmSettings(max_side=600, first_octave=-1, max_features=2048, exhaustive_up_to=12, domain_size_pooling=False, affine_shape=True)


# The camera-free motion masks (`ColmapFlowBackend._feature_masks`): RANSAC fits a fundamental
# matrix to at least this many flow samples, at most about this many, to this tolerance (px at flow
# scale), and only where at least this fraction of the frame has consistent flow on texture: below
# it (wide baselines, no texture) the flow that passes is too little to tell the scene from a mover,
# and RANSAC runs all its iterations for nothing (about 0.1 s a pair). A fit counts only when at
# least _MIN_INLIER_RATIO of the samples agree with it: the test needs a rigid majority. Measured
# between SfM neighbours (2026-12-06): clean clips with a moving subject 0.74-0.96 (backpack, bear,
# the six-mover render), their 3 px jitters 0.47-0.83 and 8 px jitters 0.33-0.61, the low-texture
# kitchen capture 0.49-0.73 and the 8-frame statue 0.37-0.62: there the test would only take
# corruption and flow noise for movers (kitchen's 8 px jitter scored better than the clean capture).
_MIN_FIT_POINTS, _MAX_FIT_POINTS, _FIT_RANSAC_PX, _MIN_FIT_FRACTION, _MIN_INLIER_RATIO = 50, 1000, 0.5, 0.1, 0.7
# Two-view geometries that a homography explains as well as a fundamental matrix (COLMAP's classes).
_HOMOGRAPHY_CONFIGS = {
    int(pycolmap.TwoViewGeometryConfiguration.PLANAR),
    int(pycolmap.TwoViewGeometryConfiguration.PANORAMIC),
    int(pycolmap.TwoViewGeometryConfiguration.PLANAR_OR_PANORAMIC),
}
# A turning camera is also fitted where SfM found cameras when at least this fraction of the
# verified pairs is homography-like (bear, the pans: all of them; syn-slow 86%; backpack 43%).
_HOMOGRAPHY_MAJORITY = 0.5
# The fundamental matrix a turning camera's fit is compared with (`ColmapFlowBackend._turning`):
# RANSAC's tolerance, px at flow scale.
_TURNING_FIT_PX = 1.0


@dataclass
class Cameras:
    K: np.ndarray  # (3, 3) shared intrinsics
    poses: dict[int, Tensor]  # frame position -> (4, 4) float64 world-to-camera, registered frames only
    scene_depth: dict[int, float]  # frame position -> median depth of its SfM points (picks neighbours)
    # frame position -> (n, 3) float64 rows (u, v, z): its SfM points' pixels (our convention) and camera depths
    observations: dict[int, np.ndarray] = field(default_factory=dict)
    # seconds of each SfM step that ran: "masks", "fast", then "dense", "sparse" or "relaxed" (see ColmapFlowBackend.cameras)
    passes: dict[str, float] = field(default_factory=dict)
    # fraction of the verified image pairs that COLMAP found a homography explains as well as a
    # fundamental matrix (planar or panoramic): most of them on pans, few where the camera travels
    homography_pairs: float = 0.0

    def timings(self) -> dict[str, float]:
        """Seconds per SfM step, as a backend's timings (`sfm_masks`, `sfm_fast`, `sfm_dense`, `sfm_sparse`, `sfm_relaxed`)."""
        return {f"sfm_{name}": seconds for name, seconds in self.passes.items()}


class ColmapFlowBackend(GeometryBackend):
    """Weight-free geometry from pycolmap SfM and DIS optical-flow triangulation.

    Args:
        min_angle_deg: smallest triangulation angle (degrees) for a flow depth to count.
        fb_tolerance: forward-backward flow tolerance as a fraction of the image's long side.
        flow_max_side: optical flow runs on frames downscaled to this long side (px) and is
            upsampled for triangulation at full resolution (4x fewer pixels at 720 px).
        sfm_frames: frames that the fast structure-from-motion pass uses: the scored ones, filled up
            evenly to this many (`common.video.evenly_filled`).
        min_registered: fraction of the scored frames the fast SfM pass must register; below it,
            the denser pass runs once.
        moving_px: a pixel whose flow misses its epipolar line by more than this (at 720 px; scaled
            with the frame size), and by more than `moving_ratio` times the frame's median miss,
            is moving.
        min_blob: smallest moving blob, as a fraction of the frame.
        moving_fb: a pixel can only be moving where its flow is forward-backward consistent to
            this many times `fb_tolerance` (flow that fails on wide baselines is not motion).
        focal_rule: when a self-calibrated focal length is kept rather than COLMAP's prior (1.2 x
            the long side, about 45 degrees): see `FocalRule`.
        neighbour_angle_deg: the parallax (degrees, over the scene depth) a triangulation neighbour
            must reach; the closest frame on each side that reaches it is taken. Wider baselines
            lower the depth noise of slow cameras (measured on the validity benchmark, issue 9).
        dense_frames: evenly spaced frames the dense second pass uses (all of them when there
            are fewer), plus any scored frame they miss.
        dense_match_budget: the dense second pass runs only when the fast pass's verified
            matches, scaled to the dense pass's frames and pixels, are at most this many: its
            mapping's cost grows with them (the kitchen capture: 2,100, a 6 s pass; a forward
            dolly at 320 px: 19,600, 6 s; the textured bear clip: about 57,000, where a dense pass on
            its frames took 55-120 s).
        relaxed_ransac_px: RANSAC tolerance (px at 480 px) of the second pass of a clip that matched
            too much for the dense pass (COLMAP's default is 4).
        min_texture: a pixel gets depth only where the frame's gradient energy at flow scale (the
            sum of the structure tensor's eigenvalues over a 7 px window, grey levels in [0, 1];
            `_texture`) reaches this. Optical flow on a smooth surface is the smoothness prior's
            interpolation, not a measurement: its depth is noise that scores like inconsistency
            (docs/backends.md, "No depth without texture"). 0 keeps every pixel.
        mask_moving_features: find moving things before the cameras, from each SfM frame's flow to
            its SfM neighbours against a fundamental matrix fitted to it, and keep them out of the
            SfM features (`_feature_masks`). False: the cameras see every pixel. (What the error
            leaves out is the depth stage's moving-thing mask, `_moving`, either way.)
        sweep_above_deg: a frame's depth from a neighbour whose view is turned more than this
            (degrees) comes from a plane sweep (`_Sweeps`), not optical flow: flow between views
            that far apart keeps almost nothing (a 45 degree orbit: 1% of the frame). None: flow
            always (revision 5's depth).
        sweep_margin: the sweep covers the frame's SfM depths (2nd to 98th percentile) widened by
            this factor on each side.
        sweep_min_ncc: a swept depth counts where its window's normalised cross-correlation
            reaches this.
        sweep_check_px: the left-right check of a swept depth: frame j's sweep must send the
            point back to within this many pixels (at flow scale).
        match_brightness: optical flow between two frames first scales the second to the first's
            mean grey level (`_Flows`): exposure that changes from frame to frame is not motion.
        turning: where SfM registers no scored frame, fit a camera that turns in place (one focal,
            a rotation per scored frame: `common.geometry.turning`) to the flow between the scored
            frames; where it explains the flow, the video is scored by it. Where SfM found cameras
            and most verified pairs are planar or panoramic, it is offered as an alternative
            interpretation (`SceneGeometry.alternative`). False: revision 9's cameras only.
        turning_floor_px, turning_ratio: it explains the flow when the median transfer error is at
            most `turning_floor_px` (px at 360 px: flow noise), or at most `turning_ratio` times
            the epipolar miss of a fundamental matrix fitted to the same flow (parallax would
            fit that and not a rotation).
    """

    name = "colmap-flow"
    # 2: the second SfM pass chosen by the fast pass's matches (dense at 720 px, or relaxed RANSAC).
    # 3: DSP-SIFT features in the fast pass.
    # 4: no depth where the frame has no texture (`min_texture`).
    # 5: moving things found before the cameras get no SfM features (`mask_moving_features`).
    # 6: sparse captures: affine-covariant SIFT in the second SfM pass (SPARSE), plane-sweep depth
    #    between views turned more than `sweep_above_deg` apart.
    # 7: the fast pass's frames: the scored ones filled up evenly to `sfm_frames` (16 of a 49-frame
    #    clip, not their union with 16 evenly spaced ones: 22).
    # 8: optical flow between brightness-matched frames (`match_brightness`); the SfM pass's
    #    motion masks use that flow too.
    # 10: a camera that turns in place (a tripod pan: no parallax) fitted to the flow
    #     (`common.geometry.turning`): it scores the video where SfM found no camera (such videos
    #     were unscorable), and is offered beside SfM's cameras where most pairs look like a pan.
    revision = 10
    # The revision of `cameras` alone (the hybrid backend's part of its metric_id): 4 changed the
    # depth only, 5, 6, 7, 8 and 9 the cameras.
    cameras_revision = 9

    def __init__(
        self,
        min_angle_deg: float = 0.05,
        fb_tolerance: float = 0.003,
        flow_max_side: int = 360,
        sfm_frames: int = 16,
        min_registered: float = 0.8,
        moving_px: float = 8.0,
        moving_ratio: float = 6.0,
        min_blob: float = 0.005,
        moving_fb: float = 3.0,
        focal_rule: Optional["FocalRule"] = None,
        neighbour_angle_deg: float = 1.5,
        dense_frames: int = 25,
        dense_match_budget: int = 30_000,
        relaxed_ransac_px: float = 8.0,
        min_texture: float = 1e-4,
        mask_moving_features: bool = True,
        sweep_above_deg: Optional[float] = 30.0,
        sweep_margin: float = 1.5,
        sweep_min_ncc: float = 0.6,
        sweep_check_px: float = 3.0,
        match_brightness: bool = True,
        turning: bool = True,
        turning_floor_px: float = 0.5,
        turning_ratio: float = 3.0,
    ) -> None:
        self.turning = turning
        self.turning_floor_px = turning_floor_px
        self.turning_ratio = turning_ratio
        self.match_brightness = match_brightness
        self.sweep_check_px = sweep_check_px
        self.sweep_above_deg = sweep_above_deg
        self.sweep_margin = sweep_margin
        self.sweep_min_ncc = sweep_min_ncc
        self.mask_moving_features = mask_moving_features
        self.min_texture = min_texture
        self.dense_frames = dense_frames
        self.dense_match_budget = dense_match_budget
        self.relaxed_ransac_px = relaxed_ransac_px
        self.neighbour_angle_deg = neighbour_angle_deg
        self.focal_rule = focal_rule or FocalRule()
        self.moving_fb = moving_fb
        self.min_blob = min_blob
        self.sfm_frames = sfm_frames
        self.min_registered = min_registered
        self.min_angle_deg = min_angle_deg
        self.flow_max_side = flow_max_side
        self.fb_tolerance = fb_tolerance
        self.moving_px = moving_px
        self.moving_ratio = moving_ratio

    def reconstruct(self, frames: Tensor, scored: Sequence[int], video_indices: Sequence[int]) -> SceneGeometry:
        flows = self._flows(frames)
        # The turning fit is asked for on most slow clips (pairs that look like a pan); where two
        # CPUs are allowed it runs beside SfM's matching and mapping, which keep one core busy. It
        # is finished before this returns, also where it was not asked for: no work outlives a call.
        fitted = Prefetch(partial(self._turning, flows, scored), background=self.turning and cpu_workers() > 1)
        try:
            return self._reconstruct(frames, scored, flows, fitted)
        finally:
            fitted.join()

    def _reconstruct(self, frames: Tensor, scored: Sequence[int], flows: "_Flows", fitted: Prefetch[Optional[TurningFit]]) -> SceneGeometry:
        timings: dict[str, float] = {}
        M, H, W, _ = frames.shape
        start = time.perf_counter()

        def turns_in_place() -> bool:  # asked where SfM found no camera, or most pairs look like a pan
            if not self.turning:
                return False
            started = time.perf_counter()
            fit = fitted.get()  # computed once
            timings.setdefault("turning", time.perf_counter() - started)  # the wait, where it ran beside SfM
            return fit is not None and fit.explains(self._turning_floor(flows), self.turning_ratio)

        # Both SfM passes run as before, also where a turning camera would explain the video: a
        # pan that travels a little (bear's first 49 frames, re-encoded) registered in the second
        # pass, and judged turning in place it was "static" (its turn alone is below min_motion).
        cameras = self.cameras(frames, scored, flows, single_threaded=fitted.start)
        timings["sfm"] = time.perf_counter() - start
        timings.update(cameras.timings())
        K, world_to_cam, registered_set = cameras.K, cameras.poses, set(cameras.poses)
        if not registered_set:
            if not turns_in_place():
                either = ", and a camera turning in place does not explain the flow either" if self.turning else ""
                raise ReconstructionFailed(
                    f"structure-from-motion found no consistent cameras{either} (static camera, no parallax or no texture?)"
                )
            return self._turning_geometry(flows, scored, fitted.get(), timings)

        start = time.perf_counter()
        sweeps = _Sweeps(flows, cameras, self.sweep_margin, self.sweep_min_ncc, self.sweep_check_px)
        T = len(scored)
        depth = torch.zeros(T, H, W)
        confidence = torch.zeros(T, H, W)
        moving = torch.zeros(T, H, W, dtype=torch.bool)
        registered = torch.tensor([i in registered_set for i in scored])
        poses = torch.eye(4, dtype=torch.float64).repeat(T, 1, 1)

        def depths_from_neighbours(i: int) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
            neighbours = self._neighbours(i, registered_set, world_to_cam, cameras.scene_depth)
            return i, [self._pair_depth(flows, sweeps, cameras, i, j) for j in neighbours]

        # Each frame's depths from its neighbours are its own (the flow and sweep caches compute
        # each entry once), so two frames are worked on at once where two CPUs are allowed; they
        # are fused in order as they come, the same as one by one.
        position = {i: t for t, i in enumerate(scored)}
        for i, pair_depths in ordered_map(depths_from_neighbours, [i for i in scored if i in registered_set], cpu_workers()):
            t = position[i]
            poses[t] = world_to_cam[i]
            estimates = [depth for depth, _ in pair_depths]
            misses = [miss for _, miss in pair_depths]
            if estimates:
                # Moving only where every neighbour agrees: one pair's flow can fail on its own
                # (wide baselines, low texture), a thing that moves misses both pairs' lines.
                agreed = np.minimum.reduce([np.nan_to_num(m, nan=0.0) for m in misses]) if len(misses) > 1 else misses[0]
                moving[t] = torch.from_numpy(self._moving(agreed, max(H, W)))
                stack = torch.from_numpy(np.stack(estimates))  # (n, H, W), NaN where invalid
                stack[:, moving[t]] = float("nan")  # a moving thing has no depth in a rigid scene
                stack[:, ~self._textured(flows.texture(i), H, W)] = float("nan")  # flow there is interpolated
                valid = ~torch.isnan(stack)
                depth[t] = torch.nan_to_num(stack.nanmedian(dim=0).values, nan=0.0).float()
                confidence[t] = valid.float().sum(0) / max(len(pair_depths), 2)
        timings["flow_depth"] = time.perf_counter() - start
        # SfM also "registers" many pure pans, with cameras that travel and the prior's focal (the
        # renderer's pan with movers: 0.133; turning in place: 0.094). Where most pairs are
        # homography-like to COLMAP, and a turning camera explains the flow, both interpretations
        # go to the scorer, which keeps the one that reprojects better (a pan that also travels,
        # like the bear clip, keeps its parallax: 0.151 against 0.209 turning).
        alternative = None
        if self.turning and cameras.homography_pairs >= _HOMOGRAPHY_MAJORITY and turns_in_place():
            alternative = self._turning_geometry(flows, scored, fitted.get(), {})
        return SceneGeometry(
            depth=depth,
            confidence=confidence,
            K=torch.from_numpy(K).expand(T, 3, 3).clone(),
            world_to_cam=poses,
            registered=registered,
            moving=moving,
            timings_s=timings,
            alternative=alternative,
        )

    # --- a camera that turns in place ----------------------------------------------------------

    def _turning(self, flows: "_Flows", scored: Sequence[int]) -> Optional[TurningFit]:
        """The turning camera (`common.geometry.turning`) fitted to the flow between the scored
        frames (None: no flow to fit); whether it explains the video is the caller's test.

        The chain is the flow between consecutive scored frames; the pairs two and three apart pin
        the focal. Each chain pair's epipolar miss under a fundamental matrix fitted to its flow
        (no rigid-majority requirement: a corrupted pan fits it as badly as it fits the rotation)
        is what the rotation's own miss is compared with.
        """
        tolerance = self.fb_tolerance * max(flows.size)
        positions = sorted(scored)
        pairs, fundamental_miss = [], {}
        for stride in (1, 2, 3):
            for i, j in zip(positions, positions[stride:]):
                ends = _FlowEnds(flows.small(i, j), flows.small(j, i))
                sample = ends.consistent(tolerance) & (flows.texture(i) >= self.min_texture)
                if int(sample.sum()) < max(_MIN_FIT_POINTS, _MIN_FIT_FRACTION * sample.size):
                    continue
                source, target = ends.grid_sample(sample, _MAX_FIT_POINTS)
                pairs.append(PairFlow(i, j, source, target))
                if stride == 1:
                    F, _ = cv2.findFundamentalMat(source, target, cv2.FM_RANSAC, _TURNING_FIT_PX, 0.999, 1000)
                    if F is not None and F.shape == (3, 3):
                        fundamental_miss[(i, j)] = float(np.nanmedian(ends.epipolar_miss(F)[sample]))
        return fit_turning(pairs, positions, (flows.size[1], flows.size[0]), FocalRule.prior(flows.size), fundamental_miss)

    def _turning_floor(self, flows: "_Flows") -> float:
        """`turning_floor_px` (at 360 px) in pixels of the flow's frames."""
        return self.turning_floor_px * max(flows.size) / 360

    def _turning_geometry(self, flows: "_Flows", scored: Sequence[int], fit: TurningFit, timings: dict) -> SceneGeometry:
        """Scene geometry of a turning camera: every pixel at depth 1 (any depth reprojects the same
        with no translation), cameras that only turn, and moving things where the flow to both chain
        neighbours misses the rotation's homography (the tests of `_moving`, with the transfer error
        in place of the epipolar miss: with no parallax, motion in any direction shows)."""
        T, H, W = len(scored), flows.height, flows.width
        h, w = flows.size[1], flows.size[0]
        K = rescale_intrinsics(torch.from_numpy(fit.K), (h, w), (H, W), pixel_centre=0.0)
        chain = sorted(fit.rotations)
        poses = torch.eye(4, dtype=torch.float64).repeat(T, 1, 1)
        moving = torch.zeros(T, H, W, dtype=torch.bool)
        registered = torch.zeros(T, dtype=torch.bool)
        tolerance = self.moving_fb * self.fb_tolerance * max(flows.size)
        for t, i in enumerate(scored):
            if i not in fit.rotations:
                continue
            registered[t] = True
            poses[t, :3, :3] = torch.from_numpy(fit.rotations[i])
            k = chain.index(i)
            misses = []
            for j in chain[max(0, k - 1): k] + chain[k + 1: k + 2]:
                ends = _FlowEnds(flows.small(i, j), flows.small(j, i))
                predicted = transfer(fit.homography(i, j), np.stack([ends.u.ravel(), ends.v.ravel()], axis=1))
                miss = np.hypot(ends.u2.ravel() - predicted[:, 0], ends.v2.ravel() - predicted[:, 1]).reshape(h, w)
                miss = np.where(ends.consistent(tolerance), miss * (W / w), np.nan).astype(np.float32)
                misses.append(cv2.resize(miss, (W, H), interpolation=cv2.INTER_NEAREST))
            agreed = np.minimum.reduce([np.nan_to_num(m, nan=0.0) for m in misses]) if len(misses) > 1 else misses[0]
            moving[t] = torch.from_numpy(self._moving(agreed, max(H, W)))
        return SceneGeometry(
            depth=registered.view(T, 1, 1).float().expand(T, H, W).clone(),
            confidence=registered.view(T, 1, 1).float().expand(T, H, W).clone(),
            K=K.expand(T, 3, 3).clone(),
            world_to_cam=poses,
            registered=registered,
            moving=moving,
            timings_s=timings,
            turning=True,
        )

    def _flows(self, frames: Tensor) -> "_Flows":
        """A new flow cache for `frames` (M, H, W, 3) uint8 with this backend's flow settings."""
        return _Flows(frames, self.flow_max_side, self.match_brightness)

    def _textured(self, energy: np.ndarray, height: int, width: int) -> Tensor:
        """(h, w) gradient energy of a frame at flow scale (`_texture`) -> (H, W) bool: where its flow can be measured."""
        if self.min_texture <= 0:
            return torch.ones(height, width, dtype=torch.bool)
        if energy.shape != (height, width):
            energy = cv2.resize(energy, (width, height), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(energy >= self.min_texture)

    def _moving(self, miss: np.ndarray, long_side: int) -> np.ndarray:
        """(H, W) epipolar miss in px (NaN: no flow) -> (H, W) bool mask of moving things.

        A rigid scene's flow lies on its epipolar lines up to flow noise. Things that move on
        their own miss them by far more than the frame's typical miss; a geometric corruption of
        the whole frame (jitter, drift) raises the typical miss too, so it is not taken for
        motion. Sizeable blobs only (at least `min_blob` of the frame; flow failures are
        speckled), grown by a margin for their outlines.
        """
        known = miss[np.isfinite(miss)]
        if known.size == 0:
            return np.zeros(miss.shape, dtype=bool)
        threshold = max(self.moving_px * long_side / 720, self.moving_ratio * float(np.median(known)))
        mask = (np.nan_to_num(miss, nan=0.0) > threshold).astype(np.uint8)
        size = max(3, round(long_side / 144)) | 1  # 5 px at 720
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        big = stats[:, cv2.CC_STAT_AREA] >= self.min_blob * mask.size
        big[0] = False  # label 0 is the background
        mask = big[labels].astype(np.uint8)
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3 * size, 3 * size)))
        return mask.astype(bool)

    # --- 1. cameras -----------------------------------------------------------------------------

    def cameras(
        self, frames: Tensor, scored: Sequence[int], flows: Optional["_Flows"] = None,
        single_threaded: Optional[Callable[[], None]] = None,
    ) -> Cameras:
        """SfM cameras of `frames` (M, H, W, 3) uint8, keyed by position in `frames`.

        One fast pass on `sfm_frames` of them (the scored ones among them). When it registers fewer
        than `min_registered` of the scored frames, one second pass, chosen by how much the fast
        pass matched so that its cost stays bounded (`_second_pass`), and the better of the two.
        Things found moving before any camera exists (`_feature_masks`) get no SfM features.
        flows: the video's flow cache, shared with the depth stage (a new one when None).
        single_threaded: called once the fast pass's features are extracted, when COLMAP goes on
        with one thread (matching, mapping): a cue to start other work on the idle core.
        Also used by the hybrid backend (`common.geometry.hybrid`).
        """
        flows = flows or self._flows(frames)
        subset = evenly_filled(len(frames), scored, self.sfm_frames)
        with tempfile.TemporaryDirectory(prefix="vgpa-sfm-") as tmp:
            start = time.perf_counter()
            masks = self._feature_masks(flows, subset)
            passes = {"masks": time.perf_counter() - start}
            start = time.perf_counter()
            fast = _Workspace(Path(tmp) / "fast", frames, FAST, subset, masks, extracted=single_threaded)
            cameras = fast.cameras(self.focal_rule)
            passes["fast"] = time.perf_counter() - start
            registered = sum(i in cameras.poses for i in scored)
            if registered < self.min_registered * len(scored):
                start = time.perf_counter()
                name, second = self._second_pass(fast, frames, scored, Path(tmp) / "dense", flows)
                passes[name] = time.perf_counter() - start
                if sum(i in second.poses for i in scored) > registered:
                    cameras = second
        cameras.passes = passes
        return cameras

    def _second_pass(
        self, fast: "_Workspace", frames: Tensor, scored: Sequence[int], folder: Path, flows: Optional["_Flows"] = None
    ) -> tuple[str, Cameras]:
        """("dense", "sparse" or "relaxed", its cameras): a second, bounded attempt after the fast
        pass registered too few of the scored frames.

        Few matches per frame (wide baselines, low texture: the kitchen capture's fast pass keeps
        about 37 per frame) -> "dense": SIFT at 720 px (from the upsampled octave for smaller
        frames) with more features, on `dense_frames` evenly spaced frames plus the scored ones,
        every pair matched up to 25. Its mapping's cost grows with the matches it finds, so it
        runs only when the fast pass's matches, scaled to the dense pass's frames and pixels,
        stay under `dense_match_budget`. A sparse capture (at most SPARSE.exhaustive_up_to frames,
        views often 30-90 degrees apart) gets "sparse" instead: affine-covariant SIFT (SPARSE).
        Many matches and still too few cameras (a jittering copy of a textured clip: about 900
        per frame) -> "relaxed": the fast pass's matches verified
        again to `relaxed_ransac_px` and mapped again with the focal fixed; its views do not fit
        one two-view geometry to COLMAP's 4 px, and more features would only make a slow pass
        slower. The choice depends on the input only, so a video always gets the same cameras.
        """
        long_side = max(frames.shape[1:3])
        positions = sorted(set(uniform_indices(len(frames), self.dense_frames)) | set(scored))
        if len(positions) <= SPARSE.exhaustive_up_to:
            name, settings = "sparse", SPARSE
        else:
            name, settings = "dense", DENSE if long_side >= DENSE.max_side else replace(DENSE, first_octave=-1)
        side = min(settings.max_side, long_side) * (2 if settings.first_octave < 0 else 1)
        scale = len(positions) / len(fast.positions) * (side / min(FAST.max_side, long_side)) ** 2
        predicted = fast.inlier_matches() * scale
        if predicted <= self.dense_match_budget:
            masks = self._feature_masks(flows or self._flows(frames), positions)
            return name, _Workspace(folder, frames, settings, positions, masks).cameras(self.focal_rule)
        fast.verify_again(self.relaxed_ransac_px)
        # Views that agree only to the relaxed tolerance are the worst ones to self-calibrate from
        # (and a mapping costs seconds on such clips): the focal is fixed at the prior.
        return "relaxed", fast.cameras(None)

    def _feature_masks(self, flows: "_Flows", positions: Sequence[int]) -> dict[int, np.ndarray]:
        """Moving things found before any camera exists: position -> (h, w) bool at flow scale
        (positions where nothing was found are left out).

        SfM features on a moving thing (an animal, a person, a vehicle) are matched like the
        static scene's, and with a slow camera they pass two-view verification and pull the
        cameras with them: on a slow generated-style clip with six sliding boxes (about 6% of the
        pixels) the clean score rose from 0.094 (no movers) to 0.162; with the movers' true
        pixels kept out of the features it was 0.106, with these masks 0.106 (docs/backends.md,
        "Moving things before the cameras"). Each SfM frame's flow to two SfM neighbours (the
        previous and the next one, at an end the two nearest) is tested against a fundamental
        matrix that RANSAC fits to that flow; pixels that miss its epipolar lines in both pairs, by the thresholds and blob rules of
        the depth stage's moving-thing mask (`_moving`), get no features. A frame is tested only
        when both fits hold for a rigid majority of the flow (`_MIN_INLIER_RATIO`); otherwise (a
        corrupted copy, noisy flow on low texture) it keeps every feature, as before revision 5.
        """
        if not self.mask_moving_features:
            return {}
        order = sorted(positions)
        masks: dict[int, np.ndarray] = {}
        fits: dict[tuple[int, int], Optional[np.ndarray]] = {}  # (i, j) -> F of the flow i -> j, fitted once a pair
        for k, i in enumerate(order):
            # The previous and the next SfM frame; at an end, the two nearest on the side there is:
            # one pair alone takes a wrong but consistent flow (repeated texture) for motion.
            nearest = sorted((m for m in range(len(order)) if m != k), key=lambda m: (abs(m - k), m))[:2]
            partners = [order[m] for m in nearest]
            misses = [self._camera_free_miss(flows, i, j, fits) for j in partners]
            if len(misses) < 2 or any(miss is None for miss in misses):
                continue  # both pairs must fit one rigid motion: one pair alone takes flow failures for motion
            agreed = np.minimum.reduce([np.nan_to_num(m, nan=0.0) for m in misses])
            mask = self._moving(agreed, max(flows.size))
            if mask.any():
                masks[i] = mask
        return masks

    def _camera_free_miss(
        self, flows: "_Flows", i: int, j: int, fits: dict[tuple[int, int], Optional[np.ndarray]]
    ) -> Optional[np.ndarray]:
        """(h, w) epipolar miss (px at flow scale) of the flow i -> j against a fundamental matrix
        fitted to it; NaN where the flow is not roughly forward-backward consistent. None when too
        little of the flow is consistent to fit one (a wide baseline, no texture).

        fits: matrices fitted so far; the pair's other direction reuses its transpose (RANSAC is
        most of this step's cost: up to 0.1 s a pair on a corrupted video, whose inliers are few).
        """
        ends = _FlowEnds(flows.small(i, j), flows.small(j, i))
        tolerance = self.fb_tolerance * max(flows.size)
        if (j, i) in fits:
            F = None if fits[(j, i)] is None else fits[(j, i)].T
        else:
            F = fits[(i, j)] = self._fit_fundamental(ends, ends.consistent(tolerance) & (flows.texture(i) >= self.min_texture))
        if F is None:
            return None
        return np.where(ends.consistent(self.moving_fb * tolerance), ends.epipolar_miss(F), np.nan).astype(np.float32)

    @staticmethod
    def _fit_fundamental(ends: "_FlowEnds", sample: np.ndarray) -> Optional[np.ndarray]:
        """F (3, 3) with x_j^T F x_i = 0 fitted by RANSAC to the flow `ends` at the (h, w) bool
        `sample` pixels; None when they cover too little of the frame or too few of them agree
        with one rigid motion (`_MIN_INLIER_RATIO`)."""
        if int(sample.sum()) < max(_MIN_FIT_POINTS, _MIN_FIT_FRACTION * sample.size):
            return None
        source, target = ends.grid_sample(sample, _MAX_FIT_POINTS)
        if len(source) < _MIN_FIT_POINTS:
            return None
        # OpenCV's RANSAC draws from a generator of fixed seed: the same flow gives the same matrix.
        F, inliers = cv2.findFundamentalMat(source, target, cv2.FM_RANSAC, _FIT_RANSAC_PX, 0.999, 1000)
        if F is None or F.shape != (3, 3) or float(inliers.mean()) < _MIN_INLIER_RATIO:
            return None
        return F

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
                if math.degrees(math.atan2(baseline, depth)) >= self.neighbour_angle_deg:
                    break
            if pick is not None:
                chosen.append(pick)
        if len(chosen) < 2:  # at an end of the video: take a second one from the side that has frames
            others = sorted((j for j in registered if j != i and j not in chosen), key=lambda j: abs(j - i))
            for j in others[: 2 - len(chosen)]:
                chosen.append(j)
        return chosen

    def _pair_depth(
        self, flows: "_Flows", sweeps: "_Sweeps", cameras: Cameras, i: int, j: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Depth (H, W) of frame i from frame j (NaN where unknown) and the epipolar miss of its
        flow (px; NaN where not measured): from optical flow, unless the views turn too far apart
        for it (`sweep_above_deg`): then from a plane sweep (no miss: motion is not judged there)."""
        pose_i, pose_j = cameras.poses[i], cameras.poses[j]
        R, _ = _relative_pose(pose_i, pose_j)
        if self.sweep_above_deg is not None and math.degrees(float(rotation_angle(torch.from_numpy(R)))) > self.sweep_above_deg:
            depth = sweeps.depth(i, j)
            if depth is not None:
                return depth, np.full(depth.shape, np.nan, np.float32)
        return self._triangulate(flows.full(i, j), flows.full(j, i), cameras.K, pose_i, pose_j)

    def _triangulate(
        self, flow_ij: np.ndarray, flow_ji: np.ndarray, K: np.ndarray, pose_i: Tensor, pose_j: Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """Depth (H, W) of frame i from its flow to frame j, NaN where a check fails; and the
        epipolar miss (H, W) in pixels of each flow end point (NaN where the flow is not even roughly
        consistent).

        Midpoint triangulation of the rays through pixel x in frame i and x + flow in frame j.
        Vectors are kept as planar (H, W) float32 components: numpy's reductions over a last
        axis of size 3 are several times slower than the same arithmetic written out.
        """
        H, W = flow_ij.shape[:2]
        ends = _FlowEnds(flow_ij, flow_ji)
        u, v, u2, v2 = ends.u, ends.v, ends.u2, ends.v2
        tolerance = self.fb_tolerance * max(H, W)
        consistent = ends.consistent(tolerance)
        # Motion is judged on a looser check: a moving thing's flow is rarely sub-pixel consistent
        # (it deforms, it is occluded at its edges), but it is consistent to a few pixels.
        roughly_consistent = ends.consistent(self.moving_fb * tolerance)

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
        # Epipolar line of pixel (u, v) in frame j: F x with F = K^-T [t]x R K^-1 (i -> j).
        R, tr = _relative_pose(pose_i, pose_j)
        cross = np.array([[0, -tr[2], tr[1]], [tr[2], 0, -tr[0]], [-tr[1], tr[0], 0]])
        miss = ends.epipolar_miss(K_inv.T @ cross @ R @ K_inv)
        return np.where(valid, depth_i, np.nan).astype(np.float32), np.where(roughly_consistent, miss, np.nan).astype(np.float32)


class _Workspace:
    """One SfM attempt's folder: `positions` of the frames at the settings' size, their SIFT
    features and verified matches; `cameras` maps them (and may be called again after
    `verify_again`). COLMAP runs on one thread with fixed seeds (see FAST)."""

    def __init__(
        self, folder: Path, frames: Tensor, settings: SfmSettings, positions: Sequence[int],
        masks: Optional[dict[int, np.ndarray]] = None, extracted: Optional[Callable[[], None]] = None,
    ) -> None:
        self.folder, self.positions = folder, list(positions)
        self.images, self.database = folder / "images", folder / "database.db"
        self.images.mkdir(parents=True)
        H, W = frames.shape[1:3]
        self.scale = min(1.0, settings.max_side / max(H, W))
        self.size = (max(16, round(W * self.scale)), max(16, round(H * self.scale)))
        self._mappings = 0
        pycolmap.set_random_seed(0)
        for i in self.positions:
            frame = frames[i].numpy()
            if self.size != (W, H):
                frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
            # BMP: no compression library involved, the fastest round trip to COLMAP's reader.
            cv2.imwrite(str(self.images / f"{i:06d}.bmp"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        reader = pycolmap.ImageReaderOptions(camera_model=settings.camera_model)
        if masks:  # COLMAP extracts no features where an image's mask (its name + ".png") is 0
            reader.mask_path = str(folder / "masks")
            (folder / "masks").mkdir()
            for i in self.positions:
                keep = np.full((self.size[1], self.size[0]), 255, np.uint8)
                if i in masks:
                    keep[cv2.resize(masks[i].astype(np.uint8), self.size, interpolation=cv2.INTER_NEAREST) > 0] = 0
                cv2.imwrite(str(folder / "masks" / f"{i:06d}.bmp.png"), keep)
        extraction = pycolmap.FeatureExtractionOptions()
        extraction.sift.first_octave = settings.first_octave
        extraction.sift.max_num_features = settings.max_features
        extraction.sift.domain_size_pooling = settings.domain_size_pooling
        extraction.sift.estimate_affine_shape = settings.affine_shape
        # One thread per extraction too: with COLMAP's own two threads, the fast pass's features gave
        # another score from run to run on the statue capture's 6 px drift (0.2768, 0.2767; one
        # thread 0.2738 every time). `_extract` runs one-thread extractions side by side instead.
        extraction.num_threads = 1
        self._extract(reader, extraction)
        if extracted is not None:
            extracted()
        matching = pycolmap.FeatureMatchingOptions()
        matching.num_threads = 1
        if len(self.positions) <= settings.exhaustive_up_to:
            pycolmap.match_exhaustive(self.database, matching_options=matching, device=pycolmap.Device.cpu)
        else:
            pairing = pycolmap.SequentialPairingOptions(overlap=settings.overlap, quadratic_overlap=True)
            pycolmap.match_sequential(self.database, matching_options=matching, pairing_options=pairing, device=pycolmap.Device.cpu)

    def _extract(self, reader: "pycolmap.ImageReaderOptions", extraction: "pycolmap.FeatureExtractionOptions") -> None:
        """SIFT features of every image into the workspace's database, on `cpu_workers()` threads.

        COLMAP extracts on one thread (see FAST), and SIFT takes about half of a fast pass. Each
        image's features do not depend on the others, so parts of the images are extracted at once
        into databases of their own (COLMAP releases the GIL; one SQLite file takes one writer) and
        copied into the workspace's, whose cameras, rigs, frames and images `import_images` wrote
        as `extract_features` would have: the database, and every score, is the same for any
        number of workers. (Not COLMAP's own extraction threads: see the comment in `__init__`.)
        """
        names = [f"{i:06d}.bmp" for i in self.positions]
        extract = partial(pycolmap.extract_features, camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
                          extraction_options=extraction, device=pycolmap.Device.cpu)
        workers = min(cpu_workers(), len(names) // 2)
        if workers < 2:
            extract(self.database, self.images, image_names=names)
            return
        pycolmap.Database.open(self.database).close()  # import_images wants the file to exist
        pycolmap.import_images(self.database, self.images, camera_mode=pycolmap.CameraMode.SINGLE, image_names=names, options=reader)
        parts = [(self.folder / f"features{k}.db", names[k::workers]) for k in range(workers)]
        list(ordered_map(lambda part: extract(part[0], self.images, image_names=part[1]), parts, workers))
        target = pycolmap.Database.open(self.database)
        try:
            for path, _ in parts:
                source = pycolmap.Database.open(path)
                try:
                    for image in source.read_all_images():
                        image_id = target.read_image_with_name(image.name).image_id
                        target.write_keypoints(image_id, source.read_keypoints(image.image_id))
                        target.write_descriptors(image_id, source.read_descriptors(image.image_id))
                finally:
                    source.close()
        finally:
            target.close()

    def inlier_matches(self) -> int:
        """Geometrically verified matches over all pairs (what global mapping's cost grows with)."""
        database = pycolmap.Database.open(self.database)
        try:
            return int(database.num_inlier_matches())
        finally:
            database.close()

    def verify_again(self, ransac_px: float) -> None:
        """Replace the pairs' two-view geometries with ones verified to `ransac_px` (SfM pixels)."""
        database = pycolmap.Database.open(self.database)
        try:
            database.clear_two_view_geometries()
        finally:
            database.close()
        two_view = pycolmap.TwoViewGeometryOptions()
        two_view.ransac.max_error = ransac_px
        two_view.ransac.random_seed = 0
        verifier = pycolmap.GeometricVerifierOptions()
        verifier.num_threads = 1
        pycolmap.set_random_seed(0)
        pycolmap.geometric_verification(self.database, verifier_options=verifier, two_view_geometry_options=two_view)

    def cameras(self, focal_rule: Optional[FocalRule]) -> Cameras:
        """Global SfM of the workspace's matches; cameras in the frames' pixels (no poses: none found).

        focal_rule: when the self-calibrated focal length is kept (`FocalRule`); None fixes it at
        COLMAP's prior from the start.
        """
        # The two mappings run one after the other: side by side (threads, a database copy each)
        # the refined one varied from run to run (backpack's 6 px drift: 0.29169, 0.29184, 0.29222).
        model = self._map(refine_focal=focal_rule is not None)
        if focal_rule is not None and model is not None and not focal_rule.near_prior(model, self.size):
            fixed = self._map(refine_focal=False)
            if fixed is not None and not focal_rule.keeps(model, fixed, self.size):
                model = fixed
        if model is None:
            return Cameras(np.eye(3), {}, {})
        camera = next(iter(model.cameras.values()))
        poses = {}
        for image in model.images.values():
            if not image.has_pose:
                continue
            pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
            poses[int(Path(image.name).stem)] = torch.from_numpy(np.vstack([pose.matrix(), [0, 0, 0, 1]]))
        # COLMAP's pixel centres are at +0.5, ours at 0; scale the SfM frames' intrinsics to ours.
        K = camera.calibration_matrix()
        K[:2] /= self.scale
        K[0, 2] -= 0.5
        K[1, 2] -= 0.5
        observations = _point_observations(model, self.scale)
        return Cameras(K, poses, {i: float(np.median(obs[:, 2])) for i, obs in observations.items()}, observations,
                       homography_pairs=self.homography_pairs())

    def homography_pairs(self) -> float:
        """Fraction of the verified pairs (with inliers) whose two-view geometry COLMAP classed as
        planar or panoramic: a homography explains them as well as a fundamental matrix does."""
        with closing(sqlite3.connect(self.database)) as database:
            configs = [row[0] for row in database.execute("SELECT config FROM two_view_geometries WHERE rows > 0")]
        return sum(config in _HOMOGRAPHY_CONFIGS for config in configs) / len(configs) if configs else 0.0

    def _map(self, refine_focal: bool):
        self._mappings += 1
        return _global_mapping(self.database, self.images, self.folder / f"model{self._mappings}", refine_focal)


@dataclass(frozen=True)
class FocalRule:
    """When a self-calibrated focal length is kept instead of COLMAP's prior (1.2 x the long side).

    On pans and slow clips the matches barely constrain the focal, and the one bundle adjustment
    finds follows the video's inconsistency, fitting it by discarding the matches that disagree:
    the bear clip's 6 px drift reached 29 px (a 170-degree field of view, 30% of the observations
    that the prior's model keeps) and scored 2.4x its clean clip; the same drift on the mirrored
    clip reached 1,331 px (64% of them) and scored 14% *better* than its clean clip. Each corrupted
    copy was judged with another camera than its clean clip. The self-calibrated model is kept
    only when

    - it keeps at least `min_kept` of the observations of the same matches mapped with the focal
      fixed at the prior (a real camera's focal fits more of them, or nearly as many: 0.90-1.35 on
      the clean and neutral copies measured; the degenerate ones 0.30-0.70), and
    - its field of view is at least `min_fov_deg` degrees (long side): a narrower one is the
      near-orthographic camera that explains inconsistency away.

    Otherwise the prior's model is used. A focal within `skip_within` of the prior is kept without
    the comparison (it changes nothing, and the second mapping costs 0.03-0.65 s). The mean
    reprojection error was tried as a third test (keep only a focal that fits 5% or 10% better)
    and rejected: with the 200-300 observations of an 8-frame capture it flips between copies of
    one clip. Measured in docs/backends.md, "The focal length the matches demand (revision 9)".
    """

    min_kept: float = 0.8
    min_fov_deg: float = 30.0
    skip_within: float = 0.05

    @staticmethod
    def prior(size: tuple[int, int]) -> float:
        """COLMAP's prior focal (px) for SfM images of size (width, height)."""
        return 1.2 * max(size)

    def near_prior(self, model, size: tuple[int, int]) -> bool:
        return abs(_focal(model) / self.prior(size) - 1) <= self.skip_within

    def keeps(self, calibrated, fixed, size: tuple[int, int]) -> bool:
        """Whether the self-calibrated model `calibrated` is kept rather than `fixed` (focal at the prior)."""
        return _fov_deg(calibrated, size) >= self.min_fov_deg and _observations(calibrated) >= self.min_kept * _observations(fixed)


def _focal(model) -> float:
    return float(next(iter(model.cameras.values())).calibration_matrix()[0, 0])


def _observations(model) -> int:
    return sum(len(point.track.elements) for point in model.points3D.values())


def _global_mapping(database: Path, images: Path, output: Path, refine_focal: bool):
    """Global SfM (GLOMAP) on one thread with fixed seeds; its largest model, or None."""
    output.mkdir()
    mapping = pycolmap.GlobalPipelineOptions()
    mapping.min_model_size = 3
    mapping.num_threads = 1
    mapping.random_seed = 0
    mapping.mapper.num_threads = 1
    mapping.mapper.random_seed = 0
    mapping.mapper.bundle_adjustment.refine_focal_length = refine_focal
    pycolmap.set_random_seed(0)
    models = pycolmap.global_mapping(database, images, output, mapping)
    return max(models.values(), key=lambda m: m.num_reg_images()) if models else None


class _Flows:
    """DIS optical flow between frames of one video, each ordered pair computed once.

    frames: (M, H, W, 3) uint8. Flow runs at `size` (w, h), the frames downscaled to `max_side`:
    `gray(i)` is frame i there (uint8), `texture(i)` its gradient energy, `small(i, j)` the
    (h, w, 2) flow i -> j in its pixels, `full(i, j)` that flow upsampled to (H, W, 2) in pixels of
    the frames. The motion masks of the SfM pass and the depth stage share it.
    match_brightness: frame j is scaled to frame i's mean grey level before the flow i -> j.
    DIS's variational refinement assumes constant brightness; with auto-exposure or flicker
    (+-9% between frames) its flow, and the depth triangulated from it, got noisier: the slow
    synthetic clip's depth then scored 40% worse with the same cameras (docs/backends.md,
    "Exposure (revision 8)").
    """

    def __init__(self, frames: Tensor, max_side: int, match_brightness: bool = True) -> None:
        self.frames = frames
        self.match_brightness = match_brightness
        self.height, self.width = frames.shape[1:3]
        self.size = _flow_size(self.height, self.width, max_side)
        # Each entry computed once, also when the depth stage asks from two threads.
        self._gray: OnceCache[int, np.ndarray] = OnceCache()
        self._texture: OnceCache[int, np.ndarray] = OnceCache()
        self._small: OnceCache[tuple[int, int], np.ndarray] = OnceCache()
        self._full: OnceCache[tuple[int, int], np.ndarray] = OnceCache()
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)  # one per video: not thread-safe,
        self._dis_lock = threading.Lock()  # so one flow at a time

    def gray(self, i: int) -> np.ndarray:
        def compute() -> np.ndarray:
            image = cv2.cvtColor(self.frames[i].numpy(), cv2.COLOR_RGB2GRAY)
            full = (self.width, self.height)
            return cv2.resize(image, self.size, interpolation=cv2.INTER_AREA) if self.size != full else image

        return self._gray.get(i, compute)

    def texture(self, i: int) -> np.ndarray:
        """(h, w) float32 gradient energy of `gray(i)` (`_texture`)."""
        return self._texture.get(i, lambda: _texture(self.gray(i)))

    def small(self, i: int, j: int) -> np.ndarray:
        def compute() -> np.ndarray:
            source, target = self.gray(i), self.gray(j)
            if self.match_brightness:  # DIS's refinement assumes constant brightness
                gain = float(np.clip(source.mean() / max(float(target.mean()), 1.0), 0.5, 2.0))
                target = np.clip(target.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)
            with self._dis_lock:
                return self._dis.calc(source, target, None)

        return self._small.get((i, j), compute)

    def full(self, i: int, j: int) -> np.ndarray:
        return self._full.get((i, j), lambda: _upsample_flow(self.small(i, j), self.height, self.width))


class _FlowEnds:
    """Where the flow i -> j takes each pixel of frame i, and how well the flow back agrees.

    flow_ij, flow_ji: (H, W, 2) in pixels. u, v: (H, W) float32 pixel grid of frame i; u2, v2 the
    end points in frame j; inside: end points within frame j; fb_squared: squared
    forward-backward error (px^2; NaN where the flow back is not known).
    """

    def __init__(self, flow_ij: np.ndarray, flow_ji: np.ndarray) -> None:
        H, W = flow_ij.shape[:2]
        self.v, self.u = np.mgrid[0:H, 0:W].astype(np.float32)
        self.u2, self.v2 = self.u + flow_ij[..., 0], self.v + flow_ij[..., 1]
        back = cv2.remap(flow_ji, self.u2, self.v2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
        fb_x, fb_y = flow_ij[..., 0] + back[..., 0], flow_ij[..., 1] + back[..., 1]
        self.inside = (self.u2 >= 0) & (self.u2 <= W - 1) & (self.v2 >= 0) & (self.v2 <= H - 1)
        self.fb_squared = fb_x * fb_x + fb_y * fb_y

    def grid_sample(self, sample: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) pixels of frame i and (N, 2) end points in frame j of the (H, W) bool `sample`
        pixels on a grid: at most about `max_points`, evenly spread (enough for RANSAC)."""
        step = max(1, int(math.sqrt(int(sample.sum()) / max_points)))
        grid = np.zeros_like(sample)
        grid[::step, ::step] = True
        pick = sample & grid
        return np.stack([self.u[pick], self.v[pick]], axis=1), np.stack([self.u2[pick], self.v2[pick]], axis=1)

    def consistent(self, tolerance_px: float) -> np.ndarray:
        """(H, W) bool: the flow back returns within `tolerance_px` and the end point is inside frame j."""
        return (self.fb_squared < tolerance_px * tolerance_px) & self.inside

    def epipolar_miss(self, F: np.ndarray) -> np.ndarray:
        """(H, W) distance (px) of each end point from the epipolar line F x of its pixel (F: 3x3, i -> j)."""
        F = F.astype(np.float32)
        a, b, c = (F[r, 0] * self.u + F[r, 1] * self.v + F[r, 2] for r in range(3))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(a * self.u2 + b * self.v2 + c) / np.sqrt(a * a + b * b)


_SWEEP_WINDOW, _SWEEP_MIN_PLANES, _SWEEP_MAX_PLANES = 11, 32, 128


def _relative_pose(pose_i: Tensor, pose_j: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(R, t) taking camera i's coordinates to camera j's (both (4, 4) world-to-camera)."""
    Pi, Pj = pose_i.numpy(), pose_j.numpy()
    R = Pj[:3, :3] @ Pi[:3, :3].T
    return R, Pj[:3, 3] - R @ Pi[:3, 3]


def _sweep_depth(
    gray_i: np.ndarray, gray_j: np.ndarray, Ks: np.ndarray, R: np.ndarray, t: np.ndarray, near: float, far: float, min_ncc: float,
) -> np.ndarray:
    """Plane-sweep stereo: (h, w) float32 depth of frame i from frame j, NaN where unknown.

    gray_i, gray_j: (h, w) uint8 frames at flow scale; Ks: their intrinsics (px); R, t: camera i
    to camera j. Fronto-parallel planes of frame i, evenly spaced in inverse depth between `near`
    and `far` (about one pixel apart at the image centre); frame j warped onto each by its
    homography; zero-mean normalised cross-correlation over a window; the best plane per pixel,
    refined by a parabola; kept where its correlation reaches `min_ncc` and it is not the first or
    last plane. One view's best plane is often wrong (occluded or outside view j): see `_Sweeps`.
    """
    h, w = gray_i.shape
    Ks_inv = np.linalg.inv(Ks)

    def centre_in_j(depth: float) -> np.ndarray:
        pixel = Ks @ (R @ (depth * (Ks_inv @ np.array([w / 2, h / 2, 1.0]))) + t)
        return pixel[:2] / pixel[2]

    planes = int(np.clip(np.linalg.norm(centre_in_j(near) - centre_in_j(far)), _SWEEP_MIN_PLANES, _SWEEP_MAX_PLANES))
    inverse = np.linspace(1 / far, 1 / near, planes)
    gi, gj = gray_i.astype(np.float32) / 255, gray_j.astype(np.float32) / 255
    box = lambda x: cv2.boxFilter(x, -1, (_SWEEP_WINDOW, _SWEEP_WINDOW), borderType=cv2.BORDER_REFLECT)  # noqa: E731
    mean_i = box(gi)
    var_i = box(gi * gi) - mean_i * mean_i
    ones = np.ones_like(gj)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    scores = np.empty((planes, h, w), np.float32)
    for k, q in enumerate(inverse):
        homography = Ks @ (R + np.outer(t, [0.0, 0.0, q])) @ Ks_inv  # pixel of i -> pixel of j on the plane z_i = 1/q
        warped = cv2.warpPerspective(gj, homography, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inside = cv2.warpPerspective(ones, homography, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mean_j = box(warped)
        var_j = box(warped * warped) - mean_j * mean_j
        ncc = (box(gi * warped) - mean_i * mean_j) / np.sqrt(np.maximum(var_i * var_j, 1e-12))
        ncc[inside == 0] = -1.0  # outside view j
        scores[k] = ncc
    best = scores.argmax(0)
    inner = np.clip(best, 1, planes - 2)
    take = lambda k: np.take_along_axis(scores, k[None], 0)[0]  # noqa: E731
    s0, s1, s2 = take(inner - 1), take(inner), take(inner + 1)
    curvature = s0 - 2 * s1 + s2
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < -1e-6, 0.5 * (s0 - s2) / curvature, 0.0).clip(-0.5, 0.5)
    depth = 1.0 / (inverse[0] + (inner + offset) * (inverse[1] - inverse[0]))
    valid = (take(best) >= min_ncc) & (best > 0) & (best < planes - 1)
    return np.where(valid, depth, np.nan).astype(np.float32)


class _Sweeps:
    """Plane-sweep depth between frames of one video whose views turn too far apart for optical
    flow, each ordered pair swept once (`_sweep_depth`, at flow scale, between the 2nd and 98th
    percentiles of the frame's SfM depths widened by `margin`).

    `depth(i, j)`: (H, W) depth of frame i from frame j, kept only where frame j's own sweep
    towards i sends the point back to within `tolerance_px` (px at flow scale) of where it
    started: a left-right check, which drops what one view cannot see (occluded, outside it) and
    the wrong planes of ambiguous texture. None when frame i or j has too few SfM points to bound
    the sweep.
    """

    def __init__(self, flows: "_Flows", cameras: Cameras, margin: float, min_ncc: float, tolerance_px: float) -> None:
        self.flows, self.cameras = flows, cameras
        self.margin, self.min_ncc, self.tolerance_px = margin, min_ncc, tolerance_px
        full, small = (flows.height, flows.width), (flows.size[1], flows.size[0])
        self.Ks = rescale_intrinsics(torch.from_numpy(cameras.K), full, small, pixel_centre=0.0).numpy()  # flow scale
        self.Ks_inv = np.linalg.inv(self.Ks)
        self._raw: OnceCache[tuple[int, int], Optional[np.ndarray]] = OnceCache()

    def raw(self, i: int, j: int) -> Optional[np.ndarray]:
        """(h, w) depth of frame i from frame j at flow scale before the left-right check."""
        def compute() -> Optional[np.ndarray]:
            observed = self.cameras.observations.get(i)
            if observed is None or len(observed) < 10:
                return None
            near, far = np.percentile(observed[:, 2], [2, 98])
            R, t = _relative_pose(self.cameras.poses[i], self.cameras.poses[j])
            return _sweep_depth(
                self.flows.gray(i), self.flows.gray(j), self.Ks, R, t, near / self.margin, far * self.margin, self.min_ncc
            )

        return self._raw.get((i, j), compute)

    def depth(self, i: int, j: int) -> Optional[np.ndarray]:
        forward, backward = self.raw(i, j), self.raw(j, i)
        if forward is None or backward is None:
            return None
        h, w = forward.shape
        R, t = _relative_pose(self.cameras.poses[i], self.cameras.poses[j])
        Ks, Ks_inv = self.Ks, self.Ks_inv
        v, u = np.mgrid[0:h, 0:w].astype(np.float32)
        pixels = np.stack([u, v, np.ones_like(u)], axis=-1)  # (h, w, 3)
        in_j = (pixels @ Ks_inv.T * forward[..., None]) @ R.T + t  # camera j coordinates of each point
        q = in_j @ Ks.T
        with np.errstate(divide="ignore", invalid="ignore"):
            qu, qv = (q[..., 0] / q[..., 2]).astype(np.float32), (q[..., 1] / q[..., 2]).astype(np.float32)
            depth_j = cv2.remap(backward, qu, qv, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
            back = ((np.stack([qu, qv, np.ones_like(qu)], axis=-1) @ Ks_inv.T * depth_j[..., None]) - t) @ R  # in camera i
            p = back @ Ks.T
            miss = np.hypot(p[..., 0] / p[..., 2] - u, p[..., 1] / p[..., 2] - v)
        kept = np.where(miss < self.tolerance_px, forward, 0.0).astype(np.float32)
        H, W = self.flows.height, self.flows.width
        if (h, w) != (H, W):
            kept = cv2.resize(kept, (W, H), interpolation=cv2.INTER_NEAREST)
        return np.where(kept > 0, kept, np.nan).astype(np.float32)


def _fov_deg(model, size: tuple[int, int]) -> float:
    """Field of view (degrees) over the long side of the SfM images (width, height) of a model's camera."""
    return math.degrees(2 * math.atan(max(size) / 2 / max(_focal(model), 1e-9)))


def _flow_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(width, height) for cv2 at which optical flow is computed."""
    scale = min(1.0, max_side / max(height, width))
    return (max(16, round(width * scale)), max(16, round(height * scale)))


def _texture(gray: np.ndarray) -> np.ndarray:
    """(h, w) uint8 grey frame -> (h, w) float32 gradient energy: the trace of the structure
    tensor over a 7x7 window of 3x3 Sobel derivatives, in OpenCV's scaling. A ramp of g grey levels
    per pixel reads 4 g^2 / 255^2 (the default `min_texture`, 1e-4, is about 1.3 levels per pixel);
    sensor noise of 1 grey level reads about 2.4e-5, of 2 levels 9e-5."""
    eigen = cv2.cornerEigenValsAndVecs(gray, 7, 3)  # (h, w, 6): l1, l2, then the two eigenvectors
    return (eigen[..., 0] + eigen[..., 1]).astype(np.float32)


def _upsample_flow(flow: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flow (h, w, 2) in pixels of the small frames -> (H, W, 2) in pixels of the full frames."""
    h, w = flow.shape[:2]
    if (h, w) == (height, width):
        return flow
    big = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
    big[..., 0] *= width / w
    big[..., 1] *= height / h
    return big


def _point_observations(model, scale: float = 1.0) -> dict[int, np.ndarray]:
    """frame position -> (n, 3) rows (u, v, z) of its triangulated points: pixel in our convention, camera z.

    scale: size of the SfM frames over the frames (pixels are mapped back to the frames).
    """
    observations = {}
    for image in model.images.values():
        if not image.has_pose:
            continue
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        seen = [(p.xy, model.points3D[p.point3D_id].xyz) for p in image.points2D if p.has_point3D()]
        if seen:
            uv = np.asarray([xy for xy, _ in seen], dtype=np.float64) / scale - 0.5  # COLMAP's pixel centres are at +0.5
            z = (np.asarray([xyz for _, xyz in seen]) @ pose.rotation.matrix().T + pose.translation)[:, 2]
            observations[int(Path(image.name).stem)] = np.column_stack([uv, z])
    return observations
