"""`vgpa train` (LoRA Diffusion-DPO on Ray Train + DeepSpeed) and `vgpa cache` (encode videos + prompts once).

    vgpa cache --videos DIR --model DIR --output PAIRS_DIR
    vgpa train --pairs PAIRS_DIR --model DIR --output DIR [--workers N] [--gpus-per-worker G]
               [--steps S] [--beta B[,B2,...]] [--config FILE] [--address ADDR] [--run-name NAME]
               [--storage-path URI]

`--config FILE` is a YAML or JSON mapping of `training.trainer.TrainConfig` fields; flags given on
the command line override it. Re-running the same command (same run name and storage path)
continues from the last checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import click

from common.errors import ConfigError, invalid_settings


def load_train_config(path: Optional[Path], overrides: dict):
    """TrainConfig from a YAML/JSON file plus command-line overrides (None values are ignored)."""
    import yaml
    from pydantic import ValidationError

    from training.trainer import TrainConfig

    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        data = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of TrainConfig fields")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise invalid_settings(err, "training setting") from None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def parse_betas(text: Optional[str]) -> list[float]:
    """"1,250,1250" -> [1.0, 250.0, 1250.0]; each must be positive."""
    if text is None:
        return []
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--beta") from None
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter("give one or more positive values, e.g. --beta 1,250,1250", param_hint="--beta")
    return values


SUMMARY_ROWS = [("loss", "loss"), ("rewards/accuracies", "implicit acc"), ("rewards/margins", "reward margin"),
                ("err/policy_chosen", "err winners"), ("err/policy_rejected", "err losers"),
                ("eval/loss", "held-out loss"), ("eval/rewards/accuracies", "held-out acc"),
                ("eval/rewards/margins", "held-out margin"), ("grad_norm", "grad norm"),
                ("lora_rank_spread", "rank spread"), ("val/score", "val geometry E"), ("val/unscorable", "val unscorable")]


def _print_summary(summary: dict) -> None:
    m = summary["final_metrics"]
    click.echo("")
    click.echo(f"run            {summary['run_name']}  ({summary['steps']} steps, "
               f"{summary['steps_this_launch']} this launch, {summary['wall_time_s']} s)")
    click.echo(f"pairs          {summary['num_pairs']} from {summary['pairs']} ({summary['heldout_pairs']} held out)")
    for key, label in SUMMARY_ROWS:
        if key in m and not (isinstance(m[key], float) and math.isnan(m[key])):
            click.echo(f"{label:<14} {_fmt(m[key])}")
    click.echo(f"LoRA           {summary['lora']}")
    if summary.get("best"):
        click.echo(f"best LoRA      {summary['best']['lora']} (step {summary['best']['step']}, "
                   f"held-out loss {_fmt(summary['best']['eval/loss'])})")
    click.echo(f"checkpoint     {summary['checkpoint']}")
    click.echo(f"load with      {summary.get('pipeline') or 'CogVideoXPipeline'}.load_lora_weights('{Path(summary['lora']).parent}')")


@click.command(help="Train a LoRA with Diffusion-DPO on geometry preference pairs (Ray Train + DeepSpeed), for CogVideoX "
                    "(v-prediction) or Wan (flow matching).")
@click.option("--pairs", "pairs_dir", required=True, type=click.Path(path_type=Path), help="Pairs dataset folder (vgpa cache / mining job).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Diffusers pipeline folder the pairs were encoded with: CogVideoX (CogVideoXPipeline, "
                   "CogVideoXImageToVideoPipeline) or Wan (WanPipeline, WanImageToVideoPipeline).")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path), help="Receives pytorch_lora_weights.safetensors.")
@click.option("--workers", type=int, default=None, help="Ray Train workers (default 1).")
@click.option("--gpus-per-worker", type=float, default=None,
              help="GPUs per worker (default: 1 when the Ray cluster has GPUs, else the CPU, said at start).")
@click.option("--steps", type=int, default=None, help="Optimizer steps in total (max_steps).")
@click.option("--beta", "betas", default=None,
              help="DPO beta; a comma-separated list (e.g. 1,250,1250) runs one training per value, one after "
                   "the other, as RUN_NAME-beta<value> into OUTPUT/beta-<value>/, and compares them.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML/JSON file of TrainConfig fields.")
@click.option("--address", default=None, help="Ray cluster address; default: RAY_ADDRESS or an embedded local Ray.")
@click.option("--run-name", default=None, help="Ray Train run name (the same name resumes).")
@click.option("--storage-path", default=None, help="Checkpoint storage (shared FS or s3://); default OUTPUT/ray.")
def train(pairs_dir, model_dir, output_dir, workers, gpus_per_worker, steps, betas, config_file, address, run_name,
          storage_path):
    betas = parse_betas(betas)
    cfg = load_train_config(
        config_file,
        {"num_workers": workers, "gpus_per_worker": gpus_per_worker, "max_steps": steps,
         "run_name": run_name, "storage_path": storage_path, "beta": betas[0] if len(betas) == 1 else None},
    )
    if len(betas) <= 1:
        _print_summary(_train_one(cfg, pairs_dir, model_dir, output_dir, address))
        return
    # A beta sweep: one run per value, each resumable on its own (its own run name and folder).
    results = []
    for beta in betas:
        one = cfg.model_copy(update={"beta": beta, "run_name": f"{cfg.run_name}-beta{beta:g}"})
        summary = _train_one(one, pairs_dir, model_dir, Path(output_dir) / f"beta-{beta:g}", address)
        _print_summary(summary)
        results.append((beta, summary))
    click.echo("\nbeta sweep     final loss / implicit acc / held-out loss / policy error on losers")
    for beta, summary in results:
        m = summary["final_metrics"]
        click.echo(f"beta {beta:<9g} " + " / ".join(_fmt(m.get(k, float("nan")))
                                                 for k in ("loss", "rewards/accuracies", "eval/loss", "err/policy_rejected")))


def _train_one(cfg, pairs_dir: Path, model_dir: Path, output_dir: Path, address: Optional[str]) -> dict:
    """One training run with a progress bar; returns its summary."""
    from tqdm import tqdm

    from training.trainer import train as run_training

    click.echo(
        f"training run '{cfg.run_name}': {cfg.max_steps} steps, batch {cfg.batch_size} "
        f"({cfg.num_workers} worker(s) x {cfg.micro_batch_size} x {cfg.grad_accum_steps} accumulation), "
        f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g}, beta={cfg.beta:g}, lr={cfg.learning_rate:g}, ZeRO-{cfg.zero_stage}"
    )
    bar = tqdm(total=cfg.max_steps, unit="step", dynamic_ncols=True, desc="starting workers")
    started = []

    def on_step(metrics: dict) -> None:
        if not started:  # time the rate from the first step, not from Ray and DeepSpeed start-up
            started.append(True)
            bar.reset(total=cfg.max_steps)
            bar.set_description("training")
        bar.n = int(metrics["step"])  # a retried worker group repeats steps: show the step, not a count
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                        margin=f"{metrics['rewards/margins']:.3g}", lr=f"{metrics['lr']:.2e}")
        bar.refresh()

    try:
        return run_training(cfg, pairs_dir, model_dir, output_dir, address=address, on_step=on_step, log=bar.write)
    finally:
        bar.close()


@click.command(help="Encode a folder of videos + prompts (pairs.jsonl) into a pairs dataset with the model's VAE and text "
                    "encoder (CogVideoX: T5; Wan: UMT5).")
@click.option("--videos", "folder", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with the clips and pairs.jsonl ({prompt, winner, loser[, image, winner_score, loser_score]}).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Diffusers pipeline folder: CogVideoX (CogVideoXPipeline, CogVideoXImageToVideoPipeline) or Wan (WanPipeline, WanImageToVideoPipeline).")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Pairs dataset folder to write.")
@click.option("--frames", type=int, default=None,
              help="Pixel frames per clip, 4k+1 (default: the model's: CogVideoX its sample_frames, Wan 81).")
@click.option("--height", type=int, default=None, help="Pixel height (default: the model's; Wan 480).")
@click.option("--width", type=int, default=None, help="Pixel width (default: the model's; Wan 832).")
@click.option("--device", default=None, help="Where the VAE and T5 run (default: cuda when available, else cpu).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default=None,
              help="Encoding precision (default: bfloat16 on a GPU, float32 on the CPU).")
def cache(folder, model_dir, output, frames, height, width, device, dtype):
    from tqdm import tqdm

    from training.encode import cache_pairs
    from training.pairs import load_pairs_index

    bar = tqdm(unit="pair", dynamic_ncols=True)

    def on_pair(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        out = cache_pairs(folder, model_dir, output, num_frames=frames, height=height, width=width,
                          device=device, dtype=dtype, on_pair=on_pair)
    finally:
        bar.close()
    index = load_pairs_index(out)
    encoded = index.summary["encode"]
    layout = ", ".join(index.summary["latent_layout"])
    text_encoder = "UMT5" if index.family == "wan" else "T5"
    image = ""
    if index.i2v:
        image = ", image-to-video" + (f" with image embeddings {list(index.image_embeds_shape)} (N, D)"
                                      if index.image_embeds_shape else "")
    click.echo(f"wrote {len(index)} pairs to {out} ({index.family}): latents {list(index.latent_shape)} ({layout}), "
               f"text {list(index.text_shape)} (L, D){image}")
    encoders = f"VAE, {text_encoder} and the image encoder" if index.image_embeds_shape else f"VAE and {text_encoder}"
    click.echo(f"encoded on {encoded['device']} in {encoded['dtype']}{' with VAE tiling' if encoded['tiling'] else ''} "
               f"({encoders} only, no transformer): peak memory {encoded['peak_memory_mb']:.0f} MB "
               f"({encoded['peak_memory_kind']})")


COMMANDS = [train, cache]
