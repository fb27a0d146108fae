"""The scorer deployment: a thin shim around `common.scoring.score_video`.

One replica loads the geometry backend and the perceptual metric once (the warm-up call at
start-up), then scores videos in worker threads, so the replica's event loop stays free for
Serve's health checks and cancellations. With `max_batch_size` 1 (CPU replicas) it scores one
video at a time. With n > 1 (GPU replicas), Serve's `@serve.batch` gathers up to n requests and
the replica scores them concurrently on n threads: one video's decoding, rasterising and metrics
run while another's model forward holds the GPU, and a second batch is gathered meanwhile, so
the GPU is not left idle between calls. (Each video still calls the model on its own: one forward
over several videos' frames needs the core to score in stages; see benchmarks/README.md.) Input errors never escape as
exceptions: they come back as `{"error": {...}}` with the HTTP status the ingress answers with,
so a replica never dies on bad input, and only internal errors count towards its health.
A request past its deadline, or cancelled by the ingress, stops at the next frame or stage and
leaves no previews behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ray import serve

from common.config import ScoreConfig
from common.deadline import check_deadline, deadline_passed, deadline_scope
from common.errors import VideoGPAError, invalid_settings
from services.config import ScorerArgs

logger = logging.getLogger("ray.serve")

#: Batches a replica holds at once when max_batch_size > 1: one being scored, the next gathering.
BATCHES_IN_FLIGHT = 2


def scorer_deployment_options(args: ScorerArgs) -> dict[str, Any]:
    """`serve.deployment` options for the scorer, from its config (Serve's own option names)."""
    actor_options: dict[str, Any] = {"num_cpus": args.num_cpus}
    if args.num_gpus > 0:
        actor_options["num_gpus"] = args.num_gpus
    if args.memory_gb is not None:
        actor_options["memory"] = int(args.memory_gb * 1024**3)
    options: dict[str, Any] = {
        "name": "Scorer",
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "ray_actor_options": actor_options,
        "health_check_period_s": args.health_check_period_s,
        "health_check_timeout_s": args.health_check_timeout_s,
    }
    if args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    else:
        options["autoscaling_config"] = args.autoscaling.model_dump()
    return options


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


@dataclass
class _Job:
    """One scoring request as the worker threads see it."""

    path: str
    overrides: dict
    preview_dir: Optional[str]
    deadline: Optional[float]
    cancelled: threading.Event


class ScorerServer:
    """Scores video files (paths the ingress wrote on storage this replica can read)."""

    def __init__(self, args: dict):
        self._args = ScorerArgs.model_validate(args)
        self._default = self._args.score
        # One worker per batch slot: scoring is compute-bound; requests queue here (bounded by
        # max_ongoing_requests).
        self._pool = ThreadPoolExecutor(max_workers=self._args.max_batch_size, thread_name_prefix="vgpa-score")
        self._batched = self._batch_handler()
        self._active_lock = threading.Lock()
        self._active = self._peak_active = 0
        self._consecutive_internal_errors = 0
        self._ready = False
        # App metrics, exported beside Serve's own (Prometheus: ray_vgpa_score_*).
        from ray.serve import metrics

        self._m_results = metrics.Counter(
            "vgpa_score_results", description="Scored requests by outcome: ok, unscorable, or the HTTP error status.",
            tag_keys=("outcome",))
        self._m_seconds = metrics.Histogram(
            "vgpa_score_seconds", description="Time to score one video (s).",
            boundaries=[0.5, 1, 2, 5, 10, 20, 60, 120, 300])
        # Imported here: a replica that cannot import the core fails to start (and /readyz says so).
        from common.scoring import score_video

        self._score_video = score_video
        self._backends: dict[str, Any] = {}
        self._load(self._default)
        if self._args.warmup:
            self._warmup()
        self._ready = True

    # -- start-up ---------------------------------------------------------------------------------
    def _load(self, config: ScoreConfig):
        """The geometry backend and the perceptual metric of `config`, built once per replica."""
        from common.geometry import create_backend
        from common.perceptual import create_metric
        from common.scoring import resolve_device

        if config.backend not in self._backends:
            t0 = time.perf_counter()
            options = self._args.backend_options.get(config.backend, {})
            backend = create_backend(config.backend, config.weights, **options)
            if self._args.max_batch_size > 1 and not backend.thread_safe:
                backend = _Serialized(backend)
            self._backends[config.backend] = backend
            create_metric(config.perceptual, config.lpips_weights, resolve_device(config.device))  # cached by the core
            logger.info("scorer loaded backend %s in %.1f s", config.backend, time.perf_counter() - t0)
        return self._backends[config.backend]

    def _warmup(self) -> None:
        """Run the scoring path once on a tiny clip, so the first request pays no set-up cost.

        The clip is made in milliseconds (rendering a real scene costs seconds on a busy CPU);
        whatever its verdict, decoding, the backend and the metric have run once.
        """
        t0 = time.perf_counter()
        config = self._default.model_copy(update={"frames": 4, "max_side": 128, "recon_frames": 8})
        try:
            result = self._score_video(warmup_clip(), config, backend=self._load(config))
            logger.info("scorer warm-up: %s in %.1f s", result.status, time.perf_counter() - t0)
        except VideoGPAError as err:
            logger.info("scorer warm-up input error (models loaded): %s", err)

    # -- requests ---------------------------------------------------------------------------------
    async def score(
        self,
        path: str,
        overrides: Optional[dict] = None,
        preview_dir: Optional[str] = None,
        deadline: Optional[float] = None,
    ) -> dict:
        """Score `path`. Returns `{"result": ScoreResult JSON}` or `{"error": {"status", "type", "message"}}`.

        `overrides` are the request's form fields (already restricted to REQUEST_SCORE_FIELDS);
        `deadline` is a `time.time()` after which nobody waits for the answer (work is skipped).
        """
        job = _Job(path, overrides or {}, preview_dir, deadline, threading.Event())
        try:
            if self._batched is not None:
                return await self._batched(job)
            return (await self._score_jobs([job]))[0]
        except asyncio.CancelledError:
            # The ingress gave up (its deadline, or the client left): the worker thread stops at
            # its next check, and work still queued behind another request never starts.
            job.cancelled.set()
            raise

    def _batch_handler(self):
        """`_score_jobs` under `@serve.batch` in a Serve replica with max_batch_size > 1; else None.

        Outside a replica (the mining job's local actor pool calls this class directly) requests
        go straight to the worker threads.
        """
        from ray.serve.exceptions import RayServeException

        if self._args.max_batch_size == 1:
            return None
        try:
            serve.get_replica_context()
        except RayServeException:
            return None
        return serve.batch(max_batch_size=self._args.max_batch_size, batch_wait_timeout_s=self._args.batch_wait_timeout_s,
                           max_concurrent_batches=BATCHES_IN_FLIGHT)(self._score_jobs)

    async def _score_jobs(self, jobs: list[_Job]) -> list[dict]:
        """Score `jobs` (a batch, or one request) concurrently on the worker threads; answers in order."""
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._pool, self._score_sync, job) for job in jobs)))

    def _score_sync(self, job: _Job) -> dict:
        t0 = time.perf_counter()
        with self._active_lock:
            self._active += 1
            self._peak_active = max(self._peak_active, self._active)
        try:
            with deadline_scope(job.deadline, job.cancelled):
                answer = self._score_checked(job.path, job.overrides, job.preview_dir)
        finally:
            with self._active_lock:
                self._active -= 1
        preview_dir = job.preview_dir
        if preview_dir is not None and "result" not in answer:
            shutil.rmtree(preview_dir, ignore_errors=True)  # nothing will ever reference them
        outcome = answer["result"]["status"] if "result" in answer else str(answer["error"]["status"])
        self._m_results.inc(tags={"outcome": outcome})
        if "result" in answer:
            self._m_seconds.observe(time.perf_counter() - t0)
        return answer

    def _score_checked(self, path: str, overrides: dict, preview_dir: Optional[str]) -> dict:
        try:
            check_deadline()
            config = self._config_for(overrides)
            backend = self._load(config)
        except VideoGPAError as err:
            return _error(err.http_status, type(err).__name__, _without_paths(str(err), path))
        try:
            # The deadline is checked as each stage starts (and by the decoder for every frame).
            result = self._score_video(path, config, backend=backend, preview_dir=preview_dir,
                                       progress=lambda _stage: check_deadline())
        except VideoGPAError as err:  # the input's fault (or its deadline): says nothing about the replica
            return _error(err.http_status, type(err).__name__, _without_paths(str(err), path))
        except MemoryError:  # an input too large for this replica; the allocation failed, the replica is fine
            return _error(413, "InputTooLargeError", "The video is too large to score with the memory this replica has.")
        except Exception as err:  # a bug or a broken replica: answer 500, let check_health decide
            self._consecutive_internal_errors += 1
            logger.exception("internal error while scoring")
            return _error(500, "InternalError", f"Internal error while scoring ({type(err).__name__}).")
        self._consecutive_internal_errors = 0
        if deadline_passed():  # finished, but nobody waits for it any more: its previews go too
            return _error(504, "DeadlineExceededError", "The request's deadline passed; its work was stopped.")
        return {"result": result.to_json_dict()}

    def _config_for(self, overrides: dict) -> ScoreConfig:
        from common.errors import ConfigError
        from pydantic import ValidationError

        if not overrides:
            return self._default
        frames = overrides.get("frames")
        if frames is not None and int(frames) > self._args.max_request_frames:
            raise ConfigError(f"frames={frames} is above this service's limit of {self._args.max_request_frames}.")
        side = overrides.get("max_side")
        if side is not None and int(side) > self._args.max_request_side:
            raise ConfigError(f"max_side={side} is above this service's limit of {self._args.max_request_side}.")
        data = self._default.model_dump(by_alias=True)
        data.update({("lambda" if k == "lambda_" else k): v for k, v in overrides.items()})
        try:
            return ScoreConfig.model_validate(data)
        except ValidationError as err:
            raise invalid_settings(err, "score setting") from None

    # -- probes -----------------------------------------------------------------------------------
    def ready(self) -> dict:
        """Models are loaded (the constructor finished); used by GET /readyz."""
        return {"ready": self._ready, "backend": self._default.backend}

    def replica_info(self) -> dict:
        """Which replica answered (actor name and pid): for operators and the fault test."""
        import ray

        ctx = serve.get_replica_context()
        return {
            "actor_name": ray.get_runtime_context().get_actor_name(),
            "replica_id": ctx.replica_id.unique_id,
            "pid": os.getpid(),
        }

    def load_stats(self, reset: bool = False) -> dict:
        """How hard this replica has worked since the last reset: for operators, benchmarks and tests.

        `peak_concurrent_videos`: most videos scored at the same moment; on CUDA, the device's name
        and `cuda_peak_allocated_mb` (torch's peak allocated memory in this replica). `reset`
        starts a new measurement after reading.
        """
        import torch

        out = {"max_batch_size": self._args.max_batch_size, "batched": self._batched is not None,
               "peak_concurrent_videos": self._peak_active, "cuda_device": None, "cuda_peak_allocated_mb": None}
        if torch.cuda.is_available():
            out["cuda_device"] = torch.cuda.get_device_name()
            out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            if reset:
                torch.cuda.reset_peak_memory_stats()
        if reset:
            with self._active_lock:
                self._peak_active = self._active
        return out

    def check_health(self) -> None:
        """Serve calls this periodically; raising replaces the replica."""
        if not self._ready:
            raise RuntimeError("scorer models are not loaded")
        if self._consecutive_internal_errors >= self._args.unhealthy_after_errors:
            raise RuntimeError(f"{self._consecutive_internal_errors} consecutive internal scoring errors")


class _Serialized:
    """A backend that is not thread-safe, called by one scoring thread at a time (the others' decoding,
    rasterising and metrics still overlap it)."""

    def __init__(self, backend):
        self._backend, self._lock = backend, threading.Lock()
        self.name, self.thread_safe = backend.name, True

    def reconstruct(self, *args, **kwargs):
        with self._lock:
            return self._backend.reconstruct(*args, **kwargs)


def _error(status: int, kind: str, message: str) -> dict:
    return {"error": {"status": status, "type": kind, "message": message}}


def _without_paths(message: str, upload: str) -> str:
    """An input error's sentence without the server's folders (the upload's own name stays)."""
    folder = str(Path(upload).parent)
    return message.replace(folder + os.sep, "").replace(folder, "the upload folder")


def build_scorer(args: ScorerArgs):
    """A bound scorer deployment from its config."""
    deployment = serve.deployment(ScorerServer).options(**scorer_deployment_options(args))
    return deployment.bind(args.model_dump(mode="json", by_alias=True))
