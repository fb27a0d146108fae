"""Cameras of a camera that turns in place (a tripod pan or tilt): one focal length and a rotation
per frame, no translation.

Structure-from-motion needs parallax: a camera that only turns gives none, and COLMAP finds no
cameras at all (a 12-degree pan of the synthetic boxes was "unscorable", while its 3 px jittered
copy scored: the jitter looked like parallax). Yet such a video has a 3D interpretation: every pixel
moves by the homography K R_j R_i^T K^-1 whatever its depth, so the frames are consistent when one
focal and one rotation per frame explain the optical flow between them. Scored with depth at any
constant value and no translation, the reprojection is that homography, and a drift or jitter of
the frames shows up as in any other video.

This model is used only where it is honest (`TurningFit.explains`): the flow must fit it about as
well as it fits a general two-view geometry (a fundamental matrix per pair). A camera that moves
through a 3D scene leaves parallax that a fundamental matrix explains and a rotation cannot; a
corrupted pan (jitter, drift) fits neither much better than the other.

Units: points are (N, 2) pixels of the flow's frames (centres at integers); K (3, 3) in the same
pixels with the principal point at the frame's centre; rotations (3, 3) world-to-camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

_HOMOGRAPHY_RANSAC_PX = 1.0  # at flow scale (360 px): the inliers a pair's rotation is fitted to
_FOCAL_STEPS = 41  # candidate focal lengths, log-spaced over a 20 to 120 degree field of view (then refined)
_FOCAL_TIE = 0.02  # costs within 2% of the best are ties; the one closest to the prior wins


@dataclass(frozen=True)
class PairFlow:
    """Flow correspondences between positions i and j: (N, 2) pixels in frame i -> (N, 2) in frame j."""

    i: int
    j: int
    source: np.ndarray
    target: np.ndarray


@dataclass
class TurningFit:
    """A turning camera fitted to the flow of a video's frames (positions in the decoded frames).

    K: (3, 3) in pixels of the flow's frames. rotations: position -> (3, 3) world-to-camera, the
    first position's the identity; only the longest run of consecutive positions whose flow could
    be fitted. residual_px: the median over the fitted pairs (the chain and the wider ones) of each
    pair's median transfer error under this model; epipolar_px: the median over the chain's pairs
    of their median epipolar miss under a fundamental matrix fitted to the same flow; both in
    pixels of the flow's frames.
    """

    K: np.ndarray
    rotations: dict[int, np.ndarray]
    residual_px: float
    epipolar_px: float

    def explains(self, floor_px: float, ratio: float) -> bool:
        """Whether the rotation model explains the flow: within `floor_px`, or within `ratio` times
        what a general two-view geometry leaves (which parallax would not allow)."""
        return len(self.rotations) >= 2 and self.residual_px <= max(floor_px, ratio * self.epipolar_px)

    def homography(self, i: int, j: int) -> np.ndarray:
        """(3, 3) pixel of position i -> pixel of position j."""
        return _homography(self.K, self.rotations, i, j)


def _homography(K: np.ndarray, rotations: dict[int, np.ndarray], i: int, j: int) -> np.ndarray:
    return K @ rotations[j] @ rotations[i].T @ np.linalg.inv(K)


def transfer(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) pixels mapped by the homography H (3, 3)."""
    mapped = np.c_[points, np.ones(len(points))] @ H.T
    return mapped[:, :2] / mapped[:, 2:3]


def fit_turning(
    pairs: Sequence[PairFlow], positions: Sequence[int], size: tuple[int, int], prior_focal: float,
    fundamental_miss: dict[tuple[int, int], float],
) -> Optional[TurningFit]:
    """Fit one focal and a rotation per position to the flow of consecutive `positions`.

    pairs: flow of consecutive positions (the chain) and of wider pairs (which pin the focal: over
    a few degrees a wrong focal barely shows); size: (height, width) of the flow's frames;
    prior_focal: the focal (px) chosen among near-equal fits; fundamental_miss: (i, j) -> median
    epipolar miss (px) of the pair's flow under a fundamental matrix fitted to it. None when no
    two consecutive positions have flow to fit.
    """
    height, width = size
    chain = _longest_chain([(p.i, p.j) for p in pairs], positions)
    if len(chain) < 2:
        return None
    given = {(p.i, p.j): p for p in pairs}
    by_pair = {key: _inliers(pair) for key, pair in given.items() if key[0] in chain and key[1] in chain}
    by_pair = {key: pair for key, pair in by_pair.items() if pair is not None}
    if not all((a, b) in by_pair for a, b in zip(chain, chain[1:])):
        return None
    long_side = max(height, width)
    candidates = [long_side / 2 / math.tan(math.radians(fov) / 2) for fov in np.geomspace(20.0, 120.0, _FOCAL_STEPS)]
    fits = [_fit_at(f, chain, by_pair, height, width) for f in candidates]
    best = min(cost for _, cost in fits)
    tied = [k for k, (_, cost) in enumerate(fits) if cost <= best * (1 + _FOCAL_TIE) + 1e-6]
    choice = min(tied, key=lambda k: abs(math.log(candidates[k] / prior_focal)))
    focal, (rotations, _) = candidates[choice], fits[choice]
    if len(tied) == 1 and 0 < choice < len(candidates) - 1:  # a clear minimum: refined between its neighbours
        focal = _golden_section(lambda f: _fit_at(f, chain, by_pair, height, width)[1], candidates[choice - 1], candidates[choice + 1])
        rotations, _ = _fit_at(focal, chain, by_pair, height, width)
    K = _intrinsics(focal, height, width)
    chained = [(a, b) for a, b in zip(chain, chain[1:])]
    # Over all of a pair's flow, not the inliers the rotation was fitted to: those are the pixels
    # one homography explains, and with parallax they are one depth's. Every pair, the wider ones
    # too: parallax grows with the baseline.
    residuals = [float(np.median(_errors(K, rotations, a, b, pair))) for (a, b), pair in given.items() if (a, b) in by_pair]
    misses = [fundamental_miss[key] for key in chained if key in fundamental_miss]
    return TurningFit(K, rotations, float(np.median(residuals)), float(np.median(misses)) if misses else 0.0)


def _golden_section(cost, low: float, high: float, steps: int = 16) -> float:
    """The focal in [low, high] (a bracket of one minimum) where `cost` is least, searched in log space."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = math.log(low), math.log(high)
    for _ in range(steps):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if cost(math.exp(c)) <= cost(math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


def _longest_chain(keys: list[tuple[int, int]], positions: Sequence[int]) -> list[int]:
    """The longest run of consecutive positions each linked to the next by a pair in `keys`."""
    linked = set(keys)
    best: list[int] = []
    run: list[int] = []
    for position in positions:
        run = run + [position] if run and (run[-1], position) in linked else [position]
        if len(run) > len(best):
            best = run
    return best


def _inliers(pair: PairFlow) -> Optional[PairFlow]:
    """The pair's correspondences that one homography explains (OpenCV's RANSAC, fixed seed)."""
    if len(pair.source) < 16:
        return None
    _, inliers = cv2.findHomography(pair.source, pair.target, cv2.RANSAC, _HOMOGRAPHY_RANSAC_PX, maxIters=1000, confidence=0.999)
    if inliers is None or int(inliers.sum()) < 16:
        return None
    keep = inliers[:, 0].astype(bool)
    return PairFlow(pair.i, pair.j, pair.source[keep], pair.target[keep])


def _intrinsics(focal: float, height: int, width: int) -> np.ndarray:
    return np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])


def _bearings(K_inv: np.ndarray, points: np.ndarray) -> np.ndarray:
    rays = np.c_[points, np.ones(len(points))] @ K_inv.T
    return rays / np.linalg.norm(rays, axis=1, keepdims=True)


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rotation R that best takes unit vectors a (N, 3) onto b (N, 3) (Kabsch): b ~ R a."""
    U, _, Vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(U @ Vt))
    return U @ np.diag([1.0, 1.0, d]) @ Vt


def _errors(K: np.ndarray, rotations: dict[int, np.ndarray], i: int, j: int, pair: PairFlow) -> np.ndarray:
    return np.linalg.norm(transfer(_homography(K, rotations, i, j), pair.source) - pair.target, axis=1)


def _fit_at(focal: float, chain: list[int], pairs: dict[tuple[int, int], PairFlow], height: int, width: int):
    """Rotations chained along `chain` at this focal, and their cost: the mean over every pair of
    its median transfer error (px), wider pairs included."""
    K = _intrinsics(focal, height, width)
    K_inv = np.linalg.inv(K)
    rotations = {chain[0]: np.eye(3)}
    for a, b in zip(chain, chain[1:]):
        pair = pairs[(a, b)]
        rotations[b] = _rotation_between(_bearings(K_inv, pair.source), _bearings(K_inv, pair.target)) @ rotations[a]
    cost = float(np.mean([np.median(_errors(K, rotations, i, j, pair)) for (i, j), pair in pairs.items()]))
    return rotations, cost
