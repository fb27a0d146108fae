"""One prepared GPU check: full-size speed and memory of scoring, sampling and training, without weights.

Speed and memory do not depend on the weights' values, so randomly initialised models with the real
configurations cost what the real ones cost: CogVideoX-5B's transformer and VAE built from their
config.json (../shared/data/configs/cogvideox-5b, or --configs DIR), Depth Anything 3 built from the
configs its package ships. Five parts, run through the project's own code paths, each figure printed
beside its target:

  raster    `rasterize_points` on the device, 10 frames x 480x720 points into 10 frames: time
            (target <= 10 ms) and the result identical to a one-thread CPU run.
  scorer    the scorer replica (Serve app, one replica, DA3-Large random init, `max_batch_size` 8)
            scoring 49-frame 480x720 videos at T = 10, 504 px through a deployment handle: videos/s
            with requests batched across videos (target >= 10 on an H100/H200-class GPU), the same
            replica one video at a time, peak GPU memory, share of time outside the model.
  service   POST /score through the same app, 16 concurrent clients: requests/s, p50/p95 latency.
  sampling  CogVideoX-5B transformer + VAE, bf16, 49x480x720, guidance 6 (batch 2 per step):
            seconds per denoising step, VAE decode, peak memory; videos per GPU-hour at 50 steps.
  training  one Diffusion-DPO step of the 5B config: LoRA r 64 / alpha 128, gradient checkpointing,
            bf16, DeepSpeed ZeRO-2, one worker (this process, world size 1), 1 pair at 13x60x90
            latents: seconds per step, peak memory (target: fits 80 GB with room, <= 70 GB), and the
            reference's memory (LoRA switched off) against a frozen copy (target <= 1.1x one model).

    python benchmarks/gpu_check.py [--tiny] [--parts raster,scorer,service,sampling,training]
                                   [--out DIR] [--budget-s 420] [--configs DIR]

Results go to DIR/gpu_check.json (DIR: --out, else $OUT, else the current folder), rewritten after
every part, so a run cut short keeps what it measured. `--tiny` runs every part at tiny sizes on the
CPU (tiny models and videos; the suite runs it, so the script is known to work before a GPU does;
its timings mean nothing and no target is judged). A part whose package or device is missing is
skipped with the reason; a part that fails records its error and the others go on; a part that
would start after the time budget is skipped and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from any folder: the repository's packages first
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PART_NAMES = ("raster", "scorer", "service", "sampling", "training")
SHARED_DATA = Path(os.environ.get("VGPA_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_CONFIGS = SHARED_DATA / "configs" / "cogvideox-5b"
GB = 1e9


class Skip(Exception):
    """A part cannot run here (missing package, device or input); the message says why."""


@dataclass
class Check:
    """What every part needs: sizes (tiny or full), the device, the clock, and shared resources."""

    tiny: bool
    device: torch.device
    budget_s: float
    configs: Path
    work: Path
    started: float = field(default_factory=time.monotonic)
    serve: Optional["ServeSession"] = None

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def figure(self, value, unit: str, target: Optional[tuple[str, float]] = None, note: str = "") -> dict:
        """One figure; `target` ("<=" or ">=", bound) is judged on the full-size GPU run only."""
        met = None
        if target is not None and value is not None and not self.tiny:
            op, bound = target
            met = value <= bound if op == "<=" else value >= bound
        return {"value": value, "unit": unit, "target": f"{target[0]} {target[1]:g} {unit}" if target else None,
                "met": met, "note": note}


def require(*modules: str) -> None:
    """Skip the part when one of `modules` cannot be imported."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or a package that fails while importing
            raise Skip(f"package {name} is not importable ({type(err).__name__}: {err})") from None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# 1. Raster
# ------------------------------------------------------------------------------------------------


def part_raster(check: Check) -> dict:
    """`rasterize_points` on the device against a one-thread CPU run of the same cloud."""
    from common.camera import unproject_depth
    from common.raster import rasterize_points
    from common.synthetic import render_video

    T, H, W = (3, 48, 72) if check.tiny else (10, 480, 720)
    video = render_video("boxes", "orbit", frames=T, size=(H, W))
    K, w2c = video.K.float(), video.world_to_cam.float()
    points = unproject_depth(video.depth, K, w2c).reshape(-1, 3)
    colors = (video.frames.float() / 255).reshape(-1, 3)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = rasterize_points(points, colors, K, w2c, H, W)
    finally:
        torch.set_num_threads(threads)

    inputs = [t.to(check.device) for t in (points, colors, K, w2c)]
    out = rasterize_points(*inputs, H, W)  # warm-up (CUDA context, kernels)
    times = []
    for _ in range(5 if check.tiny else 20):
        sync(check.device)
        t0 = time.perf_counter()
        out = rasterize_points(*inputs, H, W)
        sync(check.device)
        times.append(time.perf_counter() - t0)
    identical = all(torch.equal(a.cpu(), b) for a, b in zip(out, reference))
    return {
        "settings": {"frames": T, "size": [H, W], "points": points.shape[0], "device": str(check.device),
                     "reference": "CPU, 1 thread", "device_threads": torch.get_num_threads()},
        "figures": {
            "time_ms": check.figure(1000 * statistics.median(times), "ms", ("<=", 10),
                                    f"median of {len(times)}; fastest {1000 * min(times):.2f} ms"),
            "covered_fraction": check.figure(float(reference[2].float().mean()), "fraction"),
        },
        "checks": {"identical_to_cpu": identical},
    }


# ------------------------------------------------------------------------------------------------
# 2. Scorer and 5. Service: one local Ray, one Serve app with one scorer replica
# ------------------------------------------------------------------------------------------------

APP = "vgpa-gpu-check"


class ServeSession:
    """A loopback Ray + the project's Serve app (`services.app.build_app`) with one scorer replica."""

    def __init__(self, check: Check):
        self.check = check
        tiny = check.tiny
        self.frames, self.height, self.width = (9, 64, 96) if tiny else (49, 480, 720)
        self.T = 4 if tiny else 10
        self.model = "da3-small" if tiny else "da3-large"  # docs: DA3 Large for evaluation
        self.process_res = 56 if tiny else 504
        self.batch = 2 if tiny else 8
        self.cuda = check.device.type == "cuda"
        self.video = self._video()
        self.url = ""

    def _video(self) -> Path:
        """A textured wall sliding behind a box (parallax, so every scoring stage runs), as mp4."""
        from common.video import write_video
        from common.scorer import warmup_clip

        path = self.check.work / f"slide-{self.frames}x{self.height}x{self.width}.mp4"
        write_video(path, warmup_clip(self.frames, self.height, self.width), fps=8)
        return path

    def args(self) -> dict:
        score = {"backend": "da3", "weights": f"random:{self.model}", "frames": self.T,
                 "max_side": max(self.height, self.width), "recon_frames": self.T, "device": "auto"}
        return {
            "work_dir": str(self.check.work / "service"),
            "auth_token_env": None,
            "ingress_max_ongoing_requests": 64,
            "scorer": {
                "score": score,
                "num_replicas": 1,
                "num_gpus": 1 if self.cuda else 0,
                "num_cpus": max(1, (os.cpu_count() or 2) // 2) if self.cuda else 1,
                "max_batch_size": self.batch,
                "max_ongoing_requests": 2 * self.batch,
                "max_queued_requests": 256,
                "backend_options": {"da3": {"process_res": self.process_res}},
            },
        }

    def start(self) -> None:
        import httpx
        from ray import serve

        from services.app import build_app
        from services.local_ray import start_local_ray

        start_local_ray(max(4, os.cpu_count() or 1), object_store_memory=512 * 1024**2, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        self.url = f"http://127.0.0.1:{port}"
        serve.run(build_app(self.args()), name=APP, route_prefix="/", blocking=False)
        end = time.monotonic() + max(60.0, self.check.remaining())
        while time.monotonic() < end:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError("the Serve app was not ready within the time budget")

    def scorer(self):
        from ray import serve

        return serve.get_deployment_handle("Scorer", app_name=APP)

    def close(self) -> None:
        import ray
        from ray import serve

        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def serve_session(check: Check) -> "ServeSession":
    require("ray.serve", "httpx", "depth_anything_3.api")
    if not check.tiny and check.device.type != "cuda":
        raise Skip("CUDA is not available")
    if check.serve is None:
        session = ServeSession(check)
        session.start()
        check.serve = session
    return check.serve


def part_scorer(check: Check) -> dict:
    """Videos per second through one scorer replica: batched across videos, then one at a time."""
    session = serve_session(check)
    handle = session.scorer()
    path = str(session.video)
    n_batched, n_single = (4, 2) if check.tiny else (4 * session.batch, 6)

    handle.score.remote(path).result()  # the first request of this size (allocations, kernels)
    single = []
    t0 = time.perf_counter()
    for _ in range(n_single):  # one request in flight: what a replica without batching does
        single.append(handle.score.remote(path).result())
    single_wall = time.perf_counter() - t0

    handle.load_stats.remote(reset=True).result()
    t0 = time.perf_counter()
    responses = [handle.score.remote(path) for _ in range(n_batched)]
    batched = [r.result() for r in responses]
    wall = time.perf_counter() - t0
    stats = handle.load_stats.remote().result()

    results = [a.result.to_json_dict() for a in batched if a.result is not None]  # ScoreAnswer: result or error
    errors = [a.error.model_dump() for a in batched + single if a.error is not None]
    stage = lambda name: sum(r["timings_s"].get(name, 0.0) for r in results)  # noqa: E731
    total = stage("total")
    per_video = {name: stage(name) / max(1, len(results))
                 for name in ("decode", "parallax", "geometry", "geometry.da3", "reproject", "metrics", "total")}
    peak_mb = stats["cuda_peak_allocated_mb"]
    return {
        "settings": {"video": f"{session.frames}x{session.height}x{session.width}", "T": session.T,
                     "model": f"{session.model} (random init)", "process_res": session.process_res,
                     "max_batch_size": session.batch, "requests_batched": n_batched, "requests_one_at_a_time": n_single,
                     "replica_device": stats["cuda_device"] or "cpu"},
        "figures": {
            "videos_per_s": check.figure(n_batched / wall, "videos/s", (">=", 10),
                                         f"{n_batched} requests in flight at once, batches of up to {session.batch}"),
            "videos_per_s_one_at_a_time": check.figure(n_single / single_wall, "videos/s",
                                                       note="the same replica, one request in flight"),
            "batching_speedup": check.figure((n_batched / wall) / (n_single / single_wall), "x"),
            "peak_gpu_memory_gb": check.figure(peak_mb * 2**20 / GB if peak_mb is not None else None, "GB",
                                               note="torch peak allocated in the replica" if peak_mb is not None
                                               else "CPU replica: no CUDA memory"),
            "share_outside_model": check.figure(1 - stage("geometry.da3") / total if total else None, "fraction",
                                                note="1 - DA3 time / score_video time, summed over the batched videos; "
                                                     "DA3 time includes its own resizing"),
        },
        "checks": {"peak_concurrent_videos": stats["peak_concurrent_videos"], "batched": stats["batched"],
                   "statuses": sorted({r["status"] for r in results}),
                   "reasons": sorted({r["reason"] for r in results if r.get("reason")})[:3], "errors": errors[:3],
                   "all_answered": len(results) == n_batched},
        "stage_seconds_per_video": {k: round(v, 4) for k, v in per_video.items()},
    }


def part_service(check: Check) -> dict:
    """POST /score through the app, N concurrent clients each sending requests back to back."""
    import httpx

    session = serve_session(check)
    clients, each = (4, 1) if check.tiny else (16, 3)
    video = session.video

    def client(_: int) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(timeout=600) as http:
            for _ in range(each):
                t0 = time.perf_counter()
                with open(video, "rb") as f:
                    r = http.post(f"{session.url}/score", files={"video": (video.name, f)})
                out.append((time.perf_counter() - t0, r.status_code))
        return out

    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for batch in pool.map(client, range(clients)) for a in batch]
    wall = time.perf_counter() - t0
    latencies = sorted(t for t, _ in answers)
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    codes: dict[str, int] = {}
    for _, code in answers:
        codes[str(code)] = codes.get(str(code), 0) + 1
    return {
        "settings": {"clients": clients, "requests_per_client": each, "video": video.name,
                     "scorer_max_batch_size": session.batch},
        "figures": {
            "requests_per_s": check.figure(len(answers) / wall, "requests/s"),
            "latency_p50_s": check.figure(statistics.median(latencies), "s"),
            "latency_p95_s": check.figure(p(0.95), "s"),
        },
        "checks": {"status_codes": codes, "all_ok": codes.get("200", 0) == len(answers)},
    }


# ------------------------------------------------------------------------------------------------
# 3. Sampling and 4. Training: CogVideoX-5B from its configs, random init
# ------------------------------------------------------------------------------------------------


def read_configs(check: Check) -> dict[str, dict]:
    folder = check.configs
    names = ("transformer", "vae", "scheduler")
    missing = [n for n in names if not (folder / f"{n}.json").is_file()]
    if missing:
        raise Skip(f"CogVideoX-5B configs not found in {folder} ({', '.join(missing)}.json): pass --configs DIR "
                   "or set VGPA_SHARED_DATA")
    return {n: json.loads((folder / f"{n}.json").read_text()) for n in names}


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype):
    """Modules constructed inside are initialised directly on `device` in `dtype` (no CPU copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def cogvideox(check: Check, parts: tuple[str, ...]) -> dict:
    """Random-init components: the real 5B configs (bf16, on the GPU), or the tiny ones (fp32, CPU).

    Returns the components asked for plus `dtype`, `video` (frames, height, width), `latent`
    (F, C, h, w) and `text` (L, D).
    """
    import diffusers

    from training.fixtures import tiny_cogvideox as tiny
    from common.cogvideox import VAE_SPATIAL, default_video_size, latent_frames

    if check.tiny:
        out = {"dtype": torch.float32, "video": (tiny.NUM_FRAMES, tiny.HEIGHT, tiny.WIDTH),
               "latent": (tiny.LATENT_FRAMES, tiny.LATENT_CHANNELS, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH),
               "text": (tiny.TEXT_SEQ_LEN, tiny.TEXT_EMBED_DIM)}
        builders = {"transformer": tiny.tiny_transformer, "vae": tiny.tiny_vae, "scheduler": tiny.tiny_scheduler}
        out.update({name: builders[name]() for name in parts})
        return out
    if check.device.type != "cuda":
        raise Skip("CUDA is not available")
    configs = read_configs(check)
    tcfg = configs["transformer"]
    frames, height, width = default_video_size(tcfg)
    out = {"dtype": torch.bfloat16, "video": (frames, height, width),
           "latent": (latent_frames(frames), tcfg["in_channels"], height // VAE_SPATIAL, width // VAE_SPATIAL),
           "text": (tcfg["max_text_seq_length"], tcfg["text_embed_dim"])}
    for name in parts:
        cls = getattr(diffusers, configs[name]["_class_name"])
        if name == "scheduler":
            out[name] = cls.from_config(configs[name])
            continue
        torch.manual_seed(0)
        with building_on(check.device, torch.bfloat16):
            out[name] = cls.from_config(configs[name]).to(check.device, torch.bfloat16).eval()
    return out


def part_sampling(check: Check) -> dict:
    """Denoising steps and the VAE decode of one video, as `CogVideoXPipeline` runs them (guidance 6)."""
    require("diffusers")
    from diffusers import CogVideoXPipeline

    c = cogvideox(check, ("transformer", "vae", "scheduler"))
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=c["vae"], transformer=c["transformer"],
                             scheduler=c["scheduler"])
    frames, height, width = c["video"]
    g = torch.Generator().manual_seed(0)
    text = torch.randn((1, *c["text"]), generator=g).to(check.device, c["dtype"])
    negative = torch.randn((1, *c["text"]), generator=g).to(check.device, c["dtype"])
    steps = 2 if check.tiny else 3
    marks: list[float] = []

    def on_step(_pipe, _i, _t, _kwargs):
        sync(check.device)
        marks.append(time.perf_counter())
        return {}

    reset_peak(check.device)
    start = time.perf_counter()
    latents = pipe(prompt_embeds=text, negative_prompt_embeds=negative, num_inference_steps=steps,
                   num_frames=frames, height=height, width=width, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(0), output_type="latent",
                   callback_on_step_end=on_step).frames
    denoise_peak = peak_gb(check.device)
    step_times = [b - a for a, b in zip(marks, marks[1:])] or [marks[0] - start]

    reset_peak(check.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        video = pipe.decode_latents(latents)
    sync(check.device)
    decode_s = time.perf_counter() - t0
    decode_peak = peak_gb(check.device)
    step_s = statistics.median(step_times)
    per_video_s = 50 * step_s + decode_s
    params = sum(p.numel() for p in c["transformer"].parameters())
    del pipe, c, latents
    return {
        "settings": {"video": f"{frames}x{height}x{width}", "latents": list(video.shape), "dtype": str(text.dtype),
                     "transformer_parameters": params, "guidance_scale": 6.0, "steps_timed": steps,
                     "vae_tiling": False, "note": "first step (warm-up) excluded; text encoding not included"},
        "figures": {
            "seconds_per_step": check.figure(step_s, "s", note="batch 2 (classifier-free guidance)"),
            "vae_decode_s": check.figure(decode_s, "s"),
            "peak_memory_denoising_gb": check.figure(denoise_peak, "GB"),
            "peak_memory_decode_gb": check.figure(decode_peak, "GB"),
            "videos_per_gpu_hour_50_steps": check.figure(3600 / per_video_s, "videos/h",
                                                         note="3600 / (50 x step + decode)"),
        },
    }


@contextlib.contextmanager
def single_worker_group(device: torch.device):
    """A one-rank process group (what Ray Train sets up for each worker), torn down afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def part_training(check: Check) -> dict:
    """One DPO step as `training.trainer.train_loop_per_worker` runs it, on one worker (this process)."""
    require("deepspeed", "peft", "diffusers")
    import deepspeed
    from bench_trainer import param_bytes  # beside this file: distinct storages of parameters and buffers

    from training.dpo import dpo_step
    from training.lora import add_lora, count_parameters, lora_parameters
    from training.trainer import TrainConfig, deepspeed_config

    cuda = check.device.type == "cuda"
    c = cogvideox(check, ("transformer", "scheduler"))
    rank = 4 if check.tiny else 64  # alpha / r = 2 at both sizes; r 64 on the tiny model would outweigh it
    cfg = TrainConfig(lora_rank=rank, lora_alpha=2 * rank, gradient_checkpointing=True, zero_stage=2,
                      precision="bf16" if cuda else "fp32", batch_size=1, micro_batch_size=1, num_workers=1,
                      gpus_per_worker=1 if cuda else 0)
    ds_config = deepspeed_config(cfg, use_cuda=cuda)
    transformer = c["transformer"].to(check.device)
    base_bytes = param_bytes(transformer)
    # 1. The policy: frozen transformer + LoRA, gradient checkpointing (the worker loop's step 1).
    torch.manual_seed(cfg.seed)
    add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    transformer.to(check.device)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    trainable, total = count_parameters(transformer)
    policy_bytes = param_bytes(transformer)  # the reference (adapters off) holds nothing more

    # 2. DeepSpeed ZeRO-2 (step 2). On the GPU torch's fused AdamW: the trainer's fallback when
    #    FusedAdam cannot be JIT-built (it needs nvcc and minutes); the same update.
    params = lora_parameters(transformer)
    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, **({"fused": True} if cuda else {}))
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn((1, *c["latent"]), generator=g) for k in ("winner_latents", "loser_latents")}
    batch["prompt_embeds"] = torch.randn((1, *c["text"]), generator=g)
    figures, settings = {}, {}
    with single_worker_group(check.device):
        engine, _, _, _ = deepspeed.initialize(model=transformer, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
        model = engine.module
        compute_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

        def step(n: int, reference=None) -> float:
            sync(check.device)
            t0 = time.perf_counter()
            out = dpo_step(model, c["scheduler"], batch, cfg.beta, generator=torch.Generator().manual_seed(n),
                           compute_dtype=compute_dtype, forward=engine, reference=reference)
            engine.backward(out.loss)
            engine.step()
            sync(check.device)
            return time.perf_counter() - t0

        step(0)  # warm-up: allocations, kernels, DeepSpeed's buffers
        reset_peak(check.device)
        times = [step(n) for n in range(1, 2 if check.tiny else 3)]
        ours_peak = peak_gb(check.device)
        # 3. The paper's reference for contrast: a second frozen transformer (random: only its size matters).
        copy_peak, copy_note = None, "skipped: less than 90 s of the time budget left"
        if check.remaining() > 90 or check.tiny:
            reference = cogvideox(check, ("transformer",))["transformer"].requires_grad_(False).eval()
            copy_bytes = param_bytes(reference)
            reset_peak(check.device)
            step(99, reference=reference)
            copy_peak, copy_note = peak_gb(check.device), "one step with a frozen copy as the reference"
            del reference
        else:
            copy_bytes = base_bytes
        settings.update({"precision": "bf16" if engine.bfloat16_enabled() else "fp32",
                         "zero_stage": ds_config["zero_optimization"]["stage"],
                         "optimizer": type(optimizer).__name__ + (" (fused)" if cuda else "")})
        del engine, model
    figures.update({
        "seconds_per_step": check.figure(statistics.median(times), "s", note=f"median of {len(times)} after a warm-up step"),
        "peak_memory_gb": check.figure(ours_peak, "GB", ("<=", 70), "fits 80 GB with room"),
        "reference_memory_ratio": check.figure(policy_bytes / base_bytes, "x one model", ("<=", 1.1),
                                               "parameters held for policy + reference (LoRA off) / base transformer"),
        "frozen_copy_memory_ratio": check.figure((policy_bytes + copy_bytes) / base_bytes, "x one model",
                                                 note="the paper's frozen copy as the reference"),
        "peak_memory_frozen_copy_gb": check.figure(copy_peak, "GB", note=copy_note),
    })
    settings.update({"latents": list(c["latent"]), "pair_batch": 1, "lora_rank": cfg.lora_rank,
                     "lora_alpha": cfg.lora_alpha, "gradient_checkpointing": True, "trainable_parameters": trainable,
                     "total_parameters": total, "workers": 1})
    del c, transformer, optimizer
    return {"settings": settings, "figures": figures}


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------

PARTS: dict[str, Callable[[Check], dict]] = {
    "raster": part_raster, "scorer": part_scorer, "service": part_service,
    "sampling": part_sampling, "training": part_training,
}
#: Seconds a part needs at least on the GPU run; one that would start with less left is skipped.
MIN_SECONDS = {"raster": 10, "scorer": 60, "service": 30, "sampling": 60, "training": 60}


def run_part(name: str, check: Check) -> dict:
    if check.remaining() < (1 if check.tiny else MIN_SECONDS[name]):
        return {"status": "skipped", "reason": f"time budget: {check.remaining():.0f} s left of {check.budget_s:.0f} s"}
    t0 = time.perf_counter()
    try:
        if not check.tiny and check.device.type != "cuda":
            raise Skip("CUDA is not available (run with --tiny for the CPU form)")
        entry = {"status": "ok", **PARTS[name](check)}
    except Skip as why:
        entry = {"status": "skipped", "reason": str(why)}
    except Exception as err:  # noqa: BLE001 - recorded; the other parts go on
        entry = {"status": "error", "error": f"{type(err).__name__}: {err}",
                 "traceback": traceback.format_exc(limit=8)[-3000:]}
    finally:
        import gc

        gc.collect()
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def machine(check: Check) -> str:
    if check.device.type == "cuda":
        return f"{torch.cuda.get_device_name(check.device)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def print_part(name: str, entry: dict) -> None:
    print(f"\n[{name}] {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    if entry["status"] != "ok":
        print(f"  {entry.get('reason') or entry.get('error')}", flush=True)
        return
    for key, fig in entry["figures"].items():
        value = fig["value"]
        shown = "n/a" if value is None else f"{value:.4g}"
        verdict = "" if fig["met"] is None else ("met" if fig["met"] else "MISSED")
        target = f"target {fig['target']}" if fig["target"] else ""
        print(f"  {key:<30} {shown:>10} {fig['unit']:<12} {target:<22} {verdict:<6} {fig['note']}".rstrip(), flush=True)
    for key, value in entry.get("checks", {}).items():
        print(f"  check {key}: {value}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Results: DIR/gpu_check.json. See benchmarks/README.md.")
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes on the CPU (the suite's form).")
    parser.add_argument("--parts", default=",".join(PART_NAMES), help=f"Comma-separated subset of {','.join(PART_NAMES)}.")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "."), help="Folder for gpu_check.json.")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="Time budget for all parts (s); parts that would start later are skipped.")
    parser.add_argument("--configs", type=Path, default=DEFAULT_CONFIGS, help="CogVideoX-5B config folder.")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PART_NAMES))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {','.join(PART_NAMES)}")

    from services.local_ray import set_local_ray_env

    set_local_ray_env()  # before Ray is imported by a part: loopback only, no token file
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "gpu_check.json"
    with tempfile.TemporaryDirectory(prefix="vgpa-gpu-check-") as work:
        check = Check(tiny=args.tiny, device=device, budget_s=args.budget_s, configs=args.configs, work=Path(work))
        report = {"schema": 1, "tiny": args.tiny, "machine": machine(check), "device": str(device),
                  "torch": torch.__version__, "budget_s": args.budget_s, "elapsed_s": 0.0, "parts": {}}
        print(f"gpu_check on {report['machine']}, torch {torch.__version__}, {'tiny CPU form' if args.tiny else 'full size'}; "
              f"parts {','.join(names)}; budget {args.budget_s:.0f} s; results -> {report_path}", flush=True)
        try:
            selected = [n for n in PART_NAMES if n in names]
            for i, name in enumerate(selected):
                entry = run_part(name, check)
                report["parts"][name] = entry
                report["elapsed_s"] = round(time.monotonic() - check.started, 1)
                report_path.write_text(json.dumps(report, indent=2, default=str))
                print_part(name, entry)
                if check.serve is not None and not {"scorer", "service"} & set(selected[i + 1:]):
                    check.serve.close()  # scorer and service share the app; the GPU is free for the rest
                    check.serve = None
        finally:
            if check.serve is not None:
                check.serve.close()
    print(f"\ndone in {report['elapsed_s']:.0f} s; {report_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
