"""The sampler deployment: a Serve replica holding one `common.sampling.Sampler` engine.

The engine (CogVideoX or Wan, text- or image-to-video, from a local diffusers folder, its LoRA
adapters) writes each request's videos, latents and text embeddings under its output folder and
answers a `SampleAnswer` with their paths: callers inside the cluster (the mining job) read them
from storage all nodes share; HTTP clients get URLs from the ingress. What is here is Serve's
part: replica options, a worker thread that keeps the replica's event loop free, probes.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from ray import serve

from common.sampling import SampleAnswer, SampleRequest, Sampler
from services.config import SamplerArgs


def sampler_deployment_options(args: SamplerArgs) -> dict[str, Any]:
    actor_options: dict[str, Any] = {"num_cpus": args.num_cpus}
    if args.num_gpus > 0:
        actor_options["num_gpus"] = args.num_gpus
    return {
        "name": "Sampler",
        "num_replicas": args.num_replicas,
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "graceful_shutdown_timeout_s": args.graceful_shutdown_timeout_s,
        "ray_actor_options": actor_options,
    }


class SamplerServer:
    """Forwards `sample` to its engine on a worker thread."""

    def __init__(self, args: SamplerArgs, output: str):
        self._args = args
        self._engine = Sampler(args, output)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgpa-sample")

    def ready(self) -> dict:
        return {"ready": True, "pipeline": self._engine.pipeline_name, "adapters": sorted(self._args.adapters)}

    def check_health(self) -> None:
        if self._engine is None:
            raise RuntimeError("sampler pipeline not loaded")

    async def sample(self, request: SampleRequest, image_path: Optional[str] = None) -> SampleAnswer:
        """Sample `request` (first frame at `image_path` for image-to-video models)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._engine.sample, request, image_path)


def build_sampler(args: SamplerArgs, output: str):
    """A bound sampler deployment writing under `output` (a folder all nodes share, or a storage URI)."""
    deployment = serve.deployment(SamplerServer).options(**sampler_deployment_options(args))
    return deployment.bind(args, output)
