"""`vgpa compare-lora`: the base model and a LoRA at several adapter scales, on the same prompts and seeds.

    for each scale s in [0 (the base model), 0.25, 0.5, 1.0, ...]:
        for each prompt, seed: sample with the LoRA at s x its trained strength  -> OUT/scale-<s>/<id>-seed<k>.mp4
        measure every video: the geometry metrics of `vgpa eval` (common.evaluation) and the mean
        HSV saturation (common.saturation)
    report per scale: the metrics' means and win rates against the base, the saturation and its change
    against the base on the same prompt and seed, flagged when it exceeds the tolerance

Why the saturation guard: users of the reference LoRA for CogVideoX1.5 report over-saturated videos
at scale 1.0 and lower the scale by hand; this shows the geometry / colour trade-off per scale.
The LoRA is loaded with `common.lora.load_lora`, the path the sampler deployment uses, so scale 1.0
is exactly the trained policy and scale 0 the base model (adapter disabled, bit-identical).
Either family (CogVideoX T2V / I2V, Wan T2V): default size and prompt length come from the folder's
`common.families` adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.config import ScoreConfig
from common.errors import ConfigError

ADAPTER = "candidate"


class CompareConfig(BaseModel):
    """How to sample and judge the comparison (the geometry settings are a `ScoreConfig`)."""

    model_config = ConfigDict(extra="forbid")

    scales: list[float] = Field([0.0, 0.25, 0.5, 1.0], description="Adapter scales (x alpha / r); 0 is the base model.")
    seeds: list[int] = Field([0], description="Seeds sampled for every prompt (the same for every scale).")
    steps: int = Field(50, ge=1, description="Denoising steps per video.")
    guidance: float = Field(6.0, ge=0, description="Classifier-free guidance scale.")
    frames: Optional[int] = Field(None, description="Pixel frames (default: the model's, from its family adapter).")
    height: Optional[int] = Field(None, description="Pixel height (default: the model's).")
    width: Optional[int] = Field(None, description="Pixel width (default: the model's).")
    saturation_tolerance: float = Field(
        0.05, ge=0, description="Flag a scale whose mean HSV saturation exceeds the base's by more than this (absolute).")
    device: str = Field("auto", description="auto (cuda when available), cpu or cuda[:N].")

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v or any(s < 0 or not math.isfinite(s) for s in v):
            raise ValueError("scales must be one or more finite values >= 0")
        return sorted(set(v))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError("seeds must be one or more distinct integers")
        return v


def scale_label(scale: float) -> str:
    return "base" if scale == 0 else f"scale-{scale:g}"


def compare_lora(model_dir: str | Path, lora_dir: str | Path, prompts_file: str | Path, out_dir: str | Path,
                 settings: CompareConfig, score: ScoreConfig, backend,
                 progress: Optional[Callable[[str], None]] = None) -> dict:
    """Sample, measure and compare (see the module docstring); writes OUT/compare.json; returns its content.

    `backend`: the geometry backend (`common.geometry.create_backend`), created by the caller so
    that a missing model fails before any sampling.
    """
    from PIL import Image

    from common.cogvideox import sample_video
    from common.evaluation import evaluate_set, summarise
    from common.families import FAMILIES
    from common.lora import load_lora, select_adapter
    from common.sampling import load_video_model
    from common.saturation import mean_saturation
    from common.video import load_video, write_video
    from training.prompts import read_prompt_file

    say = progress or (lambda line: None)
    out_dir = Path(out_dir)
    prompts = read_prompt_file(prompts_file)
    model_dir = Path(model_dir)
    pipe, model = load_video_model(model_dir, device=settings.device)
    i2v = model.i2v
    if i2v and not all(p["image"] for p in prompts):
        raise ConfigError(f"{model_dir} is an image-to-video model: every prompt in {prompts_file} needs an image")
    metadata = load_lora(pipe, lora_dir, ADAPTER)
    family = FAMILIES[model.family]
    text_length = family.encode_text_length(pipe.transformer.config, pipe)  # what the pairs were encoded with
    frames, height, width = family.default_video_size(pipe.transformer.config)
    frames, height, width = settings.frames or frames, settings.height or height, settings.width or width

    # 1. Sample: the same prompts and seeds at every scale; 0 is the base model.
    scales = sorted(set([0.0] + settings.scales))
    videos: dict[float, dict[str, Path]] = {}
    for scale in scales:
        select_adapter(pipe, None if scale == 0 else ADAPTER, scale)
        folder = out_dir / scale_label(scale)
        videos[scale] = {}
        for row in prompts:
            image = Image.open(row["image"]).convert("RGB").resize((width, height)) if i2v else None
            for seed in settings.seeds:
                name = f"{row['prompt_id']}-seed{seed}"
                say(f"{scale_label(scale)}: {name}")
                video = sample_video(pipe, row["prompt"], seed, settings.steps, frames, height, width,
                                     guidance=settings.guidance, image=image, max_sequence_length=text_length)
                videos[scale][name] = write_video(folder / f"{name}.mp4", video)
    del pipe

    # 2. Measure: geometry (as `vgpa eval`) and colour saturation, per video.
    rows: dict[float, list[dict]] = {}
    for scale in scales:
        say(f"measuring {scale_label(scale)}")
        rows[scale] = evaluate_set(videos[scale], score, backend, label=scale_label(scale))
        for row in rows[scale]:
            row["saturation"] = mean_saturation(load_video(row["path"], max_side=4096).frames.numpy())

    # 3. Compare every scale with the base, on the same prompt and seed.
    base = {r["name"]: r for r in rows[0.0]}
    report = []
    for scale in scales:
        deltas = [r["saturation"] - base[r["name"]]["saturation"] for r in rows[scale] if r["name"] in base]
        saturation = [r["saturation"] for r in rows[scale]]
        change = float(np.mean(deltas)) if deltas else None
        geometry = summarise(rows[0.0], rows[scale])["metrics"]
        report.append({
            "scale": scale,
            "label": scale_label(scale),
            "videos": len(rows[scale]),
            "measured": sum(r["status"] == "ok" for r in rows[scale]),
            "saturation": float(np.mean(saturation)),
            "saturation_change": change,
            "over_saturated": change is not None and change > settings.saturation_tolerance,
            "metrics": {m: {"mean": e["b"]["mean"], "n": e["b"]["n"], "win_rate_vs_base": e["win_rate_b"],
                            "higher_is_better": e["higher_is_better"]} for m, e in geometry.items()},
        })
    result = {
        "model": str(model_dir), "family": model.family, "pipeline": model.pipeline, "lora": str(lora_dir), "adapter": metadata, "prompts": str(prompts_file),
        "settings": settings.model_dump(), "score": score.model_dump(mode="json"),
        "size": {"frames": frames, "height": height, "width": width},
        "scales": report,
        "videos": [r for scale in scales for r in rows[scale]],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def format_comparison(result: dict, metrics: tuple[str, ...] = ("psnr", "ssim", "mvcs", "epipolar_px")) -> str:
    """The table `vgpa compare-lora` prints: one line per scale."""
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    header = f"{'scale':<12}{'measured':>9}" + "".join(f"{m:>14}" for m in metrics) + f"{'saturation':>12}{'vs base':>10}"
    lines = [header, "-" * len(header)]
    tolerance = result["settings"]["saturation_tolerance"]
    for row in result["scales"]:
        line = f"{row['label']:<12}{row['measured']:>4}/{row['videos']:<4}"
        for m in metrics:
            entry = row["metrics"][m]
            win = "" if row["scale"] == 0 or entry["win_rate_vs_base"] is None else f" {100 * entry['win_rate_vs_base']:.0f}%"
            line += f"{fmt(entry['mean']) + win:>14}"
        change = row["saturation_change"]
        line += f"{row['saturation']:>12.3f}{('-' if change is None or row['scale'] == 0 else f'{change:+.3f}'):>10}"
        if row["over_saturated"]:
            line += f"  OVER-SATURATED (> +{tolerance:g})"
        lines.append(line)
    lines.append("metric means over measured videos, with the win rate against the base on the same prompt and seed; "
                 "saturation: mean HSV S in [0, 1]")
    return "\n".join(lines)
