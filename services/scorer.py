"""The scorer deployment: a Serve replica holding one `common.scorer.Scorer` engine.

The engine loads the geometry backend and the perceptual metric once (the warm-up call at
start-up), checks each request's settings and answers a `ScoreAnswer` (a result, or the error
envelope), so a replica never dies on bad input and only internal errors count towards its
health. What is here is Serve's part: replica options, worker threads that keep the replica's
event loop free for health checks and cancellations, `@serve.batch`, the request's deadline and
cancellation, metrics and probes. With `max_batch_size` 1 (CPU replicas) it scores one video at
a time. With n > 1 (GPU replicas), Serve's `@serve.batch` gathers up to n requests and the
replica scores them concurrently on n threads: one video's decoding, rasterising and metrics run
while another's model forward holds the GPU, and a second batch is gathered meanwhile, so the GPU
is not left idle between calls. (Each video still calls the model on its own: one forward over
several videos' frames needs the core to score in stages; see benchmarks/README.md.) A request
past its deadline, or cancelled by the ingress, stops at the next frame or stage and leaves no
previews behind.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from ray import serve

from common import storage
from common.deadline import deadline_scope
from common.scorer import ScoreAnswer, Scorer, ScoreRequest
from services.config import ScorerArgs

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


@dataclass
class _Job:
    """One scoring request as the worker threads see it."""

    path: str
    request: Optional[ScoreRequest]
    preview_dir: Optional[str]
    deadline: Optional[float]
    cancelled: threading.Event


class ScorerServer:
    """Scores video files (paths the ingress wrote on storage this replica can read) with its engine."""

    def __init__(self, args: ScorerArgs):
        self._args = args
        # One worker per batch slot: scoring is compute-bound; requests queue here (bounded by
        # max_ongoing_requests).
        self._pool = ThreadPoolExecutor(max_workers=args.max_batch_size, thread_name_prefix="vgpa-score")
        self._batched = self._batch_handler()
        self._active_lock = threading.Lock()
        self._active = self._peak_active = 0
        self._ready = False
        # App metrics, exported beside Serve's own (Prometheus: ray_vgpa_score_*).
        from ray.serve import metrics

        self._m_results = metrics.Counter(
            "vgpa_score_results", description="Scored requests by outcome: ok, unscorable, or the HTTP error status.",
            tag_keys=("outcome",))
        self._m_seconds = metrics.Histogram(
            "vgpa_score_seconds", description="Time to score one video (s).",
            boundaries=[0.5, 1, 2, 5, 10, 20, 60, 120, 300])
        # Built here: a replica that cannot import the core or load its models fails to start (and /readyz says so).
        self._engine = Scorer(args)
        if args.warmup:
            self._engine.warmup()
        self._ready = True

    # -- requests ---------------------------------------------------------------------------------
    async def score(
        self,
        path: str,
        request: Optional[ScoreRequest] = None,
        preview_dir: Optional[str] = None,
        deadline: Optional[float] = None,
    ) -> ScoreAnswer:
        """Score `path` with `request`'s overrides (validated by the caller as a `ScoreRequest`).

        `path` and `preview_dir` are paths on storage this replica shares, or storage URIs (common.storage).

        `deadline` is a `time.time()` after which nobody waits for the answer (work is skipped).
        """
        job = _Job(path, request, preview_dir, deadline, threading.Event())
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
        """`_score_jobs` under `@serve.batch` when max_batch_size > 1; else None."""
        if self._args.max_batch_size == 1:
            return None
        return serve.batch(max_batch_size=self._args.max_batch_size, batch_wait_timeout_s=self._args.batch_wait_timeout_s,
                           max_concurrent_batches=BATCHES_IN_FLIGHT)(self._score_jobs)

    async def _score_jobs(self, jobs: list[_Job]) -> list[ScoreAnswer]:
        """Score `jobs` (a batch, or one request) concurrently on the worker threads; answers in order."""
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._pool, self._score_sync, job) for job in jobs)))

    def _score_sync(self, job: _Job) -> ScoreAnswer:
        t0 = time.perf_counter()
        with self._active_lock:
            self._active += 1
            self._peak_active = max(self._peak_active, self._active)
        try:
            with deadline_scope(job.deadline, job.cancelled):
                answer = self._engine.score(job.path, job.request, preview_dir=job.preview_dir)
        finally:
            with self._active_lock:
                self._active -= 1
        if job.preview_dir is not None and answer.result is None:
            storage.delete(job.preview_dir)  # nothing will ever reference them
        outcome = answer.result.status if answer.result is not None else str(answer.error.status)
        self._m_results.inc(tags={"outcome": outcome})
        if answer.result is not None:
            self._m_seconds.observe(time.perf_counter() - t0)
        return answer

    # -- probes -----------------------------------------------------------------------------------
    def ready(self) -> dict:
        """Models are loaded (the constructor finished); used by GET /readyz."""
        return {"ready": self._ready, "backend": self._args.score.backend}

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
        errors = self._engine.consecutive_internal_errors
        if errors >= self._args.unhealthy_after_errors:
            raise RuntimeError(f"{errors} consecutive internal scoring errors")


def build_scorer(args: ScorerArgs):
    """A bound scorer deployment from its config."""
    deployment = serve.deployment(ScorerServer).options(**scorer_deployment_options(args))
    return deployment.bind(args)
