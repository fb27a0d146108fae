"""The CogVideoX family's adapter: v-prediction on VAE-scaled latents (F, C, h, w).

The facts about CogVideoX folders (1.0 / 1.5, sizes, latent space) are in `common.cogvideox`;
this module holds what the Diffusion-DPO step needs from the family:

    x_t    = scheduler.add_noise(x0, e, t)          t ~ U{0..T-1}, e ~ N(0, 1)
    target = scheduler.get_velocity(x0, e, t)       the v-prediction target (CogVideoX DDIM/DPM)

the text condition, CogVideoX's 3D rotary embeddings (passed in, not computed by the model), the I2V
first-frame latent on channels, and CogVideoX 1.5's front padding of latent frames (see training.dpo).
"""

from __future__ import annotations

from typing import Optional

import torch

import json
from pathlib import Path

from common.cogvideox import (VAE_SPATIAL, check_latent_size, condition_scale, default_video_size, latent_frames,
                              latent_space, padded_latent_frames)
from common.errors import ConfigError
from common.families import VideoFamily, pair_tensors


def rotary_embeddings(
    transformer_config, latent_frames: int, latent_height: int, latent_width: int, device=None
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """CogVideoX's 3D rotary embeddings (cos, sin), each (F*h*w/p^2, head_dim); None when unused.

    The same computation as `CogVideoXPipeline._prepare_rotary_positional_embeddings`, written
    from latent sizes (the pipeline starts from pixels and divides by the VAE factor).
    """
    if not transformer_config.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = transformer_config.patch_size
    p_t = transformer_config.patch_size_t
    grid_h, grid_w = latent_height // p, latent_width // p
    base_w, base_h = transformer_config.sample_width // p, transformer_config.sample_height // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=transformer_config.attention_head_dim,
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=latent_frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(  # CogVideoX 1.5
        embed_dim=transformer_config.attention_head_dim,
        crops_coords=None,
        grid_size=(grid_h, grid_w),
        temporal_size=(latent_frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=device,
    )


def pad_latent_frames(latents: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, F, C, h, w) -> (B, frames, C, h, w): the first latent frame repeated in front (CogVideoX 1.5)."""
    pad = frames - latents.shape[1]
    if pad < 0:
        raise ValueError(f"cannot pad {latents.shape[1]} latent frames to {frames}")
    return torch.cat([latents[:, :1].expand(-1, pad, -1, -1, -1), latents], dim=1) if pad else latents


def i2v_condition(image_latents: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """First-frame latent (B, 1, C, h, w) -> (B, F, C, h, w): zero-padded on frames, as the I2V pipeline does.

    `latent_frames` is the count the transformer runs on (padded for CogVideoX 1.5), as the pipeline's
    `prepare_latents` receives it from `__call__`.
    """
    if image_latents.dim() != 5 or image_latents.shape[1] != 1:
        raise ValueError(f"image latents must be (B, 1, C, h, w), got {tuple(image_latents.shape)}")
    pad = image_latents.new_zeros((image_latents.shape[0], latent_frames - 1, *image_latents.shape[2:]))
    return torch.cat([image_latents, pad], dim=1)


def check_batch(batch: dict, transformer_config) -> None:
    """Assert shapes and dtypes at the boundary. Latents (B, F, C, h, w) float, text (B, L, D) float."""
    w, _, text = pair_tensors(batch, "(B, F, C, h, w)")
    i2v = "image_latents" in batch and batch["image_latents"] is not None
    channels = transformer_config.in_channels // 2 if i2v else transformer_config.in_channels
    if w.shape[2] != channels:
        raise ValueError(
            f"latents have {w.shape[2]} channels, the transformer expects {channels}"
            + (" (image-to-video: half of in_channels)" if i2v else "")
        )
    check_latent_size(transformer_config, w.shape[1], w.shape[3], w.shape[4])
    if text.dim() != 3 or text.shape[0] != w.shape[0] or text.shape[2] != transformer_config.text_embed_dim:
        raise ValueError(
            f"text embeddings {tuple(text.shape)} must be (B={w.shape[0]}, L, {transformer_config.text_embed_dim})"
        )


def check_channels(transformer_config, channels: int, i2v: bool, model_dir) -> None:
    """The pairs' latent channels against the transformer's in_channels (I2V: noisy latent ++ condition on C)."""
    in_channels = transformer_config["in_channels"]
    expected = in_channels // 2 if i2v else in_channels
    if channels != expected:
        kind = "image-to-video" if i2v else "text-to-video"
        hint = ""
        if i2v and in_channels == channels:
            hint = " (it is a text-to-video model)"
        elif not i2v and in_channels == 2 * channels:
            hint = " (it is an image-to-video model: the pairs need image latents)"
        raise ConfigError(
            f"the pairs hold {kind} latents with {channels} channels, but the transformer in {model_dir} "
            f"has in_channels={in_channels} and expects {expected}-channel latents{hint}"
        )


class CogVideoXFamily(VideoFamily):
    name = "cogvideox"
    pipelines = {"CogVideoXPipeline": False, "CogVideoXImageToVideoPipeline": True}
    transformer_class = "CogVideoXTransformer3DModel"
    latent_layout = "FChw"
    vae_class = "AutoencoderKLCogVideoX"

    def latent_space(self, transformer_config, vae_config) -> dict:
        return latent_space(transformer_config, vae_config)  # family "cogvideox-1.0" / "cogvideox-1.5"

    def encode_latents(self, posterior_mean, vae_config):
        # (C, F, h, w) -> the transformer's (F, C, h, w), x scaling_factor (as CogVideoX's pipelines scale).
        return posterior_mean.permute(1, 0, 2, 3).contiguous() * vae_config["scaling_factor"]

    def encode_text_length(self, transformer_config, pipe) -> int:
        return int(transformer_config["max_text_seq_length"])

    def check_video_size(self, transformer_config, frames, height, width) -> None:
        if height % VAE_SPATIAL or width % VAE_SPATIAL:
            raise ConfigError(f"height and width must be multiples of {VAE_SPATIAL}, not {height}x{width}")
        check_latent_size(transformer_config, latent_frames(frames), height // VAE_SPATIAL, width // VAE_SPATIAL)

    def image_condition_frames(self, image, num_frames):
        return image  # CogVideoXImageToVideoPipeline encodes the first frame alone

    def image_condition_latents(self, posterior_mean, vae_config):
        # (C, 1, h, w) -> (1, C, h, w), scaled as the I2V pipeline scales its condition (common.cogvideox).
        return posterior_mean.permute(1, 0, 2, 3).contiguous() * condition_scale(vae_config)

    def image_latents_shape(self, latent_shape):
        return (1, *latent_shape[1:])  # one latent frame, zero-padded to F in the trainer (i2v_condition)

    def check_training_folder(self, model_dir, transformer_config, latent_shape, text_dim, i2v,
                              image_embeds_shape=None) -> None:
        scheduler_config = Path(model_dir) / "scheduler" / "scheduler_config.json"
        if scheduler_config.is_file():
            prediction = json.loads(scheduler_config.read_text()).get("prediction_type", "epsilon")
            if prediction != "v_prediction":
                raise ConfigError(f"the scheduler in {model_dir} predicts {prediction!r}; this trainer needs v_prediction")
        frames, channels, height, width = latent_shape
        check_channels(transformer_config, channels, i2v, model_dir)
        if text_dim != transformer_config["text_embed_dim"]:
            raise ConfigError(f"the pairs' text embeddings are {text_dim}-dimensional, the transformer expects "
                              f"{transformer_config['text_embed_dim']}")
        check_latent_size(transformer_config, frames, height, width)

    def load_scheduler(self, model_dir):
        from diffusers import CogVideoXDPMScheduler

        return CogVideoXDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")

    def default_video_size(self, transformer_config):
        return default_video_size(transformer_config)

    def max_sequence_length(self, pipe) -> int:
        tok_max = getattr(pipe.tokenizer, "model_max_length", 226) or 226
        return min(int(tok_max), 226)

    def video_latents(self, latents, frames: int):
        # CogVideoX 1.5 pads F' to a multiple of patch_size_t *in front* and, with
        # output_type="latent", returns the padding too: keep the video's own F frames.
        return latents[:, latents.shape[1] - latent_frames(frames):]

    def decode(self, pipe, latents):
        return pipe.decode_latents(latents)

    def training_inputs(self, model, scheduler, batch, generator=None, timesteps=None, noise=None,
                        compute_dtype=torch.float32):
        config = model.config
        check_batch(batch, config)
        device = next(p for p in model.parameters()).device
        bsz, video_frames, _, height, width = batch["winner_latents"].shape
        frames = padded_latent_frames(video_frames, config)  # what the transformer runs on
        x0_w, x0_l = (pad_latent_frames(batch[k], frames) for k in ("winner_latents", "loser_latents"))

        # 1. One timestep and one noise per pair, shared by winner and loser.
        if timesteps is None:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator)
        if noise is None:
            noise = torch.randn(x0_w.shape, generator=generator)
        x0 = torch.cat([x0_w, x0_l]).to(device, torch.float32)  # (2B, F, C, h, w): [winners; losers]
        t = torch.cat([timesteps, timesteps]).to(device)
        e = torch.cat([noise, noise]).to(device, torch.float32)

        # 2. Noisy input and v-prediction target (fp32: the scheduler's alphas are fp32).
        x_t = scheduler.add_noise(x0, e, t)
        target = scheduler.get_velocity(x0, e, t)

        # 3. Condition: text, rotary embeddings, and the first-frame latent on channels for I2V.
        text = torch.cat([batch["prompt_embeds"], batch["prompt_embeds"]]).to(device, compute_dtype)
        model_input = x_t
        if batch.get("image_latents") is not None:
            cond = i2v_condition(batch["image_latents"].to(device, torch.float32), frames)
            model_input = torch.cat([x_t, torch.cat([cond, cond])], dim=2)
        rotary = rotary_embeddings(config, frames, height, width, device=device)
        kwargs = dict(
            hidden_states=model_input.to(compute_dtype),
            encoder_hidden_states=text,
            timestep=t,
            image_rotary_emb=rotary,
            return_dict=False,
        )
        if getattr(config, "ofs_embed_dim", None):
            kwargs["ofs"] = model_input.new_full((1,), 2.0)  # as the CogVideoX 1.5 I2V pipeline does
        # Errors on the video's own frames (the last `video_frames`; CogVideoX 1.5's padding is in front).
        return kwargs, target, slice(frames - video_frames, None)
