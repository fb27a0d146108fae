"""LoRA Diffusion-DPO trainer for CogVideoX on Ray Train (`TorchTrainer`) + DeepSpeed ZeRO.

Read top to bottom:

    train(cfg, pairs_dir, model_dir, output_dir)          # on the driver
      1. validate the pairs dataset, the model folder and the batch arithmetic (no worker yet)
      2. start (or join) Ray; a small actor relays per-step metrics to the progress bar
      3. TorchTrainer(train_loop_per_worker, ScalingConfig, RunConfig(name, storage_path,
         FailureConfig, CheckpointConfig)).fit()
      4. copy the last checkpoint's LoRA to output_dir/pytorch_lora_weights.safetensors,
         write train_summary.json and metrics.jsonl

    train_loop_per_worker(loop_config)                    # on every Ray Train worker
      1. load the transformer, freeze it, add LoRA (rank 64 / alpha 128 on to_q,k,v,out.0)
      2. deepspeed.initialize (ZeRO-2 default, bf16 on GPU / fp32 on CPU, clipping, accumulation)
      3. resume from ray.train.get_checkpoint() when there is one
      4. for each optimizer step: micro-batches chosen by (seed, step, rank) -> dpo_step ->
         engine.backward -> engine.step; metrics averaged over ranks
      5. every `checkpoint_every` steps and at the end: ray.train.report(metrics, checkpoint)
         holding the LoRA + optimizer + LR-scheduler state only (never the frozen base)

Determinism: which pairs, timesteps and noise a worker uses at step s depend only on
(seed, s, rank), so a run resumed from step k ends with the same LoRA as one that never stopped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import ConfigError, VideoGPAError
from training.dpo import LossType, dpo_step
from training.lora import DEFAULT_TARGETS, LORA_WEIGHTS_NAME, add_lora, export_lora, lora_parameters, lora_state_dict
from training.pairs import PairsDataset, PairsIndex, collate_pairs, load_pairs_index
from training.ray_session import ensure_ray

CHECKPOINT_STATE = "train_state.json"
DEEPSPEED_TAG = "deepspeed"
FAULT_MARKER = ".fault_drill_done"


class TrainingRunError(VideoGPAError):
    """The Ray Train run failed for good (workers kept dying, or the loop raised)."""

    http_status = 500


class TrainConfig(BaseModel):
    """Every setting of a DPO run; saved in every checkpoint and in train_summary.json.

    Defaults are the paper's (rank 64, alpha 128, peak LR 5e-6, 500 warm-up steps, batch 16).
    """

    model_config = ConfigDict(extra="forbid")

    # --- objective ---
    beta: float = Field(
        1.0,
        gt=0,
        description=(
            "DPO temperature on MEAN-reduced v-prediction errors (see training.dpo). 1 = the paper's code; "
            "the diffusers Diffusion-DPO example's 2500 (with its -0.5 factor) is 1250 here."
        ),
    )
    loss_type: LossType = Field("sigmoid", description="sigmoid (Diffusion-DPO), hinge or ipo.")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an extra SFT term: the policy's mean error on winners.")

    # --- LoRA ---
    lora_rank: int = Field(64, ge=1, description="LoRA rank r.")
    lora_alpha: float = Field(128, gt=0, description="LoRA alpha (scale alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    lora_targets: list[str] = Field(list(DEFAULT_TARGETS), description="Module names that receive LoRA.")

    # --- optimisation ---
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine decays to this fraction of the peak.")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps (optimizer steps).")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps in total.")
    batch_size: int = Field(16, ge=1, description="Pairs per optimizer step, over all workers and accumulation.")
    micro_batch_size: int = Field(1, ge=1, description="Pairs per worker per forward (winner + loser = 2x this).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay on the LoRA weights.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global L2 norm).")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (2 recommended with LoRA).")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = Field(True, description="Recompute transformer blocks in backward to save memory.")
    seed: int = Field(0, description="Seeds LoRA init, pair order, timesteps and noise.")

    # --- checkpoints and fault tolerance ---
    checkpoint_every: int = Field(100, ge=1, description="Report a checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")
    max_failures: int = Field(3, ge=0, description="Ray Train FailureConfig: restarts after a worker dies.")
    run_name: str = Field("vgpa-dpo", description="Ray Train run name; the same name + storage path resumes.")
    storage_path: Optional[str] = Field(
        None, description="Where Ray Train keeps checkpoints (shared FS or s3://...). Default: <output>/ray."
    )
    fail_at_step: Optional[int] = Field(
        None,
        ge=1,
        description="Fault drill: rank 0's process exits abruptly at this step, once per run folder.",
    )

    # --- validation (rank 0 samples fixed-seed prompts, saves the videos, scores their geometry) ---
    validation_every: int = Field(0, ge=0, description="Sample the validation prompts every K steps (0: never).")
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts sampled at each validation.")
    validation_images: list[str] = Field(
        default_factory=list, description="Image-to-video: one condition image path per validation prompt."
    )
    validation_seed: int = Field(0, description="Prompt i is always sampled with seed validation_seed + i.")
    validation_inference_steps: int = Field(50, ge=1, description="Denoising steps per validation video.")
    validation_score: bool = Field(True, description="Score each validation video with common.scoring.score_video.")
    validation_score_config: dict = Field(
        default_factory=dict, description="common.config.ScoreConfig fields for validation scoring."
    )

    # --- resources ---
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on a GPU cluster).")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker; 0 trains on the CPU with gloo.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> "TrainConfig":
        per_step = self.micro_batch_size * self.num_workers
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size x num_workers = {per_step}"
            )
        return self

    @model_validator(mode="after")
    def _validation_settings(self) -> "TrainConfig":
        if self.validation_every and not self.validation_prompts:
            raise ValueError("validation_every needs validation_prompts")
        if self.validation_every and self.zero_stage == 3:
            # Rank 0 samples alone; under ZeRO-3 every forward gathers parameters from all ranks.
            raise ValueError("validation sampling runs on rank 0 only and needs zero_stage 2")
        if self.validation_images and len(self.validation_images) != len(self.validation_prompts):
            raise ValueError("validation_images needs one image per validation prompt")
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)


# ------------------------------------------------------------------------------------------------
# Pure pieces of the loop: learning rate, which pairs a worker sees, DeepSpeed config.
# ------------------------------------------------------------------------------------------------


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up from 1/warmup to 1, then cosine down to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batch_indices(
    num_pairs: int, step: int, micro: int, rank: int, cfg: TrainConfig
) -> list[int]:
    """Pair indices for worker `rank`'s micro-batch `micro` of optimizer step `step`.

    The pairs form an endless stream of permutations (one per epoch, seeded by seed + epoch); step s
    takes the next `batch_size` of it, split as [micro 0: rank 0, rank 1, ...][micro 1: ...].
    """
    start = step * cfg.batch_size + (micro * cfg.num_workers + rank) * cfg.micro_batch_size
    out = []
    for position in range(start, start + cfg.micro_batch_size):
        epoch, offset = divmod(position, num_pairs)
        out.append(_epoch_order(num_pairs, cfg.seed, epoch)[offset])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def step_generator(cfg: TrainConfig, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator for one micro-batch's timesteps and noise: a function of (seed, step, micro, rank) only."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank)


def deepspeed_config(cfg: TrainConfig, use_cuda: bool) -> dict:
    """The DeepSpeed config. No optimizer block: the optimizer is passed in (see train_loop_per_worker)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": use_cuda, "contiguous_gradients": True},
        "bf16": {"enabled": bf16},
        # torch's AdamW on CPU: DeepSpeed would otherwise refuse it under ZeRO (and compile FusedAdam).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _average_over_ranks(metrics: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


def _lora_rank_spread(tensors: list[torch.Tensor], device) -> float:
    """max |w_rank - w_other| over all LoRA weights and ranks (0.0 when every rank holds the same LoRA).

    `tensors` must be whole weights (under ZeRO-3, gathered ones: see `_lora_weights`).
    """
    import torch.distributed as dist

    flat = torch.cat([t.detach().float().flatten() for t in tensors]).to(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).abs().max())


# ------------------------------------------------------------------------------------------------
# The worker loop.
# ------------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from ray.train import Checkpoint

    cfg = TrainConfig.model_validate(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    use_cuda = cfg.gpus_per_worker > 0 and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
    index = PairsIndex(**loop_config["index"])
    dataset = PairsDataset(index)
    progress = loop_config.get("progress")

    ds_config = deepspeed_config(cfg, use_cuda)

    # 1. The policy: frozen transformer + fresh LoRA (seeded, identical on every rank). Loaded in
    #    bf16 directly when training in bf16 (a 5B model in fp32 would need 22 GB per worker first).
    transformer = CogVideoXTransformer3DModel.from_pretrained(
        loop_config["model_dir"], subfolder="transformer",
        torch_dtype=torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32,
    )
    torch.manual_seed(cfg.seed)
    add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    scheduler = CogVideoXDPMScheduler.from_pretrained(loop_config["model_dir"], subfolder="scheduler")

    # 2. DeepSpeed. On CPU nothing may be compiled: no shared-memory comm extension, torch AdamW.
    params = lora_parameters(transformer)
    if use_cuda:
        try:
            from deepspeed.ops.adam import FusedAdam

            optimizer = FusedAdam(params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, adam_w_mode=True)
        except Exception:  # FusedAdam is JIT-built and needs nvcc; runtime-only images lack it
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                          weight_decay=cfg.weight_decay, fused=True)
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                      weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=transformer, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
        dist_init_required=False,
    )
    model = engine.module
    compute_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    # 3. Resume: LoRA, optimizer and LR schedule from the last reported checkpoint.
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag=DEEPSPEED_TAG, load_module_strict=False)
            start_step = json.loads((Path(ckpt_dir) / CHECKPOINT_STATE).read_text())["step"]

    def report(step: int, metrics: dict, final: bool) -> None:
        # Every rank writes its own ZeRO optimizer partition; Ray merges them into one checkpoint folder.
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True, save_latest=False)
            state = _lora_weights(model, cfg.zero_stage)
            if rank == 0:
                export_lora(Path(tmp) / "lora", state, i2v=index.i2v)
                (Path(tmp) / CHECKPOINT_STATE).write_text(
                    json.dumps({"step": step, "final": final, "config": cfg.model_dump(mode="json")}, indent=2)
                )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:08d}")

    # 4. The loop: one optimizer step = grad_accum_steps micro-batches on every rank.
    fault_marker = Path(loop_config["run_dir"]) / FAULT_MARKER
    metrics: dict[str, float] = {}
    validation_cache: dict = {}
    for step in range(start_step, cfg.max_steps):
        if cfg.fail_at_step == step + 1 and rank == 0 and not fault_marker.exists():
            fault_marker.parent.mkdir(parents=True, exist_ok=True)
            fault_marker.write_text(f"worker killed at step {step + 1}\n")
            # Reports reach the controller when it polls the workers; wait until the last checkpoint
            # is committed so that the drill always tests "resume from the last checkpoint".
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            os._exit(1)  # a hard crash, as an OOM kill or a lost node would be
        started = time.perf_counter()
        lr = float(engine.get_lr()[0])  # the rate this step's update uses
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum_steps):
            ids = micro_batch_indices(len(dataset), step, micro, rank, cfg)
            batch = collate_pairs([dataset[i] for i in ids])
            out = dpo_step(model, scheduler, batch, cfg.beta, generator=step_generator(cfg, step, micro, rank),
                           loss_type=cfg.loss_type, sft_weight=cfg.sft_weight, compute_dtype=compute_dtype,
                           forward=engine)
            engine.backward(out.loss)  # DeepSpeed divides by the accumulation steps
            engine.step()  # applies clip + AdamW + LR schedule at the accumulation boundary only
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum_steps
        metrics = _average_over_ranks(sums, device)
        grad_norm = engine.get_global_grad_norm()
        metrics.update(
            step=step + 1,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=lr,
            step_time_s=time.perf_counter() - started,
        )
        if cfg.validation_every and (step + 1) % cfg.validation_every == 0 and rank == 0:
            metrics.update(run_validation(model, loop_config["model_dir"], cfg, step + 1,
                                          Path(loop_config["validation_dir"]), index.i2v, validation_cache))
        if rank == 0 and progress is not None:
            progress.push.remote(metrics)
        done = step + 1 == cfg.max_steps
        if (step + 1) % cfg.checkpoint_every == 0 or done:
            if done:
                metrics["lora_rank_spread"] = _lora_rank_spread(list(_lora_weights(model, cfg.zero_stage).values()), device)
            report(step + 1, metrics, final=done)

    if start_step >= cfg.max_steps:  # re-launched after the end: report the final state again
        spread = _lora_rank_spread(list(_lora_weights(model, cfg.zero_stage).values()), device)
        metrics = {"step": start_step, "lora_rank_spread": spread}
        report(start_step, metrics, final=True)


def _lora_weights(model, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole LoRA weights on this rank (CPU copies). ZeRO-3 partitions parameters: gather them first."""
    if zero_stage < 3:
        return lora_state_dict(model)
    import deepspeed

    with deepspeed.zero.GatheredParameters(lora_parameters(model), modifier_rank=None):
        return lora_state_dict(model)


@torch.no_grad()
def run_validation(model, model_dir: str, cfg: TrainConfig, step: int, out_dir: Path, i2v: bool, cache: dict) -> dict:
    """Sample `cfg.validation_prompts` with the current LoRA (fixed seeds), save MP4s, score them.

    Videos: out_dir/step_<step>/<i>.mp4 (+ scores.json). Returns metrics `val/score` (mean E over
    scorable videos; NaN if none), `val/scored`, `val/unscorable`. The pipeline (VAE, T5) is loaded
    once and shares the training transformer, so no weights are copied.
    """
    import numpy as np
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    from common.video import write_video

    if "pipe" not in cache:
        param = next(model.parameters())
        cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
        pipe = cls.from_pretrained(model_dir, transformer=model, torch_dtype=param.dtype).to(param.device)
        pipe.set_progress_bar_config(disable=True)
        cache["pipe"] = pipe
    pipe = cache["pipe"]
    folder = out_dir / f"step_{step:08d}"
    was_training = model.training
    model.eval()
    paths = []
    try:
        for i, prompt in enumerate(cfg.validation_prompts):
            kwargs = dict(
                prompt=prompt,
                num_inference_steps=cfg.validation_inference_steps,
                num_frames=model.config.sample_frames,
                max_sequence_length=model.config.max_text_seq_length,
                generator=torch.Generator().manual_seed(cfg.validation_seed + i),
                output_type="np",
            )
            if i2v:
                from PIL import Image

                kwargs["image"] = Image.open(cfg.validation_images[i]).convert("RGB")
            frames = pipe(**kwargs).frames[0]  # (T, H, W, 3) float in [0, 1]
            paths.append(write_video(folder / f"{i:02d}.mp4", (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)))
    finally:
        model.train(was_training)

    metrics: dict[str, float] = {}
    if cfg.validation_score:
        from common.config import ScoreConfig
        from common.scoring import score_video

        score_cfg = ScoreConfig(**cfg.validation_score_config)
        results = [score_video(p, score_cfg) for p in paths]
        ok = [r.score for r in results if r.status == "ok" and r.score is not None]
        metrics = {
            "val/score": float(np.mean(ok)) if ok else float("nan"),
            "val/scored": float(len(ok)),
            "val/unscorable": float(len(results) - len(ok)),
        }
        (folder / "scores.json").write_text(json.dumps(
            [{"prompt": pr, "video": str(p), **r.to_json_dict()} for pr, p, r in zip(cfg.validation_prompts, paths, results)],
            indent=2))
    return metrics


# ------------------------------------------------------------------------------------------------
# The driver.
# ------------------------------------------------------------------------------------------------


def _progress_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressRelay:
        """Collects rank 0's per-step metrics for the driver's progress bar and metrics.jsonl."""

        def __init__(self) -> None:
            self._rows: list[dict] = []

        def push(self, metrics: dict) -> None:
            self._rows.append(metrics)

        def since(self, n: int) -> list[dict]:
            return self._rows[n:]

    return ProgressRelay


def check_model_folder(model_dir: Path, index: PairsIndex) -> dict:
    """The transformer config of a diffusers pipeline folder, checked against the pairs' shapes."""
    config_path = model_dir / "transformer" / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{model_dir} is not a diffusers CogVideoX pipeline folder: transformer/config.json is missing")
    if not (model_dir / "scheduler").is_dir():
        raise ConfigError(f"{model_dir} has no scheduler/ folder")
    tcfg = json.loads(config_path.read_text())
    scheduler_config = model_dir / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        prediction = json.loads(scheduler_config.read_text()).get("prediction_type", "epsilon")
        if prediction != "v_prediction":
            raise ConfigError(f"the scheduler in {model_dir} predicts {prediction!r}; this trainer needs v_prediction")
    frames, channels, height, width = index.latent_shape
    in_channels = tcfg["in_channels"]
    expected = in_channels // 2 if index.i2v else in_channels  # I2V: noisy latent ++ image latent on C
    if channels != expected:
        kind = "image-to-video" if index.i2v else "text-to-video"
        hint = ""
        if index.i2v and in_channels == channels:
            hint = " (it is a text-to-video model)"
        elif not index.i2v and in_channels == 2 * channels:
            hint = " (it is an image-to-video model: the pairs need image latents)"
        raise ConfigError(
            f"the pairs hold {kind} latents with {channels} channels, but the transformer in {model_dir} "
            f"has in_channels={in_channels} and expects {expected}-channel latents{hint}"
        )
    if index.text_shape[1] != tcfg["text_embed_dim"]:
        raise ConfigError(
            f"the pairs' text embeddings are {index.text_shape[1]}-dimensional, the transformer expects {tcfg['text_embed_dim']}"
        )
    p = tcfg["patch_size"]
    if height % p or width % p:
        raise ConfigError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
    return tcfg


def check_resume_compatible(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume a run whose ZeRO partitioning the new settings would not match.

    Each rank's checkpoint holds its own optimizer partition, so the worker count and ZeRO stage
    must stay the same; steps, learning rate or beta may change. Only local (or mounted) storage
    is inspected; for s3:// and the like DeepSpeed's own load reports the mismatch.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    state_path = run_dir / str(latest) / CHECKPOINT_STATE
    if not latest or not state_path.is_file():
        return
    saved = json.loads(state_path.read_text())["config"]
    for key in ("num_workers", "zero_stage", "lora_rank", "lora_targets"):
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"run '{cfg.run_name}' in {run_dir.parent} was checkpointed with {key}={saved.get(key)}, "
                f"now {key}={getattr(cfg, key)}: resume with the same value or choose a new run name"
            )


def train(
    cfg: TrainConfig,
    pairs_dir: str | Path,
    model_dir: str | Path,
    output_dir: str | Path,
    address: Optional[str] = None,
    on_step: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Run (or resume) a DPO run and export its LoRA. Returns the summary written to train_summary.json.

    Args:
        cfg: the run's settings.
        pairs_dir: a pairs dataset (training.pairs); validated here before any worker starts.
        model_dir: a diffusers CogVideoX pipeline folder (transformer/ and scheduler/ are read).
        output_dir: receives pytorch_lora_weights.safetensors, train_summary.json, metrics.jsonl and
            validation/step_*/ (videos and scores) when validation is on.
        address: a Ray cluster address; None joins the running Ray or starts an embedded one.
        on_step: called on the driver with each step's metrics (progress bars).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # 1. Validate everything that can be checked without a worker.
    pairs_dir, model_dir, output_dir = Path(pairs_dir).resolve(), Path(model_dir).resolve(), Path(output_dir).resolve()
    index = load_pairs_index(pairs_dir)
    check_model_folder(model_dir, index)
    if len(index) < cfg.micro_batch_size:
        raise ConfigError(f"the pairs dataset has {len(index)} pairs, fewer than micro_batch_size {cfg.micro_batch_size}")
    output_dir.mkdir(parents=True, exist_ok=True)
    storage_path = cfg.storage_path or str(output_dir / "ray")
    check_resume_compatible(cfg, Path(storage_path) / cfg.run_name)

    # 2. Ray and the progress relay.
    # A cluster when one is named (`ray job submit` sets RAY_ADDRESS), else an embedded Ray on loopback.
    ensure_ray(address, min_cpus=math.ceil(cfg.num_workers * cfg.cpus_per_worker) + 1)
    relay = _progress_actor_class().remote()

    # 3. The run. The same run_name + storage_path picks up the last checkpoint.
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "index": {"directory": index.directory, "summary": index.summary, "rows": index.rows},
            "model_dir": str(model_dir),
            "run_dir": os.path.join(storage_path, cfg.run_name),
            "validation_dir": str(output_dir / "validation"),
            "progress": relay,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.gpus_per_worker > 0 else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    rows: list[dict] = []
    stop = threading.Event()

    def poll() -> None:
        while True:
            new = ray.get(relay.since.remote(len(rows)))
            for row in new:
                rows.append(row)
                if on_step:
                    on_step(row)
            if stop.is_set() and not new:
                return
            time.sleep(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.perf_counter()
    def write_rows() -> None:
        with open(output_dir / "metrics.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        stop.set()
        poller.join(timeout=30)
        write_rows()
        cause = str(err).strip().splitlines()
        raise TrainingRunError(
            f"training run '{cfg.run_name}' failed after {cfg.max_failures} restart(s): "
            f"{cause[-1] if cause else type(err).__name__}. Its checkpoints are in {storage_path}; "
            "run the same command again to continue from the last one."
        ) from err
    finally:
        stop.set()
        poller.join(timeout=30)
        ray.kill(relay)

    # 4. Export and summary.
    if result.checkpoint is None:
        raise ConfigError(f"run {cfg.run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        shutil.copy2(Path(ckpt_dir) / "lora" / LORA_WEIGHTS_NAME, output_dir / LORA_WEIGHTS_NAME)
        state = json.loads((Path(ckpt_dir) / CHECKPOINT_STATE).read_text())
    write_rows()
    final = result.metrics or {}
    summary = {
        "run_name": cfg.run_name,
        "steps": state["step"],
        "steps_this_launch": len(rows),
        "first_step_this_launch": rows[0]["step"] if rows else None,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "final_metrics": final,
        "lora": str(output_dir / LORA_WEIGHTS_NAME),
        "checkpoint": result.checkpoint.path,
        "pairs": str(pairs_dir),
        "num_pairs": len(index),
        "model": str(model_dir),
        "config": cfg.model_dump(mode="json"),
    }
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
