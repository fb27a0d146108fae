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

from common.sampling import SampleRequest, SamplingConfig
from common.scorer import ScorerConfig
from common.storage import is_uri, join

__all__ = ["AutoscalingArgs", "SampleRequest", "SamplerArgs", "ScorerArgs", "ServiceArgs"]


class _Strict(BaseModel):
    # allow_inf_nan=False: every float setting is finite (nan passes every `ge`/`le` comparison).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

#: Upper bounds shared by several settings.
DAY_S = 86_400.0
WEEK_S = 7 * DAY_S


class AutoscalingArgs(_Strict):
    """The subset of Serve's `autoscaling_config` we expose (Serve's own names)."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Replicas kept running when idle (0 allows scale to zero).")
    max_replicas: int = Field(2, ge=1, le=1000, description="Upper bound on replicas; each holds its own models.")
    target_ongoing_requests: float = Field(
        1.0, gt=0, le=1000, description="Ongoing requests per replica that the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, le=DAY_S, description="How long demand must stay high before adding a replica.")
    downscale_delay_s: float = Field(300.0, ge=0, le=DAY_S, description="How long demand must stay low before removing one.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ScorerArgs(ScorerConfig):
    """The scorer deployment: its engine's `ScorerConfig` (settings, backend options, request caps) and replicas."""

    num_replicas: Optional[int] = Field(
        None, ge=1, le=1000, description="A fixed number of replicas; when set, `autoscaling` is ignored."
    )
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs, description="Replica autoscaling.")
    max_ongoing_requests: int = Field(
        1, ge=1, le=1000,
        description="Requests a replica holds at once (scoring is compute-bound: 1 on a CPU replica; with max_batch_size "
        "n > 1 at least 2n, so that the next batch is gathered while one is scored).",
    )
    max_batch_size: int = Field(
        1, ge=1, le=64,
        description="Videos a replica scores together (Serve's @serve.batch): concurrently on n worker threads, so "
        "one video's decoding, rasterising and metrics overlap another's model forward. 1: one video at a time "
        "(CPU replicas); a GPU replica should take several (see benchmarks/gpu_check.py).",
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="How long a batch that is not full waits for more requests (s)."
    )
    max_queued_requests: int = Field(
        8, ge=1, le=10_000, description="Requests waiting for a scorer replica per ingress replica; beyond it: 503 + Retry-After."
    )
    num_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs per replica; fractions share one GPU between replicas.")
    memory_gb: Optional[float] = Field(None, gt=0, le=4096, description="Memory reserved per replica (GiB) for scheduling.")
    warmup: bool = Field(
        True, description="Score a tiny synthetic video when a replica starts, so models are loaded before traffic."
    )
    unhealthy_after_errors: int = Field(
        3, ge=1, le=1000, description="Consecutive internal (non-input) errors after which check_health fails and Serve replaces the replica."
    )
    health_check_period_s: float = Field(10.0, gt=0, le=3600, description="Seconds between Serve health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, le=3600, description="A health check slower than this fails.")

    @model_validator(mode="after")
    def _batch_fits(self) -> "ScorerArgs":
        if self.max_batch_size > 1 and self.max_ongoing_requests < 2 * self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least 2 x max_batch_size "
                f"({self.max_batch_size}): one batch is scored while the next one is gathered")
        return self


class SamplerArgs(SamplingConfig):
    """The sampler deployment: its engine's `SamplingConfig` (model folder, adapters, limits) and replicas."""

    num_replicas: int = Field(1, ge=1, le=1000, description="Sampler replicas (each holds the whole pipeline).")
    max_ongoing_requests: int = Field(1, ge=1, le=1000, description="Requests a sampler replica works on at once.")
    max_queued_requests: int = Field(4, ge=1, le=10_000, description="Requests waiting per caller; beyond it: 503 + Retry-After.")
    num_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs per replica (fractional allowed).")
    graceful_shutdown_timeout_s: float = Field(
        1800.0, gt=0, le=DAY_S, description="Time a stopping replica gets to finish sampling; keep above the longest request."
    )
    output_ttl_s: Optional[float] = Field(
        WEEK_S, gt=0, le=365 * DAY_S,
        description="Sample folders older than this are deleted by the ingress's sweep, like previews; keep it above "
        "the longest mining run that reads them (None: never deleted).",
    )


class ServiceArgs(_Strict):
    """Everything `build_app` needs. `ServiceArgs.model_validate(args)` is the only entry point."""

    scorer: ScorerArgs = Field(default_factory=ScorerArgs, description="The scorer deployment.")
    sampler: Optional[SamplerArgs] = Field(None, description="The sampler deployment; absent: the app serves the scorer only.")
    max_upload_mb: float = Field(
        512.0, gt=0, le=100_000, description="Largest request body (MB); larger uploads get 413 while streaming."
    )
    max_batch_files: int = Field(16, ge=1, le=1000, description="Most videos in one POST /score/batch request.")
    request_timeout_s: float = Field(
        600.0, gt=0, le=DAY_S,
        description="Deadline of one request, counted from its arrival (upload, queueing and scoring); past it: 504. "
        "Requests may ask for less.",
    )
    upload_timeout_s: float = Field(
        300.0, gt=0, le=DAY_S,
        description="Longest time to receive a request body; a slower upload gets 408 and its slot is freed.",
    )
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait for the next chunk of a request body; past it: 408."
    )
    retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After (s) sent with 503 answers when the service is overloaded.")
    work_dir: Optional[str] = Field(
        None,
        description="Uploads, previews and samples go here: a folder (on a multi-node cluster, a mount all nodes share), "
        "or a storage URI that pyarrow.fs opens (s3://bucket/prefix, gs://bucket/prefix, file:///path): then no "
        "folder is shared, each replica copies what it reads and writes through the URI. Default: a temp folder.",
    )
    preview_ttl_s: float = Field(3600.0, gt=0, le=WEEK_S, description="Previews are deleted this long after they were written.")
    auth_token_env: Optional[str] = Field(
        "VGPA_API_TOKEN", description="Environment variable holding a bearer token; when set and non-empty, requests need it."
    )
    auth_token_file: Optional[Path] = Field(None, description="A file holding the bearer token (wins over the env variable).")
    ingress_replicas: int = Field(1, ge=1, le=1000, description="Ingress (HTTP) replicas.")
    ingress_max_ongoing_requests: int = Field(
        32, ge=1, le=10_000,
        description="Requests with a body (uploads, sampling) one ingress replica handles at once; beyond it: 503 + "
        "Retry-After. Probes and file downloads never wait for these slots.",
    )
    ingress_max_queued_requests: int = Field(
        64, ge=1, le=100_000, description="Requests waiting for an ingress replica; beyond it: 503."
    )

    @field_validator("scorer", mode="before")
    @classmethod
    def _scorer_default(cls, v: Any) -> Any:
        return {} if v is None else v

    def storage_uri(self) -> Optional[str]:
        """`work_dir` when it is a storage URI (common.storage), else None."""
        return self.work_dir if is_uri(self.work_dir) else None

    def resolved_work_dir(self) -> Path:
        """The folder on this node: `work_dir`, or (default, or a storage URI) a temp folder for this node's own files."""
        if self.work_dir is not None and not is_uri(self.work_dir):
            return Path(self.work_dir)
        import tempfile

        return Path(tempfile.gettempdir()) / "videogpa-service"

    def location(self, *parts: str) -> str:
        """Where `work_dir/part/...` is for every replica: under the storage URI, or the shared folder."""
        return join(self.storage_uri() or str(self.resolved_work_dir()), *parts)

    def samples_location(self) -> str:
        """Where the sampler writes: its `output_dir`, or `work_dir/samples`."""
        return str(self.sampler.output_dir) if self.sampler and self.sampler.output_dir else self.location("samples")

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
