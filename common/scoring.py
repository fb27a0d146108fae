"""`score_video`: the one score function that the CLI, the service and the mining job call.

E = mean over scored frames of (MSE_t + lambda * P_t), on the pixels that the reprojected point
cloud covers. Lower is more 3D-consistent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.camera import camera_motion, unproject_depth
from common.config import ScoreConfig
from common.geometry import GeometryBackend, ReconstructionFailed, SceneGeometry, shared_backend
from common.perceptual import create_metric
from common.posing import neighbour_poses
from common.raster import rasterize_points
from common.result import FrameScore, ScoreResult
from common.video import VideoSource, constant_borders, inpainted, load_video, shot_cuts, static_overlay, to_float, uniform_indices

Progress = Callable[[str], None]


def score_video(
    source: VideoSource,
    config: Optional[ScoreConfig] = None,
    *,
    backend: Optional[GeometryBackend] = None,
    preview_dir: Optional[str | Path] = None,
    progress: Optional[Progress] = None,
) -> ScoreResult:
    """Score how 3D-consistent a video is.

    Args:
        source: a video file, a folder of ordered images, a zip of ordered images, or frames
            (N, H, W, 3) uint8 / float in [0, 1].
        config: settings (defaults: `ScoreConfig()`).
        backend: a ready geometry backend (e.g. `OracleBackend`), instead of `config.backend`.
        preview_dir: where to write one PNG per scored frame: original | reprojection | error.
        progress: called with the name of each stage as it starts.

    Returns:
        A `ScoreResult`; `status` is "unscorable" (with a reason) for static or unreconstructable
        videos, which is an answer and not an error.

    Raises:
        VideoGPAError subclasses for input that cannot be read or is over the limits.
    """
    config = config or ScoreConfig()
    step = _Stages(progress)
    device = resolve_device(config.device)

    # 1. Decode: the T scored frames plus a denser subset for structure-from-motion.
    step("decode")
    plan: dict[str, list[int]] = {}

    def wanted(total: int) -> list[int]:
        plan["scored"] = uniform_indices(total, config.frames)
        plan["recon"] = sorted(set(uniform_indices(total, config.recon_frames)) | set(plan["scored"]))
        return plan["recon"]

    video = load_video(
        source,
        wanted=wanted,
        max_side=config.max_side,
        max_input_side=config.max_input_side,
        max_input_frames=config.max_input_frames,
    )
    # Bars of one dark colour along the edges (letterbox, pillarbox) hold no scene: cut before anything sees them.
    borders = constant_borders(video.frames) if config.crop_borders else (0, 0, 0, 0)
    if any(borders):
        top, bottom, left, right = borders
        _, height, width, _ = video.frames.shape
        video = replace(video, frames=video.frames[:, top:height - bottom, left:width - right].contiguous())
    # A cut to another shot is judged once the cameras say which frames fit one scene (step 3).
    cuts = [video.indices[k] for k in shot_cuts(video.frames)] if config.detect_cuts else []
    # Screen overlays (watermarks, logos, captions) follow no camera: left out of the comparison, and
    # filled in for the reconstruction, whose features would otherwise stand still on their edges.
    overlay = static_overlay(video.frames) if config.mask_overlays else torch.zeros(video.frames.shape[1:3], dtype=torch.bool)
    recon_frames = inpainted(video.frames, overlay)
    position = {index: p for p, index in enumerate(video.indices)}
    scored = [position[i] for i in plan["scored"]]
    frames = to_float(video.frames[scored]).to(device)  # (T, H, W, 3) in [0, 1]
    T, H, W, _ = frames.shape

    backend = (backend or _backend(config)).cropped(borders)
    metric = create_metric(config.perceptual, config.lpips_weights, device)
    base = dict(
        perceptual_metric=metric.name,
        metric_id=config.metric_id(backend.score_id, metric.name),
        backend=backend.name,
        frames=T,
        frame_indices=plan["scored"],
        size=(H, W),
        borders=borders,
        shot_cuts=cuts,
        overlay_fraction=float(overlay.float().mean()),
        **{"lambda": config.lambda_},
    )

    def unscorable(reason: str, **extra) -> ScoreResult:
        return ScoreResult(status="unscorable", reason=reason, timings_s=step.done(), **base, **extra)

    # 2. A static camera gets its verdict before any reconstruction is attempted.
    step("parallax")
    parallax = _image_motion_px(video.frames[scored])
    if parallax < config.min_parallax_px:
        return unscorable(
            f"static camera: the image moves {parallax:.2f} px between frames (needs {config.min_parallax_px:g} px)",
            registered_frames=0, per_frame=_frame_rows(plan["scored"]),
        )

    renders: dict[bool, PairwiseErrors] = {}  # turning in place or not -> its reprojections

    def judge(geometry: SceneGeometry, label: str = "") -> ScoreResult:
        """Steps 4-7 for one 3D interpretation of the scored frames; `label` names its stages."""
        registered = geometry.registered.cpu()
        n_registered = int(registered.sum())
        unregistered = [i for i, ok in zip(plan["scored"], registered) if not ok]
        if cuts and unregistered:  # the frames of the other shot are not a registration failure: they are another scene
            return unscorable(
                _cut_reason(cuts) + f"frames {unregistered} do not register with the rest, and no single 3D scene explains the video",
                registered_frames=n_registered, per_frame=_frame_rows(plan["scored"], registered), failed_frames=unregistered,
            )
        if n_registered < max(2, config.min_ok_fraction * T):
            return unscorable(
                f"only {n_registered} of {T} scored frames were registered by the {backend.name} backend",
                registered_frames=n_registered, per_frame=_frame_rows(plan["scored"], registered), failed_frames=unregistered,
            )

        # 4. Lift each frame's confident static pixels to 3D; 5. z-buffer them into every other frame.
        step("reproject" + label)
        keep_previews = preview_dir is not None
        errors = pairwise_errors(frames, geometry, config, metric, device, keep_previews=keep_previews, overlay=overlay)
        reg = registered.nonzero().squeeze(1)
        median_depth = _median_depth(geometry, reg, config.min_confidence)
        # A frame without a camera, or one that nothing reprojects into, is posed from its neighbours
        # and compared like the rest: left out, it cost nothing (common.posing).
        posed: dict[int, Tensor] = {}
        unexplained = [t for t in range(T) if not registered[t] or float(errors.covered[t]) < config.min_coverage]
        if unexplained and config.pose_from_neighbours:
            step("neighbour poses" + label)
            posed = neighbour_poses(
                video.frames[scored], geometry.depth.cpu(), errors.lifted.cpu(), geometry.K.cpu(), geometry.world_to_cam.cpu(),
                registered, plan["scored"], unexplained, config.max_neighbour_step * max(H, W), median_depth,
            )
        if posed:
            step("reproject posed" + label)
            stand_in = torch.zeros(T, dtype=torch.bool)
            stand_in[list(posed)] = True
            world_to_cam = geometry.world_to_cam.clone().double()
            for t, pose in posed.items():
                world_to_cam[t] = pose
            # A frame posed from its neighbours is compared, not lifted: its depth came with no camera, or a wrong one.
            errors = pairwise_errors(
                frames, replace(geometry, world_to_cam=world_to_cam, registered=registered & ~stand_in), config, metric, device,
                keep_previews=keep_previews, overlay=overlay, targets=registered | stand_in,
            )
        moving_fraction = errors.moving_fraction

        # 6. Errors on covered static pixels only, per frame over all the frames it was rendered from.
        step("metrics" + label)
        per_frame = []
        for t, index in enumerate(plan["scored"]):
            coverage = float(errors.covered[t])
            row = FrameScore(index=index, registered=bool(registered[t]), posed_from_neighbours=t in posed, coverage=coverage)
            frame_mse, frame_perceptual = errors.frame_errors(t, config.lambda_, config.trim_sources)
            if (row.registered or row.posed_from_neighbours) and frame_mse is not None:
                row.mse, row.perceptual = frame_mse, frame_perceptual
                row.ok = coverage >= config.min_coverage
            per_frame.append(row)
        ok_rows = [r for r in per_frame if r.ok]
        failed = [r.index for r in per_frame if not r.ok]
        confident_fraction = errors.confident_fraction

        # 7. Camera motion (translation in units of the scene's median depth) and the verdict.
        motion = camera_motion(geometry.world_to_cam[reg].cpu(), scale=max(median_depth, 1e-9))
        coverage = float(np.mean([r.coverage for r in per_frame if r.registered or r.posed_from_neighbours]))
        fov = _field_of_view_deg(geometry.K[reg], H, W)
        extra = dict(registered_frames=n_registered, per_frame=per_frame, failed_frames=failed, coverage=coverage,
                     motion=motion, moving_fraction=moving_fraction, fov_deg=fov, turning_in_place=geometry.turning)
        renders[geometry.turning] = errors  # previews are written for the interpretation kept
        if motion < config.min_motion:
            return unscorable(f"static camera: camera motion {motion:.5f} is below {config.min_motion:g}", **extra)
        if fov < config.min_fov_deg:
            return unscorable(
                f"the cameras collapsed to a near-orthographic projection (field of view {fov:.1f} degrees, needs "
                f"{config.min_fov_deg:g}): no consistent perspective geometry", **extra,
            )
        if moving_fraction > config.max_moving_fraction:
            return unscorable(
                f"moving things cover {100 * moving_fraction:.0f}% of the frames: the static part is too small to judge "
                f"(at most {100 * config.max_moving_fraction:.0f}%)", **extra,
            )
        if confident_fraction < 0.01:
            return unscorable(
                f"no parallax: depth could be triangulated for only {100 * confident_fraction:.1f}% of pixels", **extra
            )
        if len(ok_rows) < max(2, config.min_ok_fraction * T):
            return unscorable(
                f"only {len(ok_rows)} of {T} frames were registered and covered by the reprojection "
                f"(coverage >= {config.min_coverage:g})", **extra,
            )
        mse = float(np.mean([r.mse for r in ok_rows]))
        perceptual = float(np.mean([r.perceptual for r in ok_rows]))
        return ScoreResult(
            status="ok", score=mse + config.lambda_ * perceptual, mse=mse, perceptual=perceptual,
            timings_s=step.done(), **base, **extra,
        )

    # 3. Geometry of the scored frames.
    step("geometry")
    try:
        geometry = backend.reconstruct(recon_frames, scored, video.indices)
    except ReconstructionFailed as err:
        return unscorable(_cut_reason(cuts) + f"reconstruction failed: {err}", registered_frames=0, per_frame=_frame_rows(plan["scored"]))
    step.merge(geometry.timings_s)
    result = judge(geometry)
    if geometry.alternative is not None:  # a camera turning in place, where SfM's cameras travel
        other = judge(geometry.alternative, " (turning)")
        if other.status == "ok" and (result.status != "ok" or other.score < result.score):
            result = other
    if preview_dir is not None and result.turning_in_place in renders:
        step("previews")
        previews = _write_previews(Path(preview_dir), frames, renders[result.turning_in_place], plan["scored"])
        result = result.model_copy(update={"previews": previews})
    return result.model_copy(update={"timings_s": step.done()})


def _median_depth(geometry: SceneGeometry, registered: Tensor, min_confidence: float) -> float:
    """Median confident depth of the registered frames (1.0 where there is none): the scene's scale."""
    confident = geometry.depth[registered][geometry.confidence[registered] >= min_confidence]
    return float(confident.median()) if confident.numel() else 1.0


def _cut_reason(cuts: list[int]) -> str:
    """The start of an unscorable reason that names the video's cuts to another shot ("" without any)."""
    if not cuts:
        return ""
    where = f"frame {cuts[0]}" if len(cuts) == 1 else "frames " + ", ".join(map(str, cuts))
    return f"the video cuts to another shot at {where} (the colours jump and stay changed): "


@dataclass
class PairwiseErrors:
    """Each scored frame against renders of every other frame's points, at the comparison scale.

    Per pair (source s, target t) (all (T, T) tensors): the sums over the covered static pixels
    of the render of s into t of the squared error (mean over RGB) and of the perceptual distance,
    and how many pixels were compared (0: the pair was not compared). covered (T,): the fraction
    of t's pixels that some render covered. A frame's errors are its sums over its pixel count:
    each source weighs by how much of t it explains. (Weighing every source the same was
    measured too: it lets the far pairs' depth noise dominate, and ranked fewer pairs right.)
    preview: (T, H, W, 3) render of t from its nearest scored frame in time, preview_mask its
    covered pixels, moving the (T, H, W) moving-pixel mask, lifted the (T, H, W) pixels that became
    3D points (confident depth, static, registered frame; all at full resolution).
    """

    squared: Tensor
    perceptual: Tensor
    pixels: Tensor
    covered: Tensor
    confident_fraction: float
    moving_fraction: float
    preview: Tensor
    preview_mask: Tensor
    moving: Tensor
    lifted: Tensor
    overlay: Optional[Tensor] = None  # (H, W) bool: a screen overlay's pixels, left out like moving things

    def frame_errors(self, t: int, lambda_: float = 1.0, trim: float = 0.0) -> tuple[Optional[float], Optional[float]]:
        """(MSE, perceptual) of target frame t over the pairs that rendered into it; None when none did.

        Each source weighs by its compared pixels. trim: the fraction of those pixels left out,
        taken from the sources with the largest error (MSE + lambda_ * perceptual per pixel), a
        weighted trimmed mean: a source frame whose depth or pose came out wrong spoils every render
        of its points, and a plain mean lets that one reconstruction failure move every frame's
        error (measured: docs/backends.md, "Trimmed sources"). A corruption that spoils most
        sources (jitter, drift, deformation) still raises the rest.
        """
        pixels = self.pixels[:, t].double().numpy()
        sources = np.flatnonzero(pixels > 0)
        if len(sources) == 0:
            return None, None
        weight = pixels[sources]
        mse = self.squared[sources, t].double().numpy() / weight
        perceptual = self.perceptual[sources, t].double().numpy() / weight
        kept = weight.copy()
        if trim > 0:
            order = np.argsort(mse + lambda_ * perceptual, kind="stable")  # best-explaining source first
            upper = np.empty_like(weight)
            upper[order] = np.cumsum(weight[order]) / weight.sum()
            lower = upper - weight / weight.sum()
            kept = np.clip(np.minimum(upper, 1.0 - trim) - lower, 0.0, None)  # the part of each source below the cut
        return float((kept * mse).sum() / kept.sum()), float((kept * perceptual).sum() / kept.sum())


def pairwise_errors(
    frames: Tensor, geometry: SceneGeometry, config: ScoreConfig, metric, device=None, keep_previews: bool = False,
    overlay: Optional[Tensor] = None, targets: Optional[Tensor] = None,
) -> PairwiseErrors:
    """Render every registered frame's confident static pixels into every other frame, and compare.

    frames: (T, H, W, 3) float in [0, 1], the scored frames of `geometry`.
    One source at a time, not all sources in one z-buffer: with all of them, whichever frame's
    point lies nearest wins each pixel, and the render mixes many frames, blurring the image and
    hiding errors that grow with the distance in time (drift). Pairwise, a far frame's points land
    where the geometry puts them, and the comparison sees it. The cost is the same: T renders of
    one frame's points into T frames instead of one render of all of them.
    keep_previews: also keep, per frame, the render from its nearest frame in time (otherwise
    `preview` stays empty: copying renders costs time on every score).
    Comparison at 1 / config.compare_scale: blocks of covered pixels are averaged first, so the
    1-pixel splats' nearest-neighbour resampling does not dominate the error.
    overlay: (H, W) bool pixels of an overlay fixed to the screen (`common.video.static_overlay`),
    left out like moving things: neither lifted to 3D nor compared.
    targets: (T,) bool, the frames rendered into and compared (default: the registered ones); a
    frame posed from its neighbours (`common.posing`) is a target but not registered, so not lifted.
    """
    T, H, W, _ = frames.shape
    device = frames.device if device is None else device
    depth = geometry.depth.to(device).float()
    K = geometry.K.to(device).float()
    world_to_cam = geometry.world_to_cam.to(device).float()
    registered = geometry.registered.to(device)
    compared = registered if targets is None else targets.to(device)
    moving = geometry.moving.to(device) if geometry.moving is not None else torch.zeros(T, H, W, dtype=torch.bool, device=device)
    # Left out of the 3D points and of the comparison: moving things, and pixels of a screen overlay.
    excluded = moving | overlay.to(device) if overlay is not None else moving
    confident = (geometry.confidence.to(device) >= config.min_confidence) & (depth > 0) & ~excluded
    confident &= registered.view(T, 1, 1)
    world = unproject_depth(depth, K, world_to_cam)  # (T, H, W, 3)
    scale = config.compare_scale
    small_frames, _ = _pool(frames, torch.ones(T, H, W, dtype=torch.bool, device=device), scale)
    static_small = ~(F.max_pool2d(excluded[:, None].float(), scale, scale)[:, 0] > 0) if scale > 1 else ~excluded

    squared = torch.zeros(T, T, dtype=torch.float64)
    perceptual = torch.zeros(T, T, dtype=torch.float64)
    pixels = torch.zeros(T, T, dtype=torch.float64)
    covered_any = torch.zeros(T, H, W, dtype=torch.bool, device=device)
    preview = torch.zeros_like(frames)
    preview_mask = torch.zeros(T, H, W, dtype=torch.bool, device=device)
    nearest = torch.full((T,), 10**9)
    for s in range(T):
        if not bool(registered[s]) or not bool(confident[s].any()):
            continue
        # Rendered only into the frames it is compared with (a frame into itself compares nothing);
        # each frame's z-buffer is its own, so the renders are those of all T frames.
        into = compared.clone()
        if config.exclude_self:
            into[s] = False
        into = into.nonzero().squeeze(1)
        if len(into) == 0:
            continue
        image, zbuffer, mask = rasterize_points(world[s][confident[s]], frames[s][confident[s]], K[into], world_to_cam[into], H, W)
        mask &= ~excluded[into]
        mask &= ~_shows_through(zbuffer, mask)
        covered_any[into] |= mask
        for k, t in enumerate(into.tolist() if keep_previews else []):  # the render from the nearest frame in time
            if mask[k].any() and abs(t - s) < nearest[t]:
                nearest[t] = abs(t - s)
                preview[t], preview_mask[t] = image[k], mask[k]
        small_image, small_mask = _pool(image, mask, scale)
        small_mask &= static_small[into]
        rendered_into = small_mask.flatten(1).any(dim=1).nonzero().squeeze(1)
        if len(rendered_into) == 0:
            continue
        targets = into[rendered_into]
        reference, rendered, valid = small_frames[targets], small_image[rendered_into], small_mask[rendered_into]
        if config.match_exposure:
            rendered = match_exposure(rendered, reference, valid)
        filled = torch.where(valid[..., None], rendered, reference)
        error = ((filled - reference) ** 2).mean(dim=-1)  # (n, h, w), 0 outside valid
        distance = metric.distance_map(filled, reference)
        for k, t in enumerate(targets.tolist()):
            squared[s, t] = error[k][valid[k]].double().sum()
            perceptual[s, t] = distance[k][valid[k]].double().sum()
            pixels[s, t] = int(valid[k].sum())
    return PairwiseErrors(
        squared=squared, perceptual=perceptual, pixels=pixels,
        covered=covered_any.flatten(1).float().mean(dim=1).cpu(),
        confident_fraction=float(confident.float().mean()),
        moving_fraction=float(moving[registered].float().mean()) if bool(registered.any()) else 0.0,
        preview=preview, preview_mask=preview_mask, moving=moving, lifted=confident,
        overlay=overlay.to(device) if overlay is not None else None,
    )


def match_exposure(rendered: Tensor, reference: Tensor, valid: Tensor, max_gain: float = 2.0, dark: float = 0.04) -> Tensor:
    """Renders (n, h, w, 3) in [0, 1] scaled per channel to the exposure of their reference frames.

    A render carries its source frame's exposure and white balance; a frame that the camera's
    auto-exposure (or a generated clip's flicker) made 6% darker is not less 3D-consistent, yet
    every render into it scored like misalignment (the slow synthetic clip with a +-9% exposure
    swing and a 4% white-balance drift: 3.2x the clean clip's score; docs/backends.md, "Exposure
    (revision 8)"). The gain of a channel is the median ratio reference / render over the `valid`
    (n, h, w) pixels that are not dark in either (below `dark` the ratio is quantisation noise),
    within [1 / max_gain, max_gain]; no change where fewer than 16 such pixels. The median, not the
    ratio of means: the pixels a render gets wrong (a moving thing the masks missed, misplaced
    surfaces) pulled the mean, and the slow clip with movers scored 26% worse with it. Gain only:
    exposure and white balance scale pixel values, and an offset would also absorb a render's
    misplaced dark or bright surfaces.
    """
    gains = torch.ones(rendered.shape[0], 3, dtype=rendered.dtype, device=rendered.device)
    for k in range(rendered.shape[0]):
        pairs = valid[k] & (rendered[k] > dark).all(dim=-1) & (reference[k] > dark).all(dim=-1)
        if int(pairs.sum()) >= 16:
            log_ratio = reference[k][pairs].log() - rendered[k][pairs].log()  # (m, 3)
            gains[k] = log_ratio.median(dim=0).values.exp()
    gains = gains.clamp(1 / max_gain, max_gain)
    return (rendered * gains[:, None, None, :]).clamp(0, 1)


def _pool(image: Tensor, mask: Tensor, scale: int) -> tuple[Tensor, Tensor]:
    """(T, H, W, C) colours and (T, H, W) coverage -> (T, H // scale, W // scale, C) block means and
    (T, H // scale, W // scale) bool: the blocks whose pixels are all covered (only their means are
    meaningful). Sums of strided views, in the order `avg_pool2d` adds a block's pixels (row by
    row), so the means are its bits: 5x faster than `avg_pool2d` on the (T, C, H, W) permuted view
    of channels-last images, which gave the scores of revision 10 and before.
    """
    if scale == 1:
        return image, mask
    H, W = image.shape[1:3]
    h, w = H // scale * scale, W // scale * scale
    offsets = [(dy, dx) for dy in range(scale) for dx in range(scale)]
    total = image[:, 0:h:scale, 0:w:scale].clone()
    full = mask[:, 0:h:scale, 0:w:scale].clone()
    for dy, dx in offsets[1:]:
        total += image[:, dy:h:scale, dx:w:scale]
        full &= mask[:, dy:h:scale, dx:w:scale]
    return total / (scale * scale), full


def _shows_through(depth: Tensor, mask: Tensor, window: int = 5, ratio: float = 1.1) -> Tensor:
    """Pixels of a far surface seen through the gaps of a nearer one (1-pixel splats leave gaps).

    A covered pixel whose depth is more than `ratio` times the nearest depth in its window belongs
    to a surface that the nearer one would hide. depth, mask: (T, H, W).
    """
    far = torch.where(mask, depth, torch.full_like(depth, float("inf")))
    if far.device.type == "cpu":  # OpenCV's min filter is about 10x faster than max_pool2d here
        kernel = np.ones((window, window), np.uint8)
        nearest = torch.from_numpy(np.stack([cv2.erode(f, kernel, borderType=cv2.BORDER_REPLICATE) for f in far.numpy()]))
    else:
        nearest = -F.max_pool2d(-far[:, None], window, stride=1, padding=window // 2)[:, 0]
    return mask & (depth > ratio * nearest)


def _field_of_view_deg(K: Tensor, height: int, width: int) -> float:
    """Median field of view (degrees) over the long side of the frames, from intrinsics K (n, 3, 3)."""
    focal = float(K[:, 0, 0].median() if width >= height else K[:, 1, 1].median())
    return math.degrees(2 * math.atan(max(height, width) / 2 / max(focal, 1e-9)))


def _image_motion_px(frames_uint8: Tensor) -> float:
    """Largest median optical-flow magnitude between first, middle and last frame, in pixels of the frames."""
    H, W = frames_uint8.shape[1:3]
    scale = min(1.0, 256 / max(H, W))
    size = (max(8, int(W * scale)), max(8, int(H * scale)))
    gray = [cv2.resize(cv2.cvtColor(f.numpy(), cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in frames_uint8]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    first, middle, last = gray[0], gray[len(gray) // 2], gray[-1]
    motion = 0.0
    for a, b in ((first, middle), (middle, last), (first, last)):
        flow = dis.calc(a, b, None)
        motion = max(motion, float(np.median(np.linalg.norm(flow, axis=-1))) / scale)
    return motion


def _frame_rows(indices: list[int], registered: Optional[Tensor] = None) -> list[FrameScore]:
    return [FrameScore(index=i, registered=bool(registered[t]) if registered is not None else False)
            for t, i in enumerate(indices)]


def _write_previews(folder: Path, frames: Tensor, errors: PairwiseErrors, indices: list[int]) -> list[str]:
    """One PNG per frame: original (moving things tinted red, a screen overlay cyan, pixels that got no
    depth darkened: no texture, failed flow checks) | render from the nearest frame (holes checkered) |
    error heatmap (holes grey, moving things blue, a screen overlay cyan): what was compared, what was
    left out and why."""
    folder.mkdir(parents=True, exist_ok=True)
    H, W = frames.shape[1:3]
    v, u = np.mgrid[0:H, 0:W]
    checker = (((u // 8) + (v // 8)) % 2 * 40 + 90).astype(np.uint8)[..., None].repeat(3, -1)
    overlay = errors.overlay.cpu().numpy() if errors.overlay is not None else np.zeros((H, W), bool)
    paths = []
    for t, index in enumerate(indices):
        original = (frames[t].cpu().numpy() * 255).round().astype(np.uint8)
        mask = errors.preview_mask[t].cpu().numpy()
        moving = errors.moving[t].cpu().numpy()
        no_depth = ~errors.lifted[t].cpu().numpy() & ~moving & ~overlay
        tinted = np.where(no_depth[..., None], (0.4 * original).astype(np.uint8), original)
        tinted = np.where(moving[..., None], (0.5 * original + [127, 0, 0]).astype(np.uint8), tinted)
        tinted = np.where(overlay[..., None], (0.5 * original + [0, 127, 127]).astype(np.uint8), tinted)
        reproj = np.where(mask[..., None], (errors.preview[t].cpu().numpy() * 255).round().astype(np.uint8), checker)
        error = (errors.preview[t] - frames[t]).abs().mean(-1).cpu().numpy()
        heat = cv2.applyColorMap(np.clip(error / 0.25 * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        heat = np.where(mask[..., None], cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), 128).astype(np.uint8)
        heat[moving] = (40, 60, 200)
        heat[overlay] = (0, 180, 180)
        panel = np.concatenate([tinted, reproj, heat], axis=1)
        path = folder / f"frame_{index:05d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


def resolve_device(name: str) -> torch.device:
    """ScoreConfig.device -> a torch device: "auto" picks CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _backend(config: ScoreConfig) -> GeometryBackend:
    """Backends are built once per process (a service replica loads its model once)."""
    return shared_backend(config.backend, config.weights)


class _Stages:
    """Times consecutive stages and reports each start to a progress callback."""

    def __init__(self, progress: Optional[Progress]) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.current: Optional[str] = None
        self.started = time.perf_counter()
        self.t0 = self.started

    def __call__(self, name: str) -> None:
        self._close()
        self.current, self.started = name, time.perf_counter()
        if self.progress:
            self.progress(name)

    def merge(self, inner: Optional[dict]) -> None:
        for key, value in (inner or {}).items():
            self.timings[f"{self.current}.{key}"] = round(value, 4)

    def _close(self) -> None:
        if self.current is not None:
            self.timings[self.current] = round(time.perf_counter() - self.started, 4)
            self.current = None

    def done(self) -> dict[str, float]:
        self._close()
        self.timings["total"] = round(time.perf_counter() - self.t0, 4)
        return dict(self.timings)
