"""The sampler deployment: CogVideoX text-to-video or image-to-video from a local diffusers folder.

One request = one prompt (optionally a first frame) and N seeds. For each seed the replica
writes, under `<output_dir>/<sample_id>/`:

    seed-<s>.mp4             the decoded video (H.264)
    seed-<s>.latents.pt      the final latents [F, C, h, w] in the transformer's space
                             (already multiplied by the VAE scaling factor), float32
    prompt_embeds.pt         the prompt's T5 embeddings [L, D], float32 (shared by all seeds)
    request.json             the request, the model folder's name, the pipeline and sizes (provenance;
                             no server path: HTTP clients can download it)

and returns those paths, never video bytes: callers inside the cluster (the mining job) read
them from storage all nodes share; HTTP clients get URLs from the ingress. LoRA adapters are
loaded once at start-up from folders named in the config and selected per request by name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ray import serve

from common.cogvideox import default_video_size, latent_frames
from common.errors import invalid_settings
from common.lora import load_lora, select_adapter
from common.video import write_video
from services.config import SampleRequest, SamplerArgs

logger = logging.getLogger("ray.serve")


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


def _error(status: int, kind: str, message: str) -> dict:
    return {"error": {"status": status, "type": kind, "message": message}}


class SamplerServer:
    """Holds one diffusers CogVideoX pipeline; `sample(request)` runs N seeds and writes files."""

    def __init__(self, args: dict, default_output_dir: str):
        import torch
        from diffusers import DiffusionPipeline

        self._args = SamplerArgs.model_validate(args)
        self._out = Path(self._args.output_dir or default_output_dir)
        self._out.mkdir(parents=True, exist_ok=True)
        model_dir = Path(self._args.model_dir)
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
        device = self._args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self._args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self._device = torch.device(device)
        t0 = time.perf_counter()
        pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=getattr(torch, dtype), local_files_only=True)
        self._pipe = pipe.to(self._device)
        self._pipe.set_progress_bar_config(disable=True)
        self._i2v = "ImageToVideo" in type(pipe).__name__
        for name, folder in self._args.adapters.items():
            load_lora(self._pipe, folder, name)  # the project's one loading path: the trained alpha / r
        if self._args.adapters:
            select_adapter(self._pipe, None)
        tok_max = getattr(self._pipe.tokenizer, "model_max_length", 226) or 226
        self._max_seq = self._args.max_sequence_length or min(int(tok_max), 226)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgpa-sample")
        self._lock = threading.Lock()
        self._model_dir = str(model_dir)
        logger.info("sampler loaded %s (%s) in %.1f s", model_dir, type(pipe).__name__, time.perf_counter() - t0)

    def ready(self) -> dict:
        return {"ready": True, "pipeline": type(self._pipe).__name__, "adapters": sorted(self._args.adapters)}

    def check_health(self) -> None:
        if self._pipe is None:
            raise RuntimeError("sampler pipeline not loaded")

    async def sample(self, request: dict, image_path: Optional[str] = None) -> dict:
        """request: prompt, negative_prompt, seeds, steps, guidance, frames, height, width, adapter.

        Returns {"sample_id", "adapter", "samples": [{"seed", "video", "latents", "prompt_embeds"}],
        "timings_s"} with absolute paths, or {"error": {...}} for a bad request.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._sample_guarded, request, image_path)

    def _sample_guarded(self, request: dict, image_path: Optional[str]) -> dict:
        from pydantic import ValidationError

        try:
            req = SampleRequest.model_validate(request)
        except ValidationError as err:
            return _error(422, "ValidationError", str(invalid_settings(err, "sample request field")))
        try:
            return self._sample_sync(req, image_path)
        except MemoryError:
            return _error(413, "InputTooLargeError", "The request needs more memory than this replica has.")
        except Exception as err:  # a bug or a broken replica: the request fails, the replica lives
            # The log has the details; the answer names the error class only (no text, no paths).
            logger.exception("internal error while sampling")
            return _error(500, "InternalError", f"Internal error while sampling ({type(err).__name__}).")

    def _check(self, req: SampleRequest, image_path: Optional[str]) -> Optional[dict]:
        """This sampler's own limits (absolute bounds were checked by SampleRequest)."""
        a = self._args
        if len(req.seed_list()) > a.max_seeds:
            return _error(422, "ValidationError", f"At most {a.max_seeds} seeds per request.")
        if req.steps is not None and req.steps > a.max_steps:
            return _error(422, "ValidationError", f"steps must be between 1 and {a.max_steps}.")
        if req.adapter is not None and req.adapter not in a.adapters:
            known = ", ".join(sorted(a.adapters)) or "none"
            return _error(422, "ValidationError", f"Unknown adapter {req.adapter!r} (configured: {known}).")
        if self._i2v and image_path is None:
            return _error(422, "ValidationError", "This is an image-to-video model: upload the first frame as 'image'.")
        if not self._i2v and image_path is not None:
            return _error(422, "ValidationError", "This is a text-to-video model: it takes no image.")
        return None

    def _sample_sync(self, req: SampleRequest, image_path: Optional[str]) -> dict:
        import torch

        bad = self._check(req, image_path)
        if bad is not None:
            return bad
        image = None
        if image_path is not None:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(image_path) as opened:
                    # Header first: a first frame is resized to the sample size, so anything larger
                    # than the largest sample is refused before its pixels are decoded.
                    if max(opened.size) > 4096:
                        return _error(413, "InputTooLargeError", "The uploaded 'image' is over 4096 px on its long side.")
                    image = opened.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
                return _error(415, "NotAnImageError", "The uploaded 'image' is not an image this server can read.")
        a = self._args
        seeds = req.seed_list()
        steps = a.default_steps if req.steps is None else req.steps
        guidance = a.default_guidance if req.guidance is None else req.guidance
        default_frames, default_height, default_width = default_video_size(self._pipe.transformer.config)
        height = req.height or default_height
        width = req.width or default_width
        frames = req.frames or default_frames
        adapter = req.adapter
        sample_id = uuid.uuid4().hex
        folder = self._out / sample_id
        folder.mkdir(parents=True)
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            if a.adapters:
                select_adapter(self._pipe, adapter)
            do_cfg = guidance > 1.0
            prompt_embeds, negative_embeds = self._pipe.encode_prompt(
                req.prompt, req.negative_prompt, do_classifier_free_guidance=do_cfg,
                num_videos_per_prompt=1, max_sequence_length=self._max_seq, device=self._device,
            )
            torch.save(prompt_embeds[0].float().cpu(), folder / "prompt_embeds.pt")
            timings["encode_prompt"] = time.perf_counter() - t0
            samples = []
            for seed in seeds:
                t1 = time.perf_counter()
                kwargs: dict[str, Any] = dict(
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds if do_cfg else None,
                    height=height, width=width, num_frames=frames, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator(device="cpu").manual_seed(seed),
                    output_type="latent", max_sequence_length=self._max_seq,
                )
                if image is not None:
                    kwargs["image"] = image.resize((width, height))
                latents = self._pipe(**kwargs).frames  # [1, F', C, h, w]
                # CogVideoX 1.5 pads F' to a multiple of patch_size_t *in front* and, with
                # output_type="latent", returns the padding too: keep the video's own F frames.
                latents = latents[:, latents.shape[1] - latent_frames(frames):]
                video = self._pipe.decode_latents(latents)  # [1, 3, T, H, W] in [-1, 1]
                video = self._pipe.video_processor.postprocess_video(video=video, output_type="np")[0]  # [T, H, W, 3] in [0, 1]
                video_u8 = (video.clip(0, 1) * 255).round().astype("uint8")
                mp4 = write_video(folder / f"seed-{seed}.mp4", video_u8, fps=a.fps)
                lat = folder / f"seed-{seed}.latents.pt"
                torch.save(latents[0].float().cpu(), lat)
                samples.append({"seed": seed, "video": str(mp4), "latents": str(lat),
                                "prompt_embeds": str(folder / "prompt_embeds.pt")})
                timings[f"seed_{seed}"] = time.perf_counter() - t1
        meta = {"request": req.model_dump(mode="json", exclude_none=True), "model": Path(self._model_dir).name,
                "pipeline": type(self._pipe).__name__, "height": height, "width": width, "frames": frames,
                "steps": steps, "guidance": guidance}
        (folder / "request.json").write_text(json.dumps(meta, indent=2))
        return {"sample_id": sample_id, "adapter": adapter, "samples": samples, "timings_s": timings}


def build_sampler(args: SamplerArgs, work_dir: Path):
    deployment = serve.deployment(SamplerServer).options(**sampler_deployment_options(args))
    return deployment.bind(args.model_dump(mode="json"), str(work_dir / "samples"))
