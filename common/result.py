"""The scorer's result: the JSON object of `vgpa score --json` and of `POST /score`."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


class FrameScore(BaseModel):
    index: int = Field(description="Index of the frame in the decoded video (0-based).")
    registered: bool = Field(description="The geometry backend recovered a camera for this frame.")
    posed_from_neighbours: bool = Field(
        False,
        description="The backend gave this frame no camera (or one that nothing reprojected into): it was posed from "
        "the registered frames around it (`common.posing`) and compared like them.",
    )
    mse: Optional[float] = Field(None, description="Mean squared error on covered pixels, values in [0,1].")
    perceptual: Optional[float] = Field(None, description="Perceptual distance on covered pixels.")
    coverage: float = Field(0.0, description="Fraction of the frame's pixels covered by the reprojected cloud.")
    ok: bool = Field(False, description="Registered (or posed from its neighbours) and covered at least min_coverage.")


class ScoreResult(BaseModel):
    status: Literal["ok", "unscorable"]
    reason: Optional[str] = Field(None, description="Why the video is unscorable; null when status is ok.")
    score: Optional[float] = Field(None, description="E = mean over ok frames of MSE + lambda * P. Lower is better.")
    mse: Optional[float] = None
    perceptual: Optional[float] = None
    perceptual_metric: str
    lambda_: float = Field(alias="lambda")
    metric_id: str
    coverage: Optional[float] = Field(None, description="Mean covered fraction over registered frames.")
    motion: Optional[float] = Field(None, description="Mean translation + 0.1 * mean rotation (rad), normalised units.")
    fov_deg: Optional[float] = Field(
        None, description="Field of view (degrees, over the frame's long side) of the recovered cameras (their median)."
    )
    turning_in_place: bool = Field(
        False,
        description="The video was judged as a camera turning in place (a tripod pan: no parallax), every pixel reprojected "
        "by the rotation's homography (docs/backends.md, 'A camera that turns in place').",
    )
    moving_fraction: Optional[float] = Field(
        None, description="Fraction of the registered frames' pixels found moving against the cameras and left out of the error."
    )
    backend: str
    frames: int = Field(description="Number of frames scored (T).")
    frame_indices: list[int]
    registered_frames: int
    failed_frames: list[int] = Field(default_factory=list, description="Frame indices that were not registered or covered.")
    per_frame: list[FrameScore]
    size: tuple[int, int] = Field(description="(height, width) of the scored frames.")
    borders: tuple[int, int, int, int] = Field(
        (0, 0, 0, 0),
        description="(top, bottom, left, right): pixels of bars of one dark colour (letterbox, pillarbox) cut from the "
        "decoded frames before scoring; `size` is what is left.",
    )
    overlay_fraction: float = Field(
        0.0,
        description="Fraction of the frame found to be an overlay fixed to the screen (watermark, logo, caption: "
        "`common.video.static_overlay`), left out of the comparison and filled in for the reconstruction.",
    )
    shot_cuts: list[int] = Field(
        default_factory=list,
        description="Video frame indices where a new shot begins (a cut: `common.video.shot_cuts`), among the decoded frames.",
    )
    timings_s: dict[str, float]
    previews: list[str] = Field(default_factory=list, description="Preview PNG paths when previews were requested.")

    model_config = {"populate_by_name": True}

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)
