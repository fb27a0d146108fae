"""The scorer's one configuration type, shared by the CLI, the service and the mining job."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

PerceptualChoice = Literal["auto", "lpips-vgg", "lpips-alex", "align", "dssim"]


class ScoreConfig(BaseModel):
    """Every setting of `score_video`. Fields that change the number are part of `metric_id`."""

    # allow_inf_nan=False: every float setting is finite (nan passes every `ge`/`le` comparison).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)

    # --- what is scored (all part of metric_id) ---
    frames: int = Field(10, ge=2, le=256, description="T: frames sampled uniformly over the whole video and scored.")
    max_side: int = Field(720, ge=32, le=4096, description="Frames are resized so that their long side is at most this (px).")
    backend: str = Field("colmap-flow", description="Geometry backend name (see common.geometry.available_backends()).")
    weights: Optional[Path] = Field(None, description="Local weights for learned backends; never downloaded.")
    lambda_: float = Field(1.0, alias="lambda", ge=0.0, le=1000.0, description="Weight of the perceptual term: E = MSE + lambda * P.")
    perceptual: PerceptualChoice = Field(
        "auto", description="'auto' uses LPIPS-VGG when its weights are on disk, otherwise 'align' (weight-free: residual optical flow between frame and reprojection, clipped at 4 px of a 720 px frame); 'dssim' is (1 - SSIM) / 2."
    )
    lpips_weights: Optional[Path] = Field(
        None, description="A torchvision VGG16/AlexNet state dict for LPIPS; default: torchvision's own cache."
    )
    exclude_self: bool = Field(
        True,
        description="Reproject into frame t only the points of the other frames (a frame trivially explains itself).",
    )

    trim_sources: float = Field(
        0.25, ge=0.0, lt=1.0,
        description="A frame's error leaves out this fraction of its compared pixels: those of the source frames whose "
        "renders explain it worst (one frame with a wrong depth or pose spoils every render it is part of). 0: every "
        "source, weighed by its pixels.",
    )
    match_exposure: bool = Field(
        True,
        description="Before a render is compared with a frame, its colours are scaled per channel by the median ratio "
        "frame / render over the compared pixels: exposure and white balance that change from frame to frame "
        "(auto-exposure, a generated clip's flicker) are not 3D inconsistency. False: compared as rendered.",
    )
    crop_borders: bool = Field(
        True,
        description="Bars of one dark colour along the frame edges (letterbox, pillarbox; `common.video.constant_borders`) "
        "are cut before scoring: they hold no scene, and every point reprojected behind them scored as an error. "
        "False: the whole frame is scored.",
    )
    mask_overlays: bool = Field(
        True,
        description="Pixels of an overlay fixed to the screen while the picture moves (a watermark, a logo, a caption; "
        "`common.video.static_overlay`) are left out of the comparison and filled in for the reconstruction: they "
        "follow no camera. False: they are scored as scene.",
    )
    compare_scale: int = Field(
        2, ge=1, le=8,
        description="Frames and renders are compared after averaging blocks of this many pixels a side (1: full resolution).",
    )

    # --- reconstruction of the default backend ---
    recon_frames: int = Field(
        32, ge=2, le=512, description="Frames decoded for structure-from-motion (a dense subset containing the T scored ones); the default backend uses about half in its fast pass and up to 25 in its dense second pass."
    )
    min_confidence: float = Field(0.5, ge=0.0, le=1.0, description="Pixels with lower depth confidence are not lifted to 3D.")

    # --- verdict ---
    min_coverage: float = Field(
        0.1, ge=0.0, le=1.0,
        description="A frame with a smaller covered fraction counts as failed (0.1 of a 720 x 480 frame is still "
        "about 8,600 compared blocks at compare_scale 2).",
    )
    min_ok_fraction: float = Field(
        0.7, ge=0.0, le=1.0, description="Unscorable when fewer than this fraction of frames are registered and covered."
    )
    max_moving_fraction: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Unscorable when things moving against the recovered cameras cover more than this fraction of the frames.",
    )
    min_fov_deg: float = Field(
        5.0, ge=0.0, le=90.0,
        description="Unscorable when the recovered cameras see less than this field of view (degrees, long side): a "
        "reconstruction collapsed to a near-orthographic projection explains almost any image motion.",
    )
    detect_cuts: bool = Field(
        True,
        description="A video that cuts to another shot (`common.video.shot_cuts`: a lasting jump of the colour histogram "
        "between neighbouring frames) and whose frames do not all register in one reconstruction is unscorable: no "
        "single 3D scene explains it. Without this, the frames after the cut were left out as unregistered and the "
        "rest scored like a consistent video. False: such frames are only counted as failed.",
    )
    pose_from_neighbours: bool = Field(
        True,
        description="A scored frame that the backend did not register, or that nothing reprojects into, is posed from "
        "the registered frames around it in time (`common.posing`: interpolated, then fitted to where optical flow "
        "tracks their 3D points) and compared like the others, where the camera moves little between scored frames "
        "(`max_neighbour_step`). Left out, such a frame cost nothing: a clip whose last frames morph into another "
        "scene scored like a consistent one. False: such frames are only counted as failed.",
    )
    max_neighbour_step: float = Field(
        0.25, ge=0.0, le=10.0,
        description="Frames are posed from their neighbours only where the registered cameras move at most this "
        "fraction of the frame's long side between neighbouring scored frames (median; `common.posing.step_px`). "
        "Measured on the shared footage: hand-held clips 0.03-0.14, the synthetic renders 0.02-0.10, the sparse captures "
        "0.33 and more (their neighbours' poses say little about a frame).",
    )
    min_motion: float = Field(0.001, ge=0.0, le=1000.0, description="Unscorable (static camera) below this camera motion value.")
    min_parallax_px: float = Field(
        1.0, ge=0.0, le=10_000.0, description="Unscorable (no parallax) when the median flow between first and last frame is below this."
    )

    # --- input limits ---
    max_input_side: int = Field(8192, ge=64, le=16384, description="Reject inputs whose long side exceeds this (px).")
    max_input_frames: int = Field(3600, ge=2, le=100_000, description="Reject inputs with more frames than this.")

    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")

    def metric_id(self, backend: str, perceptual_metric: str) -> str:
        """Everything that changes a score's scale. Scores with different ids are not comparable.

        backend: the geometry backend's `score_id` (its name and revision, `colmap-flow.r10`).
        """
        lam = f"{self.lambda_:g}"
        excl = "" if self.exclude_self else "+self"
        trim = f"/trim={self.trim_sources:g}" if self.trim_sources > 0 else ""
        gain = "/gain" if self.match_exposure else ""
        crop = "/crop" if self.crop_borders else ""
        overlay = "/overlay" if self.mask_overlays else ""
        posed = f"/posed={self.max_neighbour_step:g}" if self.pose_from_neighbours else ""
        return (f"{backend}/{perceptual_metric}/lambda={lam}/T={self.frames}/side={self.max_side}/pairwise@{self.compare_scale}"
                f"{excl}{trim}{gain}{crop}{overlay}{posed}")
