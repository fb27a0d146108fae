"""Encode videos and prompts once, with the model's own VAE and text encoder, into a pairs dataset.

Input: a folder with the clips and a `pairs.jsonl`, one JSON object per line:

    {"prompt": "...", "winner": "clips/a.mp4", "loser": "clips/b.mp4",
     "image": "first.png" (optional, image-to-video), "winner_score": 0.1, "loser_score": 0.4}

Paths are relative to the folder. Output: a pairs dataset (training.pairs) whose latents are the
VAE's posterior mean of the frames in [-1, 1], put in the transformer's space by the folder's
family adapter (`common.families`, `encode_latents`):

    cogvideox   x scaling_factor, permuted to (F, C, h, w)
    wan         (z - latents_mean) / latents_std per channel, kept as (C, F, h, w)

and whose text embeddings are the pipeline's own `encode_prompt` (CogVideoX: T5, L = the
transformer's max_text_seq_length; Wan: UMT5, L = 512, or the tokenizer's model_max_length if smaller).
For image-to-video models the condition is built from the "image" if given, else the winner's first
frame (both clips of a pair were generated from the same image), as the family's I2V pipeline builds it
(the adapter's `image_condition_frames` / `image_condition_latents`):

    cogvideox   the first frame's latent (1, C, h, w), scaled as the pipeline scales it
                (`common.cogvideox.condition_scale`: 1 / scaling_factor for CogVideoX 1.5)
    wan         mask ++ condition (4 + C, F, h, w): a mask of the first latent frame and the normalised
                latents of the first frame followed by T - 1 black frames
                (`WanImageToVideoPipeline.prepare_latents`); with an image encoder (Wan 2.1 I2V), also
                the CLIP image embeddings (N, D) of the first frame (`WanImageToVideoPipeline.encode_image`)

Memory: the transformer is never loaded. The tokenizer and text encoder encode every distinct prompt
first and are freed; then the VAE (and, for Wan 2.1 I2V, the CLIP image encoder) encodes the clips
(bf16 with tiled encoding on a GPU, as CogVideoX's own fine-tuning scripts do). The peak is reported in summary.json under "encode".
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from common.errors import ConfigError, TooFewFramesError
from common.families import FAMILIES, VideoFamily, read_model_configs
from common.sampling import inspect_video_model
from training.pairs import SUMMARY_NAME, Pair, PairsDatasetError, write_pairs_dataset


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
def posterior_mean(vae, frames: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean of frames (3, T, H, W) in [-1, 1] -> (C, F, h, w) float32 on the CPU.

    The mean, not a sample: caching twice gives the same latents.
    """
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames must be (3, T, H, W), got {tuple(frames.shape)}")
    param = next(vae.parameters())
    mean = vae.encode(frames.unsqueeze(0).to(param.device, param.dtype)).latent_dist.mean  # (1, C, F, h, w)
    return mean[0].float().cpu().contiguous()


def encode_frames(vae, frames: torch.Tensor, family: VideoFamily = FAMILIES["cogvideox"]) -> torch.Tensor:
    """Video latents: frames (3, T, H, W) in [-1, 1] -> the family's stored latents, F = (T - 1) // 4 + 1.

    CogVideoX (F, C, h, w) x scaling_factor; Wan (C, F, h, w) normalised with latents_mean / latents_std.
    """
    return family.encode_latents(posterior_mean(vae, frames), vae.config)


def encode_condition_image(vae, image: torch.Tensor, num_frames: int,
                           family: VideoFamily = FAMILIES["cogvideox"]) -> torch.Tensor:
    """The I2V condition latents of one first frame (3, 1, H, W) in [-1, 1] for `num_frames`-frame videos, as the
    family's I2V pipeline builds them: CogVideoX (1, C, h, w); Wan mask ++ condition (4 + C, F, h, w)."""
    return family.image_condition_latents(posterior_mean(vae, family.image_condition_frames(image, num_frames)),
                                          vae.config)


def to_image(frame: torch.Tensor):
    """One frame (3, 1, H, W) in [-1, 1] -> a PIL image (what an I2V pipeline's image encoder takes)."""
    from PIL import Image

    pixels = ((frame[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def encode_prompts(model_dir: Path, prompts: list[str], max_sequence_length: Optional[int], device: str,
                   dtype: torch.dtype, family: VideoFamily = FAMILIES["cogvideox"]) -> tuple[dict[str, torch.Tensor], int]:
    """(each distinct prompt's text embeddings (L, D), float32 on the CPU, L) with the pipeline's own `encode_prompt`.

    `max_sequence_length` None: the family's (`encode_text_length`). Only the tokenizer and the text
    encoder are loaded (no VAE, no transformer), and freed on return.
    """
    import diffusers

    pipeline_class = getattr(diffusers, family.t2v_pipeline)
    pipe = pipeline_class.from_pretrained(model_dir, transformer=None, vae=None, scheduler=None,
                                          torch_dtype=dtype).to(device)
    if max_sequence_length is None:
        tcfg, _ = read_model_configs(model_dir)
        max_sequence_length = family.encode_text_length(tcfg, pipe)
    out = {}
    for prompt in dict.fromkeys(prompts):
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length, device=device)
        out[prompt] = embeds[0].float().cpu()
    del pipe
    return out, max_sequence_length


def load_vae(model_dir: Path, device: str, dtype: torch.dtype, family: VideoFamily = FAMILIES["cogvideox"]):
    """The pipeline folder's VAE alone, in `dtype` on `device`; tiled encoding on a GPU (bounded memory)."""
    import diffusers

    vae_class = getattr(diffusers, family.vae_class)
    vae = vae_class.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype).to(device).eval()
    if torch.device(device).type == "cuda":
        vae.enable_tiling()
    return vae


class PeakMemory:
    """Peak memory over a block: allocated CUDA memory on a GPU, else the process's peak resident size (MB)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        pass

    @property
    def mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _read_clip(path: Path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The first `num_frames` frames of a video (or one image) as (3, T, height, width) in [-1, 1]."""
    from common.video import IMAGE_SUFFIXES, load_video

    if path.suffix.lower() in IMAGE_SUFFIXES:
        import numpy as np
        from PIL import Image

        frame = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).unsqueeze(0)
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
    dtype: Optional[str] = None,
    on_pair: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Encode every pair listed in `folder/pairs.jsonl` with the VAE and text encoder in `model_dir`; write a pairs dataset.

    `model_dir`: a CogVideoX or Wan pipeline folder. Sizes default to the model's (the family's
    `default_video_size`: 49 x 480 x 720 for CogVideoX-5B, 81 x 768 x 1360 for CogVideoX1.5,
    81 x 480 x 832 for Wan) and the text length to the family's (`encode_text_length`).
    `dtype`: "bfloat16" or "float32"; default bfloat16 on a GPU, float32 on the CPU. Returns the folder.
    """
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

    # 1. Sizes and the latent space, from the configs alone (nothing loaded yet).
    family = FAMILIES[inspect_video_model(model_dir, need=("encode",)).family]
    tcfg, vcfg = read_model_configs(model_dir)
    space = family.latent_space(tcfg, vcfg)
    default_frames, default_height, default_width = family.default_video_size(tcfg)
    num_frames, height, width = num_frames or default_frames, height or default_height, width or default_width
    family.check_video_size(tcfg, num_frames, height, width)
    if dtype is None:
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"dtype must be bfloat16 or float32, not {dtype!r}")
    torch_dtype = getattr(torch, dtype)

    with PeakMemory(device) as peak:
        # 2. Text: the text encoder alone (T5 / UMT5), each prompt once.
        text, max_sequence_length = encode_prompts(model_dir, [e["prompt"] for e in entries], max_sequence_length,
                                                   device, torch_dtype, family)
        gc.collect()
        # 3. Video: the VAE (and the image encoder, if the I2V model takes image embeddings).
        vae = load_vae(model_dir, device, torch_dtype, family)
        image_encoder = family.image_encoder(model_dir, device, torch_dtype) if space["i2v"] else None

        def pairs():
            for n, entry in enumerate(entries):
                winner = _read_clip(folder / entry["winner"], num_frames, height, width)
                loser = _read_clip(folder / entry["loser"], num_frames, height, width)
                image_latents = image_embeds = None
                if space["i2v"]:
                    image = _read_clip(folder / entry["image"], 1, height, width) if "image" in entry else winner[:, :1]
                    image_latents = encode_condition_image(vae, image, num_frames, family)
                    image_embeds = image_encoder(to_image(image)) if image_encoder else None  # (N, D)
                yield Pair(
                    prompt=entry["prompt"],
                    winner_latents=encode_frames(vae, winner, family),
                    loser_latents=encode_frames(vae, loser, family),
                    prompt_embeds=text[entry["prompt"]],
                    image_latents=image_latents,
                    image_embeds=image_embeds,
                    winner_score=float(entry.get("winner_score", float("nan"))),
                    loser_score=float(entry.get("loser_score", float("nan"))),
                    winner_video=str(entry["winner"]),
                    loser_video=str(entry["loser"]),
                )
                if on_pair:
                    on_pair(n + 1, len(entries))

        encoded = {"device": device, "dtype": dtype, "tiling": torch.device(device).type == "cuda",
                   "transformer_loaded": False}
        out = write_pairs_dataset(
            output,
            pairs(),
            model=str(model_dir),
            family=family.name,
            latent_layout=family.latent_layout,
            latent_space=space,
            extra={"frames": num_frames, "height": height, "width": width, "text_length": max_sequence_length,
                   "encoded_with": "vgpa cache",
                   "encode": encoded},
        )
    # The peak is known only now: add it to the summary the writer just wrote.
    summary_path = Path(out) / SUMMARY_NAME
    summary = json.loads(summary_path.read_text())
    summary["encode"]["peak_memory_mb"] = round(peak.mb, 1)
    summary["encode"]["peak_memory_kind"] = "cuda allocated" if peak.cuda else "process resident (RSS)"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return out
