"""`vgpa compare-lora`: the base model and a LoRA at several scales, same prompts and seeds, with the geometry
metrics and a colour-saturation guard per scale."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from clients.commands.score import config_from_options


def _numbers(text: str, kind, option: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list", param_hint=option) from None


@click.command(
    name="compare-lora",
    help=("Sample the same prompts and seeds with the base model and with a LoRA at several adapter scales, measure "
          "every video's geometry (as `vgpa eval`) and mean colour saturation, and report them per scale with the "
          "change against the base. Videos and compare.json go to --out."),
)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Diffusers pipeline folder: CogVideoX (CogVideoXPipeline, CogVideoXImageToVideoPipeline) or Wan (WanPipeline, WanImageToVideoPipeline).")
@click.option("--lora", "lora_dir", required=True, type=click.Path(path_type=Path), help="Folder with pytorch_lora_weights.safetensors.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(path_type=Path),
              help="Prompt file (JSON Lines: prompt_id, prompt[, image]), as `vgpa prompts` writes.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("compare-lora"), show_default=True, help="Output folder.")
@click.option("--scales", default="0,0.25,0.5,1", show_default=True, help="Adapter scales (x alpha / r); 0 = the base model.")
@click.option("--seeds", default="0", show_default=True, help="Seeds per prompt, comma separated.")
@click.option("--steps", type=int, default=50, show_default=True, help="Denoising steps.")
@click.option("--guidance", type=float, default=6.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--sample-frames", "sample_frames", type=int, default=None, help="Pixel frames sampled (default: the model's).")
@click.option("--height", type=int, default=None, help="Pixel height (default: the model's).")
@click.option("--width", type=int, default=None, help="Pixel width (default: the model's).")
@click.option("--saturation-tolerance", type=float, default=0.05, show_default=True,
              help="Flag scales whose mean HSV saturation exceeds the base's by more than this.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] (sampling).")
@click.option("--frames", type=int, help="Frames measured per video (default 10).")
@click.option("--backend", help="Geometry backend (default colmap-flow).")
@click.option("--weights", type=click.Path(path_type=Path), help="Local weights for a learned backend.")
@click.option("--max-side", type=int, help="Resize for measuring so the long side is at most this (default 720).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-scale report as one JSON object.")
def compare_lora_command(model_dir, lora_dir, prompts_file, out, scales, seeds, steps, guidance, sample_frames, height,
                         width, saturation_tolerance, device, frames, backend, weights, max_side, as_json):
    from pydantic import ValidationError

    from common.errors import invalid_settings
    from common.geometry import create_backend
    from training.compare_lora import CompareConfig, compare_lora, format_comparison

    try:
        settings = CompareConfig(scales=_numbers(scales, float, "--scales"), seeds=_numbers(seeds, int, "--seeds"),
                                   steps=steps, guidance=guidance, frames=sample_frames, height=height, width=width,
                                   saturation_tolerance=saturation_tolerance, device=device)
    except ValidationError as err:
        raise invalid_settings(err, "compare-lora setting") from None
    score = config_from_options(frames=frames, backend=backend, weights=weights, max_side=max_side)
    geometry = create_backend(score.backend, score.weights)  # a missing model fails before any sampling
    result = compare_lora(model_dir, lora_dir, prompts_file, out, settings, score, geometry,
                          progress=lambda line: click.echo(f"[compare-lora] {line}", err=True))
    if as_json:
        sys.stdout.write(json.dumps({"scales": result["scales"], "output": str(Path(out) / "compare.json")}) + "\n")
        return
    click.echo(format_comparison(result))
    click.echo(f"wrote {Path(out) / 'compare.json'} and the videos under {out}/")


COMMANDS = [compare_lora_command]
