"""LoRA Diffusion-DPO trainer for CogVideoX and Wan on Ray Train (`TorchTrainer`) + DeepSpeed ZeRO.

What differs between the families (the transformer and scheduler classes, the noisy input and the
regression target, the folder checks) comes from the model folder's `common.families` adapter;
pairs encoded for another family than the model's are refused before any worker starts.

Read top to bottom:

    train(cfg, pairs_dir, model_dir, output_dir)          # on the driver
      1. validate the pairs dataset, the model folder and the batch arithmetic (no worker yet)
      2. start (or join) Ray; a small actor relays per-step metrics to the progress bar
      3. TorchTrainer(train_loop_per_worker, ScalingConfig, RunConfig(name, storage_path,
         FailureConfig, CheckpointConfig)).fit()
      4. export the last checkpoint's LoRA (with its adapter metadata) to
         output_dir/pytorch_lora_weights.safetensors, write train_summary.json

    train_loop_per_worker(loop_config)                    # on every Ray Train worker
      1. load the family's transformer, freeze it, add LoRA (rank 64 / alpha 128 on to_q,k,v,out.0)
      2. deepspeed.initialize (ZeRO-2 default, bf16 on GPU / fp32 on CPU, clipping, accumulation)
      3. resume from ray.train.get_checkpoint() when there is one
      4. for each optimizer step: micro-batches chosen by (seed, step, rank) -> dpo_step ->
         engine.backward -> engine.step; metrics averaged over ranks; every `eval_every` steps the
         held-out pairs' DPO loss / accuracy / margin (best LoRA -> output_dir/best/); rank 0
         appends each step's metrics to output_dir/metrics.jsonl as it goes
      5. every `checkpoint_every` steps and at the end: ray.train.report(metrics, checkpoint)
         holding the LoRA + optimizer + LR-scheduler state only (never the frozen base)

Determinism: which pairs, timesteps and noise a worker uses at step s depend only on
(seed, s, rank), so a run resumed from step k ends with the same LoRA as one that never stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.cogvideox import sample_video
from common.config import ScoreConfig
from common.errors import ConfigError, VideoGPAError
from common.families import FAMILIES, latent_space_differences, read_model_configs
from training.dpo import LossType, dpo_step
from common.lora import adapter_metadata, read_lora, save_lora
from common.sampling import inspect_video_model
from training.lora import (DEFAULT_TARGETS, LORA_WEIGHTS_NAME, add_lora, export_lora, lora_config, lora_parameters,
                           lora_state_dict)
from training.pairs import PairsDataset, PairsIndex, collate_pairs, load_pairs_index
from training.ray_session import ensure_ray

logger = logging.getLogger(__name__)

CHECKPOINT_STATE = "train_state.json"
DEEPSPEED_TAG = "deepspeed"
FAULT_MARKER = ".fault_drill_done"


class TrainingRunError(VideoGPAError):
    """The Ray Train run failed for good (workers kept dying, or the loop raised)."""

    http_status = 500


class TrainConfig(BaseModel):
    """Every setting of a DPO run; saved in every checkpoint and in train_summary.json.

    Defaults are the paper's reference setup (VideoGPA's CogVideoX-5B training script): LoRA rank 64,
    alpha 128 on to_q/to_k/to_v/to_out.0; AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8,
    weight decay 0.01: the script passes only the learning rate); peak LR 5e-6, 500 linear warm-up
    steps then cosine to 0; 16 pairs per optimizer step (8 GPUs x 1 x 2 accumulation); 10,000 steps;
    gradient clipping 1.0; bf16; beta 1 on mean-reduced errors; 2% of the pairs held out (seed 42).
    CogVideoX1.5 was trained for 1,500 steps: `cluster/train_config_cogvideox1.5.yaml`.
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
    max_steps: int = Field(10_000, ge=1, description="Optimizer steps in total (the paper: 10,000; CogVideoX1.5: 1,500).")
    batch_size: int = Field(16, ge=1, description="Pairs per optimizer step, over all workers and accumulation.")
    micro_batch_size: int = Field(1, ge=1, description="Pairs per worker per forward (winner + loser = 2x this).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay on the LoRA weights (torch's default, as the paper's script).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global L2 norm).")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (2 recommended with LoRA).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU. Under bf16, gradients are accumulated and all-reduced in fp32.")
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
    validation_score_config: ScoreConfig = Field(
        default_factory=ScoreConfig, description="The scorer's settings for validation scoring."
    )

    # --- held-out pairs: DPO loss, implicit accuracy and reward margin on pairs never trained on ---
    heldout_fraction: float = Field(
        0.02, ge=0, lt=1, description="Fraction of the pairs held out (rounded; 0 pairs for small sets). The paper: 2%.")
    heldout_seed: int = Field(42, description="Seeds which pairs are held out, and their fixed timesteps and noise.")
    eval_every: int = Field(
        250, ge=0, description="Evaluate the held-out pairs every N steps and at the end (0: never). The LoRA of the "
                               "step with the lowest held-out loss is kept in OUTPUT/best/.")

    # --- resources ---
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on a GPU cluster).")
    gpus_per_worker: Optional[float] = Field(
        None, ge=0,
        description="GPUs per worker. None (default): 1 when the Ray cluster has GPUs, else 0 (CPU, gloo, fp32: said at start).")
    collective_timeout_s: float = Field(
        1800, gt=0, description="Process-group timeout: how long a rank waits at a collective (e.g. while rank 0 validates).")
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


def heldout_split(num_pairs: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training pair indices, held-out pair indices), both sorted: round(fraction x num_pairs) held out, chosen by `seed`."""
    held = int(round(fraction * num_pairs))
    if held >= num_pairs:
        raise ConfigError(f"holding out {held} of {num_pairs} pairs leaves none to train on: lower heldout_fraction")
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def step_generator(cfg: TrainConfig, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator for one micro-batch's timesteps and noise: a function of (seed, step, micro, rank) only."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank)


def resolve_gpus_per_worker(requested: Optional[float], cluster_gpus: float, num_workers: int) -> tuple[float, str]:
    """(GPUs per worker, a sentence saying where training runs) from the setting and the cluster's GPUs.

    None: one GPU per worker whenever the cluster has GPUs (never a silent CPU run on a GPU cluster);
    the CPU otherwise. Asking for GPUs the cluster does not have is an error, not a hang.
    """
    gpus = requested if requested is not None else (1.0 if cluster_gpus > 0 else 0.0)
    if gpus > 0 and cluster_gpus <= 0:
        raise ConfigError(f"gpus_per_worker={gpus:g} but the Ray cluster has no GPU: drop the setting to train on the CPU")
    if gpus > 0 and gpus * num_workers > cluster_gpus:
        # An autoscaling cluster may still add GPU nodes: say it, do not refuse.
        return gpus, (f"training on {num_workers} worker(s) x {gpus:g} GPU (NCCL); the cluster has {cluster_gpus:g} GPU(s) "
                      "now, so the run waits until enough are added")
    if gpus > 0:
        return gpus, f"training on {num_workers} worker(s) x {gpus:g} GPU (NCCL)"
    return 0.0, (f"no GPU in the Ray cluster: training runs on the CPU ({num_workers} worker(s), gloo, fp32 unless "
                 "precision is bf16); fine for tiny models and tests, far too slow for CogVideoX or Wan")


def resolved_precision(cfg: TrainConfig) -> str:
    """"bf16" or "fp32": what `precision: auto` means for this run (bf16 on GPUs). gpus_per_worker must be resolved."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if (cfg.gpus_per_worker or 0) > 0 else "fp32"


def deepspeed_config(cfg: TrainConfig, use_cuda: bool) -> dict:
    """The DeepSpeed config. No optimizer block: the optimizer is passed in (see train_loop_per_worker).

    Under bf16 the weights and activations are bf16, but gradients are accumulated over the
    micro-batches in fp32 (`data_types.grad_accum_dtype`) and all-reduced in fp32
    (`communication_data_type`): summing 16 pairs' bf16 gradients (8 mantissa bits) in bf16 would
    round away the small LoRA updates a learning rate of 5e-6 makes.
    """
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
    precision = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if bf16 else {}
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
        **precision,
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


class MetricsLog:
    """Rank 0's record of every logged step, written as it happens (a killed driver loses nothing).

    `metrics.jsonl`: one JSON object per step, appended, flushed and fsynced; TensorBoard scalars in
    `tensorboard/` when the `tensorboard` package is installed.
    """

    def __init__(self, path: Path, tensorboard_dir: Optional[Path]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")
        self._tensorboard = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSON lines are the record
                pass
            else:
                self._tensorboard = SummaryWriter(str(tensorboard_dir))

    def write(self, metrics: dict) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, metrics["step"])
            self._tensorboard.flush()


@torch.no_grad()
def evaluate_heldout(model, forward, scheduler, dataset: PairsDataset, heldout: list[int], cfg: TrainConfig,
                     rank: int, world: int, compute_dtype: torch.dtype, device) -> dict[str, float]:
    """DPO loss, implicit accuracy and reward margin over the held-out pairs, averaged over all of them.

    Each pair always gets the same timestep and noise (seeded by heldout_seed and its index), so values
    at different steps are comparable. The pairs are split over the ranks; every rank runs the same
    number of forwards (short ranks repeat a pair with weight 0), as ZeRO-3 requires.
    """
    import torch.distributed as dist

    keys = ("loss", "rewards/accuracies", "rewards/margins", "err/policy_chosen", "err/policy_rejected")
    mine = heldout[rank::world]
    per_rank = math.ceil(len(heldout) / world)
    work = [(i, 1.0) for i in mine] + [(heldout[0], 0.0)] * (per_rank - len(mine))
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)  # weighted metric sums, then the pair count
    was_training = model.training
    model.eval()
    try:
        for pair, weight in work:
            out = dpo_step(model, scheduler, collate_pairs([dataset[pair]]), cfg.beta,
                           generator=torch.Generator().manual_seed(cfg.heldout_seed * 1_000_003 + pair),
                           loss_type=cfg.loss_type, compute_dtype=compute_dtype, forward=forward)
            sums += torch.tensor([weight * out.metrics[k] for k in keys] + [weight], dtype=torch.float64)
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    count = float(sums[-1])
    return {f"eval/{k}": float(sums[i]) / count for i, k in enumerate(keys)} | {"eval/pairs": count}


def _read_best(best_dir: Path, run_name: str) -> float:
    """The lowest held-out loss this run has kept in best_dir (inf when none): survives restarts."""
    record = best_dir / "best.json"
    if record.is_file():
        best = json.loads(record.read_text())
        if best.get("run_name") == run_name:
            return float(best["eval/loss"])
    return math.inf


# ------------------------------------------------------------------------------------------------
# The worker loop.
# ------------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig.model_validate(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    use_cuda = (cfg.gpus_per_worker or 0) > 0
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"worker {rank} was given {cfg.gpus_per_worker:g} GPU but torch sees no CUDA device "
                           "(a CPU-only torch build in the image?); refusing to train on the CPU instead")
    device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
    world = ray.train.get_context().get_world_size()
    index = PairsIndex(**loop_config["index"])
    dataset = PairsDataset(index)
    train_ids, heldout_ids = loop_config["train_pairs"], loop_config["heldout_pairs"]
    progress = loop_config.get("progress")
    log = MetricsLog(Path(loop_config["metrics_path"]), Path(loop_config["tensorboard_dir"])) if rank == 0 else None
    best_dir = Path(loop_config["best_dir"])
    best_loss = _read_best(best_dir, cfg.run_name)

    ds_config = deepspeed_config(cfg, use_cuda)

    # 1. The policy: frozen transformer + fresh LoRA (seeded, identical on every rank). Loaded in
    #    bf16 directly when training in bf16 (a 5B model in fp32 would need 22 GB per worker first).
    family = FAMILIES[index.family]
    transformer = family.load_transformer(loop_config["model_dir"],
                                          torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32)
    torch.manual_seed(cfg.seed)
    add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    scheduler = family.load_scheduler(loop_config["model_dir"])  # CogVideoX DPM (v-prediction); Wan's own flow scheduler

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
                export_lora(Path(tmp) / "lora", model, state_dict=state)
                # What a resumed launch must match (check_resume_compatible) besides the config.
                (Path(tmp) / CHECKPOINT_STATE).write_text(json.dumps(
                    {"step": step, "final": final, "config": cfg.model_dump(mode="json"),
                     "precision": "bf16" if engine.bfloat16_enabled() else "fp32",
                     "latent_space": index.summary.get("latent_space")}, indent=2))
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
            ids = [train_ids[i] for i in micro_batch_indices(len(train_ids), step, micro, rank, cfg)]
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
        done = step + 1 == cfg.max_steps
        if heldout_ids and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or done):
            metrics.update(evaluate_heldout(model, engine, scheduler, dataset, heldout_ids, cfg, rank, world,
                                            compute_dtype, device))
            if metrics["eval/loss"] < best_loss:  # the same decision on every rank: the metrics are all-reduced
                best_loss = metrics["eval/loss"]
                state = _lora_weights(model, cfg.zero_stage)  # a collective under ZeRO-3: every rank
                if rank == 0:
                    export_lora(best_dir, model, state_dict=state)
                    (best_dir / "best.json").write_text(json.dumps(
                        {"run_name": cfg.run_name, "step": step + 1,
                         **{k: v for k, v in metrics.items() if k.startswith("eval/")}}, indent=2))
        if cfg.validation_every and (step + 1) % cfg.validation_every == 0 and rank == 0:
            metrics.update(run_validation(model, loop_config["model_dir"], cfg, step + 1,
                                          Path(loop_config["validation_dir"]), index, validation_cache))
        if rank == 0:
            log.write(metrics)
            if progress is not None:
                progress.push.remote(metrics)
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
def run_validation(model, model_dir: str, cfg: TrainConfig, step: int, out_dir: Path, index: PairsIndex,
                   cache: dict) -> dict:
    """Sample `cfg.validation_prompts` with the current LoRA (fixed seeds), save MP4s, score them.

    Videos have the training pairs' size (frames, height, width from their latent shape), the
    prompt the pairs' text length; the pipeline is the family's (CogVideoX T2V / I2V, Wan T2V / I2V).

    Videos: out_dir/step_<step>/<i>.mp4 (+ scores.json). Returns metrics `val/score` (mean E over
    scorable videos; NaN if none), `val/scored`, `val/unscorable`. The pipeline (VAE, T5) is loaded
    once and shares the training transformer, so no weights are copied.
    """
    import diffusers
    import numpy as np

    from common.video import write_video

    i2v = index.i2v
    family = FAMILIES[index.family]
    if "pipe" not in cache:
        param = next(model.parameters())
        name = next(n for n, is_i2v in family.pipelines.items() if is_i2v == i2v)
        pipe = getattr(diffusers, name).from_pretrained(model_dir, transformer=model, torch_dtype=param.dtype).to(param.device)
        pipe.set_progress_bar_config(disable=True)
        cache["pipe"] = pipe
    pipe = cache["pipe"]
    num_frames, height, width = family.video_size_of_latents(index.latent_shape)
    text_length = index.text_shape[0]
    folder = out_dir / f"step_{step:08d}"
    was_training = model.training
    model.eval()
    paths = []
    try:
        for i, prompt in enumerate(cfg.validation_prompts):
            image = None
            if i2v:
                from PIL import Image

                image = Image.open(cfg.validation_images[i]).convert("RGB")
            video = sample_video(pipe, prompt, cfg.validation_seed + i, cfg.validation_inference_steps,
                                 num_frames, height, width, image=image, max_sequence_length=text_length)
            paths.append(write_video(folder / f"{i:02d}.mp4", video))
    finally:
        model.train(was_training)

    metrics: dict[str, float] = {}
    if cfg.validation_score:
        from common.scoring import score_video

        results = [score_video(p, cfg.validation_score_config) for p in paths]
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
        """Collects rank 0's per-step metrics for the driver's progress bar (rank 0 writes metrics.jsonl itself)."""

        def __init__(self) -> None:
            self._rows: list[dict] = []

        def push(self, metrics: dict) -> None:
            self._rows.append(metrics)

        def since(self, n: int) -> list[dict]:
            return self._rows[n:]

    return ProgressRelay


def check_model_folder(model_dir: Path, index: PairsIndex) -> dict:
    """The transformer config of a diffusers pipeline folder, checked against the pairs.

    Refused with a sentence saying why: not a folder of a family videogpa trains (CogVideoX, Wan),
    pairs encoded for another family, a scheduler the family's objective cannot use (CogVideoX:
    v-prediction; Wan: flow matching), latents of another task (T2V vs I2V) or channel count, text of
    another width, image embeddings other than the transformer takes (Wan 2.1 I2V), latent sizes the
    transformer cannot train on (the family adapter's `check_training_folder`), latents encoded in another latent space (VAE scaling factor or
    latents_mean / latents_std, latent channels, the I2V condition's scaling).
    """
    info = inspect_video_model(model_dir, need=("train",))  # a complete pipeline folder (the sampler's check)
    family = FAMILIES[info.family]
    if index.family != family.name:
        raise ConfigError(
            f"the pairs in {index.directory} were encoded for a {index.family} model, but {model_dir} holds a "
            f"{info.pipeline} ({family.name}): train on pairs encoded with this model (vgpa cache / vgpa mine --model "
            f"{model_dir}) or pass the {index.family} model they came from")
    tcfg, vcfg = read_model_configs(model_dir)
    family.check_training_folder(model_dir, tcfg, index.latent_shape, index.text_shape[1], index.i2v,
                                 image_embeds_shape=index.image_embeds_shape)
    check_pairs_latent_space(index, family.latent_space(tcfg, vcfg), f"the model in {model_dir}")
    return tcfg


def check_pairs_latent_space(index: PairsIndex, space: dict, what: str) -> None:
    """Refuse pairs whose latents were encoded in another latent space than `space` (that of `what`)."""
    recorded = index.summary.get("latent_space")
    if not recorded:
        raise ConfigError(
            f"the pairs in {index.directory} do not say which latent space they were encoded in (summary.json has no "
            "latent_space; written by an older videogpa): encode them again with `vgpa cache` or the mining job")
    differences = latent_space_differences(recorded, space)
    if differences:
        raise ConfigError(f"the pairs in {index.directory} were encoded for another model than {what}: "
                          + "; ".join(differences))


def export_checkpoint_lora(ckpt_dir: Path, output_dir: Path) -> Path:
    """A checkpoint's LoRA as `output_dir/pytorch_lora_weights.safetensors`, always with its adapter metadata.

    Checkpoints written before exports carried the metadata (r, alpha, targets) get it from the run
    config saved beside the weights, so a run resumed from such a checkpoint still exports exactly.
    """
    weights, metadata = read_lora(ckpt_dir / "lora")
    if metadata is None:
        saved = json.loads((ckpt_dir / CHECKPOINT_STATE).read_text())["config"]
        metadata = adapter_metadata(lora_config(saved["lora_rank"], saved["lora_alpha"], saved["lora_targets"],
                                                saved.get("lora_dropout", 0.0)))
    return save_lora(output_dir, weights, metadata)


#: Settings a resumed run must keep: each rank's checkpoint holds its own ZeRO partition
#: (num_workers, zero_stage), the LoRA's shape and scale are in the weights (lora_rank, lora_alpha,
#: lora_targets), and the optimizer state is in the trained precision.
RESUME_INVARIANTS = ("num_workers", "zero_stage", "lora_rank", "lora_alpha", "lora_targets")


def check_resume_compatible(cfg: TrainConfig, run_dir: Path, index: Optional[PairsIndex] = None) -> None:
    """Refuse to resume a run with settings its checkpoint cannot continue (see RESUME_INVARIANTS).

    Also refused: another resolved precision (bf16 vs fp32), and pairs from another latent space.
    Steps, learning rate, beta or the pairs themselves (same latent space) may change. Only local
    (or mounted) storage is inspected; for s3:// and the like DeepSpeed's own load reports a mismatch.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    state_path = run_dir / str(latest) / CHECKPOINT_STATE
    if not latest or not state_path.is_file():
        return
    state = json.loads(state_path.read_text())
    saved = state["config"]
    where = f"run '{cfg.run_name}' in {run_dir.parent}"
    for key in RESUME_INVARIANTS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(
                f"{where} was checkpointed with {key}={saved.get(key)}, "
                f"now {key}={getattr(cfg, key)}: resume with the same value or choose a new run name"
            )
    if state.get("precision") and state["precision"] != resolved_precision(cfg):
        raise ConfigError(f"{where} was trained in {state['precision']}, this launch would train in "
                          f"{resolved_precision(cfg)}: set precision: {state['precision']} or choose a new run name")
    if index is not None and state.get("latent_space"):
        check_pairs_latent_space(index, state["latent_space"], f"the one {where} was trained on")


def train(
    cfg: TrainConfig,
    pairs_dir: str | Path,
    model_dir: str | Path,
    output_dir: str | Path,
    address: Optional[str] = None,
    on_step: Optional[Callable[[dict], None]] = None,
    log: Callable[[str], None] = logger.warning,
) -> dict:
    """Run (or resume) a DPO run and export its LoRA. Returns the summary written to train_summary.json.

    Args:
        cfg: the run's settings.
        pairs_dir: a pairs dataset (training.pairs); validated here before any worker starts.
        model_dir: a diffusers CogVideoX or Wan pipeline folder (transformer/ and scheduler/ are read).
        output_dir: receives pytorch_lora_weights.safetensors, train_summary.json, metrics.jsonl and
            validation/step_*/ (videos and scores) when validation is on.
        address: a Ray cluster address; None joins the running Ray or starts an embedded one.
        on_step: called on the driver with each step's metrics (progress bars).
        log: receives sentences for the person running it (where training runs: GPUs or the CPU).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # 1. Validate everything that can be checked without a worker.
    pairs_dir, model_dir, output_dir = Path(pairs_dir).resolve(), Path(model_dir).resolve(), Path(output_dir).resolve()
    index = load_pairs_index(pairs_dir)
    check_model_folder(model_dir, index)
    train_pairs, heldout_pairs = heldout_split(len(index), cfg.heldout_fraction, cfg.heldout_seed)
    if len(train_pairs) < cfg.micro_batch_size:
        raise ConfigError(f"the pairs dataset has {len(train_pairs)} pairs to train on, fewer than micro_batch_size "
                          f"{cfg.micro_batch_size}")
    output_dir.mkdir(parents=True, exist_ok=True)
    storage_path = cfg.storage_path or str(output_dir / "ray")

    # 2. Ray, where the workers run, and the progress relay.
    # A cluster when one is named (`ray job submit` sets RAY_ADDRESS), else an embedded Ray on loopback.
    ensure_ray(address, min_cpus=math.ceil(cfg.num_workers * cfg.cpus_per_worker) + 1)
    gpus, where = resolve_gpus_per_worker(cfg.gpus_per_worker, ray.cluster_resources().get("GPU", 0), cfg.num_workers)
    cfg = cfg.model_copy(update={"gpus_per_worker": gpus})
    log(where)
    if heldout_pairs:
        log(f"holding out {len(heldout_pairs)} of {len(index)} pairs (seed {cfg.heldout_seed}): eval/* metrics every "
            f"{cfg.eval_every} steps, the best LoRA in {output_dir / 'best'}")
    elif cfg.heldout_fraction > 0:
        log(f"{len(index)} pairs x heldout_fraction {cfg.heldout_fraction:g} rounds to 0: no held-out evaluation")
    check_resume_compatible(cfg, Path(storage_path) / cfg.run_name, index)
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
            "metrics_path": str(output_dir / "metrics.jsonl"),
            "tensorboard_dir": str(output_dir / "tensorboard"),
            "best_dir": str(output_dir / "best"),
            "train_pairs": train_pairs,
            "heldout_pairs": heldout_pairs,
            "progress": relay,
        },
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo", timeout_s=int(cfg.collective_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
            # Workers of one node share it (NCCL over NVLink inside a multi-GPU pod): see train-rayjob.yaml.
            placement_strategy="PACK",
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
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        stop.set()
        poller.join(timeout=30)
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
        export_checkpoint_lora(Path(ckpt_dir), output_dir)
        state = json.loads((Path(ckpt_dir) / CHECKPOINT_STATE).read_text())
    final = result.metrics or {}
    best_record = output_dir / "best" / "best.json"
    best = json.loads(best_record.read_text()) if best_record.is_file() else None
    summary = {
        "run_name": cfg.run_name,
        "steps": state["step"],
        "steps_this_launch": len(rows),
        "first_step_this_launch": rows[0]["step"] if rows else None,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "final_metrics": final,
        "lora": str(output_dir / LORA_WEIGHTS_NAME),
        "best": ({"lora": str(output_dir / "best" / LORA_WEIGHTS_NAME), **best}
                 if best and best.get("run_name") == cfg.run_name else None),
        "heldout_pairs": len(heldout_pairs),
        "checkpoint": result.checkpoint.path,
        "pairs": str(pairs_dir),
        "num_pairs": len(index),
        "model": str(model_dir),
        "family": index.family,
        "pipeline": inspect_video_model(model_dir, need=()).pipeline,
        "device": where,
        "precision": state.get("precision"),
        "config": cfg.model_dump(mode="json"),
    }
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
