"""Encode videos and prompts once, with the model's own VAE and T5, into a pairs dataset.

Input: a folder with the clips and a `pairs.jsonl`, one JSON object per line:

    {"prompt": "...", "winner": "clips/a.mp4", "loser": "clips/b.mp4",
     "image": "first.png" (optional, image-to-video), "winner_score": 0.1, "loser_score": 0.4}

Paths are relative to the folder. Output: a pairs dataset (training.pairs) whose latents are

    VAE(frames in [-1, 1]) posterior mean x scaling_factor, permuted to (F, C, h, w)

and whose text embeddings are the pipeline's own `encode_prompt` (L = max_sequence_length).
For image-to-video models the condition latent is the "image" if given, else the winner's first
frame (both clips of a pair were generated from the same image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from common.errors import ConfigError, TooFewFramesError
from training.pairs import Pair, PairsDatasetError, write_pairs_dataset


def fit_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H0, W0, 3) -> float32 (3, T, height, width) in [-1, 1]: resize to cover, centre-crop."""
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H0, W0)
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[2] - height) // 2, (x.shape[3] - width) // 2
    x = x[:, :, top : top + height, left : left + width].clamp(-1, 1)
    return x.permute(1, 0, 2, 3).contiguous()


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor) -> torch.Tensor:
    """VAE latents of frames (3, T, H, W) in [-1, 1] -> (F, C, h, w), F = (T - 1) // 4 + 1, times scaling_factor.

    The posterior mean is used (not a sample) so that caching twice gives the same latents.
    """
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames must be (3, T, H, W), got {tuple(frames.shape)}")
    param = next(vae.parameters())
    dist = vae.encode(frames.unsqueeze(0).to(param.device, param.dtype)).latent_dist
    latents = dist.mean * vae.config.scaling_factor  # (1, C, F, h, w)
    return latents[0].permute(1, 0, 2, 3).float().cpu().contiguous()


def _read_clip(path: Path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The first `num_frames` frames of a video (or one image) as (3, T, height, width) in [-1, 1]."""
    from common.video import IMAGE_SUFFIXES, load_video

    if path.suffix.lower() in IMAGE_SUFFIXES:
        import numpy as np
        from PIL import Image

        frame = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).unsqueeze(0)
        return fit_frames(frame, height, width)
    video = load_video(path, wanted=lambda total: range(min(total, num_frames)), max_side=4096)
    if video.frames.shape[0] < num_frames:
        raise TooFewFramesError(f"{path} has {video.frames.shape[0]} frames; the model needs {num_frames}")
    return fit_frames(video.frames, height, width)


def cache_pairs(
    folder: str | Path,
    model_dir: str | Path,
    output: str | Path,
    num_frames: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    max_sequence_length: Optional[int] = None,
    device: str = "cpu",
    on_pair: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Encode every pair listed in `folder/pairs.jsonl` with the pipeline in `model_dir`; write a pairs dataset.

    Sizes default to the transformer's sample size (frames = sample_frames, pixels = latent size x
    the VAE's spatial factor) and the transformer's `max_text_seq_length`. Returns the output folder.
    """
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, DiffusionPipeline

    folder, model_dir = Path(folder), Path(model_dir)
    listing = folder / "pairs.jsonl"
    if not listing.is_file():
        raise PairsDatasetError(f"{folder} has no pairs.jsonl listing the pairs to encode")
    entries = [json.loads(line) for line in listing.read_text().splitlines() if line.strip()]
    if not entries:
        raise PairsDatasetError(f"{listing} lists no pairs")
    for n, entry in enumerate(entries, 1):
        missing = [k for k in ("prompt", "winner", "loser") if k not in entry]
        if missing:
            raise PairsDatasetError(f"{listing} line {n} lacks {', '.join(missing)}")
        for key in ("winner", "loser", "image"):
            if key in entry and not (folder / entry[key]).exists():
                raise PairsDatasetError(f"{listing} line {n}: {entry[key]} does not exist in {folder}")

    if not (model_dir / "model_index.json").is_file():
        raise ConfigError(f"{model_dir} is not a diffusers pipeline folder (model_index.json is missing)")
    pipe = DiffusionPipeline.from_pretrained(model_dir).to(device)
    if not isinstance(pipe, (CogVideoXPipeline, CogVideoXImageToVideoPipeline)):
        raise ConfigError(f"{model_dir} holds a {type(pipe).__name__}, not a CogVideoX pipeline")
    tcfg, spatial = pipe.transformer.config, pipe.vae_scale_factor_spatial
    i2v = isinstance(pipe, CogVideoXImageToVideoPipeline)
    num_frames = num_frames or tcfg.sample_frames
    height = height or tcfg.sample_height * spatial
    width = width or tcfg.sample_width * spatial
    max_sequence_length = max_sequence_length or tcfg.max_text_seq_length

    text_cache: dict[str, torch.Tensor] = {}

    def pairs():
        for n, entry in enumerate(entries):
            prompt = entry["prompt"]
            if prompt not in text_cache:
                embeds, _ = pipe.encode_prompt(
                    prompt, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device
                )
                text_cache[prompt] = embeds[0].float().cpu()  # (L, D)
            winner = _read_clip(folder / entry["winner"], num_frames, height, width)
            loser = _read_clip(folder / entry["loser"], num_frames, height, width)
            image_latents = None
            if i2v:
                image = _read_clip(folder / entry["image"], 1, height, width) if "image" in entry else winner[:, :1]
                image_latents = encode_frames(pipe.vae, image)  # (1, C, h, w)
            yield Pair(
                prompt=prompt,
                winner_latents=encode_frames(pipe.vae, winner),
                loser_latents=encode_frames(pipe.vae, loser),
                prompt_embeds=text_cache[prompt],
                image_latents=image_latents,
                winner_score=float(entry.get("winner_score", float("nan"))),
                loser_score=float(entry.get("loser_score", float("nan"))),
                winner_video=str(entry["winner"]),
                loser_video=str(entry["loser"]),
            )
            if on_pair:
                on_pair(n + 1, len(entries))

    return write_pairs_dataset(
        output,
        pairs(),
        model=str(model_dir),
        extra={"frames": num_frames, "height": height, "width": width, "encoded_with": "vgpa cache"},
    )
