"""Facts about CogVideoX model families that the cache, the trainer and the samplers must agree on.

Read from a diffusers pipeline folder's `transformer/config.json` and `vae/config.json` (numbers only,
no weights), so the driver can check everything before any model is loaded.

Families (diffusers 0.42.1):

    cogvideox-1.0   CogVideoX-2b / -5b / -5b-I2V: patch_size_t None; rotary or learned positions
    cogvideox-1.5   CogVideoX1.5-5B / -5B-I2V: patch_size_t = 2 (latent frames in pairs), rotary
                    positions sliced from a table of sample_height x sample_width patches, the I2V
                    model takes an `ofs` embedding, and its VAE has `invert_scale_latents`

Latent space: latents = VAE posterior x `scaling_factor` (in the transformer's (F, C, h, w) layout).
The image-to-video *condition* latent is x `scaling_factor`, or x 1 / `scaling_factor` when the VAE
config says `invert_scale_latents` (CogVideoX 1.5 I2V: how the model was trained, and what
`CogVideoXImageToVideoPipeline.prepare_latents` does).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from common.errors import ConfigError

FAMILY_1_0 = "cogvideox-1.0"
FAMILY_1_5 = "cogvideox-1.5"
#: VAE compression: 8x8 pixels per latent, 4 frames per latent frame after the first.
VAE_SPATIAL = 8
VAE_TEMPORAL = 4
#: CogVideoX1.5-5B's resolution (height, width) from its model card. Its config's sample size (300 x 300
#: latents = 2400 px) is the size of the rotary-position table, not a resolution to sample at.
RESOLUTION_1_5 = (768, 1360)


def model_family(transformer_config: Mapping) -> str:
    """`cogvideox-1.5` when latent frames are patched in time (patch_size_t), else `cogvideox-1.0`."""
    return FAMILY_1_5 if transformer_config.get("patch_size_t") else FAMILY_1_0


def latent_space(transformer_config: Mapping, vae_config: Mapping) -> dict:
    """What latents encoded for this model mean; pairs record it and the trainer compares it.

    Keys: family, scaling_factor, latent_channels, invert_scale_latents, i2v.
    """
    in_channels, latent_channels = transformer_config["in_channels"], vae_config["latent_channels"]
    if in_channels not in (latent_channels, 2 * latent_channels):
        raise ConfigError(f"transformer in_channels={in_channels} fits neither text-to-video ({latent_channels}) "
                          f"nor image-to-video ({2 * latent_channels}) with a {latent_channels}-channel VAE")
    return {
        "family": model_family(transformer_config),
        "scaling_factor": float(vae_config["scaling_factor"]),
        "latent_channels": int(latent_channels),
        "invert_scale_latents": bool(vae_config.get("invert_scale_latents", False)),
        "i2v": in_channels == 2 * latent_channels,
    }


def latent_space_differences(recorded: Mapping, model: Mapping) -> list[str]:
    """Human-readable differences between two `latent_space` dicts (empty: the same latent space)."""
    out = []
    for key in ("family", "latent_channels", "invert_scale_latents", "i2v"):
        if key in recorded and recorded[key] != model[key]:
            out.append(f"{key} {recorded[key]} (pairs) vs {model[key]} (model)")
    if "scaling_factor" in recorded and not math.isclose(recorded["scaling_factor"], model["scaling_factor"], rel_tol=1e-6):
        out.append(f"scaling_factor {recorded['scaling_factor']} (pairs) vs {model['scaling_factor']} (model)")
    return out


def condition_scale(vae_config: Mapping) -> float:
    """The factor on the I2V condition frame's posterior (see the module docstring)."""
    factor = float(vae_config["scaling_factor"])
    return 1.0 / factor if vae_config.get("invert_scale_latents", False) else factor


def latent_frames(num_frames: int) -> int:
    """Latent frames of a video of `num_frames` = 4k + 1 pixel frames."""
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL:
        raise ConfigError(f"CogVideoX takes 4k + 1 frames (its VAE compresses 4 frames after the first), not {num_frames}")
    return (num_frames - 1) // VAE_TEMPORAL + 1


def padded_latent_frames(frames: int, transformer_config: Mapping) -> int:
    """Latent frames the transformer runs on: CogVideoX 1.5 pads up to a multiple of patch_size_t.

    As `CogVideoXPipeline.__call__` does: it samples the extra frames *in front* and drops them before
    decoding, so the video's own frames are the last `frames` of the padded sequence.
    """
    p_t = transformer_config.get("patch_size_t") or 1
    return frames + (-frames) % p_t


def default_video_size(transformer_config: Mapping) -> tuple[int, int, int]:
    """(frames, height, width) in pixels that a model samples and is trained at by default.

    CogVideoX 1.0: its sample size (49 x 480 x 720 for the 5B). CogVideoX 1.5: 81 frames at 768 x 1360,
    capped at the rotary table's size (tiny test models have a small one).
    """
    frames = int(transformer_config["sample_frames"])
    height = transformer_config["sample_height"] * VAE_SPATIAL
    width = transformer_config["sample_width"] * VAE_SPATIAL
    if model_family(transformer_config) == FAMILY_1_5:
        height, width = min(height, RESOLUTION_1_5[0]), min(width, RESOLUTION_1_5[1])
    return frames, height, width


def check_latent_size(transformer_config: Mapping, frames: int, height: int, width: int) -> None:
    """Refuse latent sizes (F, h, w) this transformer cannot train on correctly, with the reason.

    - h and w must be multiples of the patch size;
    - learned positional embeddings (CogVideoX-5b-I2V) exist only for the sample size;
    - CogVideoX 1.5's rotary table holds sample_height x sample_width latents at most.
    """
    p = transformer_config["patch_size"]
    if height % p or width % p:
        raise ConfigError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
    sample = (transformer_config["sample_height"], transformer_config["sample_width"])
    if transformer_config.get("use_learned_positional_embeddings"):
        sample_frames = latent_frames(transformer_config["sample_frames"])
        if (height, width) != sample or frames != sample_frames:
            raise ConfigError(
                f"this transformer has learned positional embeddings for {sample_frames}x{sample[0]}x{sample[1]} latents "
                f"(F x h x w) only; the pairs hold {frames}x{height}x{width}: encode them at the model's sample size")
    if model_family(transformer_config) == FAMILY_1_5 and (height > sample[0] or width > sample[1]):
        raise ConfigError(f"latent size {height}x{width} exceeds CogVideoX 1.5's rotary table of {sample[0]}x{sample[1]}")


def sample_video(pipe, prompt: str, seed: int, steps: int, frames: int, height: int, width: int,
                 guidance: float = 6.0, image=None, max_sequence_length: Optional[int] = None) -> np.ndarray:
    """One video from a CogVideoX pipeline (T2V, or I2V with `image`) or a WanPipeline: uint8 (T, H, W, 3).

    The noise comes from a CPU generator seeded with `seed`, so a seed gives the same video on any
    device and whatever else is sampled. Text is `max_sequence_length` tokens (default: the
    transformer's `max_text_seq_length`).
    """
    import torch

    kwargs = dict(prompt=prompt, num_inference_steps=steps, num_frames=frames, height=height, width=width,
                  guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np",
                  max_sequence_length=max_sequence_length or pipe.transformer.config.max_text_seq_length)
    if image is not None:
        kwargs["image"] = image
    video = pipe(**kwargs).frames[0]  # (T, H, W, 3) float in [0, 1]
    return (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
