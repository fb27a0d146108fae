"""The scorer engine: `score_video` with its models loaded once and each request's settings checked.

    scorer = Scorer(ScorerConfig(score=ScoreConfig(frames=10)))
    answer = scorer.score("clip.mp4", ScoreRequest(frames=16))    # a ScoreAnswer: result or error
    answer.result.score if answer.result else answer.error.message

What a request may change is `ScoreRequest` (frames, backend, max_side, lambda), whose bounds are
`ScoreConfig`'s own fields, declared once there; the operator's tighter caps
(`max_request_frames`, `max_request_side`) are `ScorerConfig` fields. Geometry backends are built
once per engine and kept under everything that changes them (name, weights, constructor options);
the perceptual metric is cached by `common.perceptual`. Errors never escape as exceptions: an
input error, a deadline, an input too large for memory or an internal error comes back as a
`ScoreAnswer` with an `ErrorInfo`, so a caller (a Serve replica, a Ray Data actor) never dies on
bad input. No Ray here: the Serve deployment (`services/scorer.py`) and the mining job's actor
pool (`training/mining/stages.py`) both hold one of these.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from common.config import ScoreConfig
from common.deadline import check_deadline, deadline_passed
from common.errors import Answer, ConfigError, ErrorInfo, VideoGPAError, invalid_settings
from common.result import ScoreResult
from common.storage import local_copy, name_of, publishing
from common.video import VideoSource

logger = logging.getLogger(__name__)

#: The `ScoreConfig` fields a request may set (form fields of POST /score, by their JSON names).
#: Everything else (weights paths, device, limits) is fixed by whoever runs the scorer.
REQUEST_FIELDS = ("frames", "backend", "max_side", "lambda_")


class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)

    def overrides(self) -> dict[str, Any]:
        """The fields the request sets, by `ScoreConfig` field name."""
        return self.model_dump(exclude_none=True)


def _optional(name: str) -> tuple[Any, Any]:
    """`ScoreConfig.<name>` as an optional request field with the same bounds, name and description."""
    info = ScoreConfig.model_fields[name]
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return Optional[annotation], Field(None, alias=info.alias, description=info.description)


#: One request's overrides of the scorer's defaults; absent fields keep the defaults.
ScoreRequest = create_model("ScoreRequest", __base__=_RequestBase, __module__=__name__,
                            **{name: _optional(name) for name in REQUEST_FIELDS})
ScoreRequest.__doc__ = "One request's overrides of the scorer's defaults (bounds: ScoreConfig's); absent fields keep them."


class ScorerConfig(BaseModel):
    """The scorer engine: default settings, backend options, and the caps on what a request may ask."""

    # allow_inf_nan=False: every float setting is finite (nan passes every `ge`/`le` comparison).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    score: ScoreConfig = Field(
        default_factory=ScoreConfig,
        description="Default scorer settings; requests may override frames, backend, max_side and lambda only.",
    )
    backend_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Constructor options per geometry backend name, e.g. {'da3': {'process_res': 504}}; fixed by the "
        "operator, never by a request. Options that change the score (process_res) appear in the backend's name "
        "and so in metric_id.",
    )
    max_request_frames: int = Field(64, ge=2, le=256, description="Upper bound on the `frames` a request may ask for.")
    max_request_side: int = Field(1280, ge=32, le=4096, description="Upper bound on the `max_side` a request may ask for.")


class ScoreAnswer(Answer):
    """What the scorer answers: a `ScoreResult`, or the error envelope."""

    result: Optional[ScoreResult] = None

    def to_json_dict(self) -> dict:
        """The ScoreResult's JSON, or `{"error": {...}}`."""
        return self.result.to_json_dict() if self.result is not None else self.error.envelope()


class Scorer:
    """`score_video` behind a cache of backends and a check of each request's settings.

    Args:
        config (`ScorerConfig`, defaults to `ScorerConfig()`): defaults and caps.
    """

    def __init__(self, config: Optional[ScorerConfig] = None):
        from common.scoring import score_video  # a missing dependency fails here, at start-up

        self.config = config or ScorerConfig()
        self._score_video = score_video
        self._loaded: set = set()  # backends this engine has logged as loaded
        #: Internal (non-input) errors in a row: a caller's health check reads it.
        self.consecutive_internal_errors = 0
        self.backend(self.config.score)

    # -- models -------------------------------------------------------------------------------------
    def backend(self, config: ScoreConfig):
        """The geometry backend of `config` (and its perceptual metric), built once per engine."""
        from common.geometry import shared_backend
        from common.perceptual import create_metric
        from common.scoring import resolve_device

        options = self.config.backend_options.get(config.backend, {})
        t0 = time.perf_counter()
        backend = shared_backend(config.backend, config.weights, **options)
        create_metric(config.perceptual, config.lpips_weights, resolve_device(config.device))  # cached by the core
        if backend not in self._loaded:
            self._loaded.add(backend)
            logger.info("scorer loaded backend %s in %.1f s", config.backend, time.perf_counter() - t0)
        return backend

    def warmup(self) -> str:
        """Run the scoring path once on a tiny clip (milliseconds to make), so that the first request pays no set-up
        cost. Returns the verdict (or the input error's name): whatever it is, decoding, the backend and the
        metric have run once."""
        t0 = time.perf_counter()
        config = self.config.score.model_copy(update={"frames": 4, "max_side": 128, "recon_frames": 8})
        try:
            outcome = self._score_video(warmup_clip(), config, backend=self.backend(config)).status
        except VideoGPAError as err:
            outcome = type(err).__name__
        logger.info("scorer warm-up: %s in %.1f s", outcome, time.perf_counter() - t0)
        return outcome

    # -- requests -----------------------------------------------------------------------------------
    def settings(self, request: Optional[ScoreRequest] = None) -> ScoreConfig:
        """The defaults with `request`'s overrides, within this scorer's caps; ConfigError otherwise."""
        overrides = request.overrides() if request is not None else {}
        if not overrides:
            return self.config.score
        frames, side = overrides.get("frames"), overrides.get("max_side")
        if frames is not None and frames > self.config.max_request_frames:
            raise ConfigError(f"frames={frames} is above this service's limit of {self.config.max_request_frames}.")
        if side is not None and side > self.config.max_request_side:
            raise ConfigError(f"max_side={side} is above this service's limit of {self.config.max_request_side}.")
        try:
            return ScoreConfig.model_validate({**self.config.score.model_dump(), **overrides})
        except ValidationError as err:
            raise invalid_settings(err, "score setting") from None

    def score(
        self,
        source: VideoSource,
        request: Optional[ScoreRequest] = None,
        *,
        preview_dir: Optional[str] = None,
        progress: Optional[Callable[[str], None]] = None,
    ) -> ScoreAnswer:
        """Score `source` with the request's settings. Never raises for the input's sake.

        `source` and `preview_dir` may be storage URIs (`common.storage`): the video is copied to this
        node first, the previews are copied to the URI (their URIs are the result's `previews`).
        Inside a `common.deadline.deadline_scope` the work stops at the next frame or stage once
        the deadline passes (a 504 answer); error messages never name the folder of a path source.
        """

        def stage(name: str) -> None:
            check_deadline()
            if progress is not None:
                progress(name)

        def failed(err: VideoGPAError) -> ScoreAnswer:
            return ScoreAnswer(error=ErrorInfo.of(err, _without_folder(str(err), source)))

        try:
            check_deadline()
            config = self.settings(request)
            backend = self.backend(config)
            # A storage URI is read into a file on this node; previews for a URI are written here, then copied there.
            with local_copy(source) as local, publishing(preview_dir) as (previews_here, publish):
                result = self._score_video(local, config, backend=backend, preview_dir=previews_here, progress=stage)
                if result.previews and not deadline_passed():
                    result = result.model_copy(update={"previews": publish(result.previews)})
        except VideoGPAError as err:  # the input's fault (or its deadline): says nothing about the scorer
            return failed(err)
        except MemoryError:  # an input too large for this process; the allocation failed, the scorer is fine
            return ScoreAnswer.failed(413, "InputTooLargeError", "The video is too large to score with the memory this replica has.")
        except Exception as err:  # a bug or a broken process: the caller's health check decides
            self.consecutive_internal_errors += 1
            logger.exception("internal error while scoring")
            return ScoreAnswer.failed(500, "InternalError", f"Internal error while scoring ({type(err).__name__}).")
        self.consecutive_internal_errors = 0
        if deadline_passed():  # finished, but nobody waits for it any more
            return ScoreAnswer.failed(504, "DeadlineExceededError", "The request's deadline passed; its work was stopped.")
        return ScoreAnswer(result=result)


def _without_folder(message: str, source: Any) -> str:
    """An input error's sentence without the folder of a path source, or of its copy on this node (the file's own
    name stays)."""
    if not isinstance(source, (str, Path)):
        return message
    name = name_of(str(source))
    message = re.sub(r"[^\s'\"]*/" + re.escape(name), name, message)
    folder = str(Path(source).parent)
    return message.replace(folder + os.sep, "").replace(folder, "the upload folder")


def warmup_clip(n: int = 8, height: int = 96, width: int = 128):
    """(n, H, W, 3) uint8: a textured wall sliding 2 px per frame behind a box sliding 6 px per frame."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)

    def texture(h: int, w: int, cells: int):
        t = cv2.resize(rng.random((cells, max(1, cells * w // h), 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        t = t + 0.3 * rng.random((h, w, 3)).astype(np.float32)
        return (np.clip(t / 1.3, 0, 1) * 255).astype(np.uint8)

    far, near = texture(height, width + 2 * n, 12), texture(height // 2, width // 3, 6)
    frames = []
    for i in range(n):
        frame = far[:, 2 * i : 2 * i + width].copy()
        frame[height // 4 : height // 4 + near.shape[0], 10 + 6 * i : 10 + 6 * i + near.shape[1]] = near
        frames.append(frame)
    return np.stack(frames)
