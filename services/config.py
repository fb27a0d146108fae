"""Typed configuration of the service: one `ServiceArgs` object, validated, built from YAML/JSON `args`.

The same dict is accepted by `build_app(args)` (the `import_path` of a Serve config file), by
`vgpa serve --config FILE` and by the tests. Every field has a description; unknown keys are
rejected so that a typo in a config file fails at start-up instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.config import ScoreConfig

#: Form fields of `POST /score` that a request may set, mapped to `ScoreConfig` field names.
#: Everything else (weights paths, device, limits) is fixed by the operator's config.
REQUEST_SCORE_FIELDS = {"frames": "frames", "backend": "backend", "max_side": "max_side", "lambda": "lambda_"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AutoscalingArgs(_Strict):
    """The subset of Serve's `autoscaling_config` we expose (Serve's own names)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept running when idle (0 allows scale to zero).")
    max_replicas: int = Field(2, ge=1, description="Upper bound on replicas; each holds its own models.")
    target_ongoing_requests: float = Field(
        1.0, gt=0, description="Ongoing requests per replica that the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="How long demand must stay high before adding a replica.")
    downscale_delay_s: float = Field(300.0, ge=0, description="How long demand must stay low before removing one.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ScorerArgs(_Strict):
    """The scorer deployment: one geometry backend and one perceptual metric per replica."""

    score: ScoreConfig = Field(
        default_factory=ScoreConfig,
        description="Default scorer settings; requests may override frames, backend, max_side and lambda only.",
    )
    num_replicas: Optional[int] = Field(
        None, ge=1, description="A fixed number of replicas; when set, `autoscaling` is ignored."
    )
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs, description="Replica autoscaling.")
    max_ongoing_requests: int = Field(
        1, ge=1, description="Requests a replica works on at once (scoring is compute-bound: keep 1 per replica)."
    )
    max_queued_requests: int = Field(
        8, ge=1, description="Requests waiting for a scorer replica per ingress replica; beyond it: 503 + Retry-After."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions share one GPU between replicas.")
    memory_gb: Optional[float] = Field(None, gt=0, description="Memory reserved per replica (GiB) for scheduling.")
    warmup: bool = Field(
        True, description="Score a tiny synthetic video when a replica starts, so models are loaded before traffic."
    )
    max_request_frames: int = Field(64, ge=2, description="Upper bound on the `frames` a request may ask for.")
    max_request_side: int = Field(1280, ge=32, description="Upper bound on the `max_side` a request may ask for.")
    unhealthy_after_errors: int = Field(
        3, ge=1, description="Consecutive internal (non-input) errors after which check_health fails and Serve replaces the replica."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between Serve health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check slower than this fails.")


class SamplerArgs(_Strict):
    """The video diffusion sampler (CogVideoX text-to-video or image-to-video) from a local folder."""

    model_dir: Path = Field(description="A diffusers pipeline folder (model_index.json); loaded with from_pretrained, never downloaded.")
    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description="LoRA adapters by name -> local folder; requests select one by name, never by path.",
    )
    output_dir: Optional[Path] = Field(
        None, description="Where videos, latents and text embeddings are written (storage all nodes share). Default: <work_dir>/samples."
    )
    dtype: str = Field("auto", description="'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'float16' or 'bfloat16'.")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")
    max_sequence_length: Optional[int] = Field(
        None, ge=1, description="Prompt tokens; default: the tokenizer's model_max_length capped at 226 (CogVideoX)."
    )
    default_steps: int = Field(50, ge=1, description="Denoising steps when the request gives none.")
    default_guidance: float = Field(6.0, ge=0, description="Classifier-free guidance scale when the request gives none.")
    max_seeds: int = Field(8, ge=1, description="Most seeds one request may ask for.")
    max_steps: int = Field(100, ge=1, description="Most denoising steps one request may ask for.")
    fps: int = Field(8, ge=1, description="Frame rate of the written mp4 files.")
    num_replicas: int = Field(1, ge=1, description="Sampler replicas (each holds the whole pipeline).")
    max_ongoing_requests: int = Field(1, ge=1, description="Requests a sampler replica works on at once.")
    max_queued_requests: int = Field(4, ge=1, description="Requests waiting per caller; beyond it: 503 + Retry-After.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractional allowed).")
    graceful_shutdown_timeout_s: float = Field(
        1800.0, gt=0, description="Time a stopping replica gets to finish sampling; keep above the longest request."
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in {"auto", "float32", "float16", "bfloat16"}:
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, not {v!r}")
        return v


class ServiceArgs(_Strict):
    """Everything `build_app` needs. `ServiceArgs.model_validate(args)` is the only entry point."""

    scorer: ScorerArgs = Field(default_factory=ScorerArgs, description="The scorer deployment.")
    sampler: Optional[SamplerArgs] = Field(None, description="The sampler deployment; absent: the app serves the scorer only.")
    max_upload_mb: float = Field(512.0, gt=0, description="Largest request body (MB); larger uploads get 413 while streaming.")
    max_batch_files: int = Field(16, ge=1, description="Most videos in one POST /score/batch request.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline for scoring one request (queueing included); past it: 504. Requests may ask for less."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After (s) sent with 503 answers when the service is overloaded.")
    work_dir: Optional[Path] = Field(
        None,
        description="Uploads, previews and samples go here; on a multi-node cluster it must be storage all nodes share. Default: a temp folder.",
    )
    preview_ttl_s: float = Field(3600.0, gt=0, description="Previews are deleted this long after they were written.")
    auth_token_env: Optional[str] = Field(
        "VGPA_API_TOKEN", description="Environment variable holding a bearer token; when set and non-empty, requests need it."
    )
    auth_token_file: Optional[Path] = Field(None, description="A file holding the bearer token (wins over the env variable).")
    ingress_replicas: int = Field(1, ge=1, description="Ingress (HTTP) replicas.")
    ingress_max_ongoing_requests: int = Field(32, ge=1, description="Uploads one ingress replica handles at once.")
    ingress_max_queued_requests: int = Field(64, ge=1, description="Requests waiting for an ingress replica; beyond it: 503.")

    @field_validator("scorer", mode="before")
    @classmethod
    def _scorer_default(cls, v: Any) -> Any:
        return {} if v is None else v

    def resolved_work_dir(self) -> Path:
        if self.work_dir is not None:
            return Path(self.work_dir)
        import tempfile

        return Path(tempfile.gettempdir()) / "videogpa-service"

    def auth_token(self) -> Optional[str]:
        """The bearer token requests must carry, or None when authentication is off."""
        if self.auth_token_file is not None:
            token = Path(self.auth_token_file).read_text().strip()
            if not token:
                raise ValueError(f"auth_token_file {self.auth_token_file} is empty")
            return token
        if self.auth_token_env:
            token = os.environ.get(self.auth_token_env, "").strip()
            return token or None
        return None
