"""The Wan family's adapter (Wan 2.1 / 2.2 through diffusers): rectified flow on normalised latents.

Latent space: the `AutoencoderKLWan` posterior z (B, C, F, h, w) normalised per channel,

    latents = (z - latents_mean) / latents_std        # the VAE config's 16 (Wan 2.2 5B: 48) values

which is what `WanPipeline` undoes before decoding (`latents / (1 / std) + mean`). Latents are kept
in Wan's own layout (C, F, h, w) per sample: channels first, unlike CogVideoX's (F, C, h, w).

Flow-matching Diffusion-DPO input and target, for one sigma s and one noise e per pair (shared by
winner and loser):

    x_t    = (1 - s) x0 + s e                 # FlowMatchEulerDiscreteScheduler.scale_noise
    target = e - x0                           # the velocity; UniPC's flow_prediction: x0 = x_t - s v
    timestep passed to the transformer = s * num_train_timesteps   (how both schedulers set timesteps)

Sigma sampling (the choice, documented in docs/training.md): u ~ U(0, 1), then the scheduler's own
shift, s = shift u / (1 + (shift - 1) u) with shift = `flow_shift` (UniPCMultistepScheduler with
use_flow_sigmas, what Wan's folders ship: 3.0 at 480p, 5.0 at 720p) or `shift`
(FlowMatchEulerDiscreteScheduler). That is the same map the scheduler applies to its inference
sigmas, so training puts its weight where sampling spends its steps. `u` is clamped to
[1/T, 1] as the schedulers' own sigmas are (T = num_train_timesteps).

The text condition is the UMT5 encoder's output (B, L, 4096 in the real model); the transformer
computes its rotary positions itself.

Image-to-video (`WanImageToVideoPipeline`, Wan 2.1 I2V 14B): the transformer takes 36 channels,

    hidden_states = x_t (16) ++ mask (4) ++ condition (16)              on channels, (B, 36, F, h, w)
    condition     = normalise(VAE posterior mean of [first frame, T - 1 black frames])  (C, F, h, w)
    mask          = 1 on the first latent frame (all 4 of the pixel frames it folds), 0 elsewhere

(`WanImageToVideoPipeline.prepare_latents`; mask ++ condition is what pairs store as image latents,
(4 + C, F, h, w)), and, when its config has `image_dim` (Wan 2.1 I2V), the CLIP vision tower's
penultimate hidden state of the first frame as `encoder_hidden_states_image` (B, 257, 1280 in the real
model; `WanImageToVideoPipeline.encode_image`). The condition is the same at every sigma and is not
noised; the errors are measured on the 16 predicted channels, as for text-to-video.

Supported: the single-transformer layouts (Wan 2.1 T2V 1.3B / 14B, Wan 2.1 I2V 14B, Wan 2.2 with one
transformer) for sampling, the cache encoder, mining, `vgpa train` (the DPO step) and LoRA. Wan 2.2's
two-expert folders (transformer + transformer_2 switched at boundary_ratio) and the TI2V layout
(expand_timesteps: one timestep per latent token) are refused with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from common.errors import ConfigError
from common.families import VideoFamily, pair_tensors, read_model_configs


#: (frames, height, width) WanPipeline samples by default (Wan 2.1's 480p setting).
DEFAULT_VIDEO_SIZE = (81, 480, 832)
#: Prompt tokens WanPipeline encodes by default (UMT5).
MAX_SEQUENCE_LENGTH = 512


def latent_stats(vae_config: Mapping, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latents, each (1, C, 1, 1, 1), from `AutoencoderKLWan`'s config."""
    mean = torch.tensor(vae_config["latents_mean"], device=device, dtype=dtype)
    std = torch.tensor(vae_config["latents_std"], device=device, dtype=dtype)
    if mean.shape != std.shape or mean.numel() != vae_config["z_dim"]:
        raise ConfigError(f"the Wan VAE config's latents_mean / latents_std must have z_dim = {vae_config['z_dim']} values")
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


def normalise_latents(z: torch.Tensor, vae_config: Mapping) -> torch.Tensor:
    """VAE posterior z (B, C, F, h, w) -> the transformer's latents (z - mean) / std."""
    mean, std = latent_stats(vae_config, z.device, z.dtype)
    return (z - mean) / std


def denormalise_latents(latents: torch.Tensor, vae_config: Mapping) -> torch.Tensor:
    """The transformer's latents (B, C, F, h, w) -> what `vae.decode` takes (as WanPipeline does)."""
    mean, std = latent_stats(vae_config, latents.device, latents.dtype)
    return latents * std + mean


def flow_shift(scheduler) -> float:
    """The scheduler's sigma shift: UniPC's `flow_shift` (use_flow_sigmas) or FlowMatchEuler's `shift`."""
    config = scheduler.config
    if config.get("use_flow_sigmas"):
        return float(config["flow_shift"])
    if "shift" in config and type(scheduler).__name__.startswith("FlowMatch"):
        return float(config["shift"])
    raise ConfigError(f"{type(scheduler).__name__} is not a flow-matching scheduler (UniPCMultistepScheduler with "
                      "use_flow_sigmas / flow_prediction, or FlowMatchEulerDiscreteScheduler)")


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The schedulers' shift map s = shift u / (1 + (shift - 1) u), elementwise."""
    return shift * u / (1 + (shift - 1) * u)


def draw_sigmas(scheduler, bsz: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(bsz,) sigmas in (0, 1]: u ~ U(1/T, 1), shifted as the scheduler shifts its own sigmas."""
    t_max = scheduler.config.num_train_timesteps
    u = torch.rand((bsz,), generator=generator) * (1 - 1 / t_max) + 1 / t_max
    return shifted_sigmas(u, flow_shift(scheduler))


def first_frame_mask(latent_frames: int, height: int, width: int, temporal: int = 4) -> torch.Tensor:
    """The I2V mask (temporal, F, h, w): 1 on the first latent frame, 0 elsewhere (as `prepare_latents` builds it)."""
    mask = torch.zeros(temporal, latent_frames, height, width)
    mask[:, 0] = 1
    return mask


def check_batch(batch: dict, transformer_config) -> None:
    """Latents (B, C, F, h, w) float in Wan's layout, text (B, L, text_dim) float; for image-to-video also image
    latents (B, 4 + C, F, h, w) (mask ++ condition) and, with `image_dim`, image embeddings (B, N, image_dim)."""
    w, _, text = pair_tensors(batch, "(B, C, F, h, w)")
    cond, embeds = batch.get("image_latents"), batch.get("image_embeds")
    cond_channels = 0
    if cond is not None:
        if cond.dim() != 5 or cond.shape[0] != w.shape[0] or cond.shape[2:] != w.shape[2:]:
            raise ValueError(f"image latents {tuple(cond.shape)} must be (B={w.shape[0]}, 4 + C, "
                             f"{', '.join(map(str, w.shape[2:]))}): the first-frame mask and condition of every frame")
        cond_channels = cond.shape[1]
    if w.shape[1] + cond_channels != transformer_config.in_channels:
        raise ValueError(f"latents have {w.shape[1]} channels (dim 1: Wan's layout is (B, C, F, h, w))"
                         + (f" and image latents {cond_channels}" if cond is not None else "")
                         + f", the transformer expects {transformer_config.in_channels} in all"
                         + (" (image-to-video: latent ++ mask ++ condition)" if cond is None and
                            transformer_config.in_channels > w.shape[1] else ""))
    image_dim = transformer_config.image_dim
    if image_dim is not None and cond is not None:
        if embeds is None or embeds.dim() != 3 or embeds.shape[0] != w.shape[0] or embeds.shape[2] != image_dim:
            shown = None if embeds is None else tuple(embeds.shape)
            raise ValueError(f"image embeddings {shown} must be (B={w.shape[0]}, N, {image_dim}): this transformer "
                             "takes CLIP image embeddings (image_dim)")
    elif embeds is not None:
        raise ValueError("image embeddings given, but this transformer has no image_dim (it takes none)")
    _, p_h, p_w = transformer_config.patch_size
    if w.shape[3] % p_h or w.shape[4] % p_w:
        raise ConfigError(f"latent size {w.shape[3]}x{w.shape[4]} is not a multiple of the patch size {p_h}x{p_w}")
    if text.dim() != 3 or text.shape[0] != w.shape[0] or text.shape[2] != transformer_config.text_dim:
        raise ValueError(f"text embeddings {tuple(text.shape)} must be (B={w.shape[0]}, L, {transformer_config.text_dim})")


class WanFamily(VideoFamily):
    name = "wan"
    pipelines = {"WanPipeline": False, "WanImageToVideoPipeline": True}
    transformer_class = "WanTransformer3DModel"
    latent_layout = "CFhw"
    vae_class = "AutoencoderKLWan"

    def latent_space(self, transformer_config, vae_config) -> dict:
        latent_stats(vae_config)  # the VAE config has one mean and std per channel
        return {
            "family": self.name,
            "latent_channels": int(vae_config["z_dim"]),
            "latents_mean": [float(v) for v in vae_config["latents_mean"]],
            "latents_std": [float(v) for v in vae_config["latents_std"]],
            "i2v": int(transformer_config["in_channels"]) != int(vae_config["z_dim"]),
        }

    def encode_latents(self, posterior_mean, vae_config):
        # (C, F, h, w) stays in Wan's layout; normalised per channel as WanPipeline's latents are.
        return normalise_latents(posterior_mean.unsqueeze(0), vae_config)[0].contiguous()

    def check_video_size(self, transformer_config, frames, height, width) -> None:
        if frames < 1 or (frames - 1) % self.vae_temporal:
            raise ConfigError(f"Wan takes 4k + 1 frames (its VAE compresses 4 frames after the first), not {frames}")
        _, p_h, p_w = transformer_config["patch_size"]
        step_h, step_w = self.vae_spatial * p_h, self.vae_spatial * p_w
        if height % step_h or width % step_w:
            raise ConfigError(f"height and width must be multiples of {step_h}x{step_w} (VAE {self.vae_spatial} x patch "
                              f"{p_h}x{p_w}) for this Wan model, not {height}x{width}")

    def image_condition_frames(self, image, num_frames):
        # WanImageToVideoPipeline.prepare_latents: the first frame, then num_frames - 1 black frames ([-1, 1]: 0).
        return torch.cat([image, image.new_zeros((image.shape[0], num_frames - 1, *image.shape[2:]))], dim=1)

    def image_condition_latents(self, posterior_mean, vae_config):
        # mask (4, F, h, w) ++ the normalised condition (C, F, h, w), as prepare_latents returns them.
        _, frames, height, width = posterior_mean.shape
        mask = first_frame_mask(frames, height, width, self.vae_temporal).to(posterior_mean.dtype)
        return torch.cat([mask, self.encode_latents(posterior_mean, vae_config)]).contiguous()

    def image_latents_shape(self, latent_shape):
        channels, *rest = latent_shape
        return (self.vae_temporal + channels, *rest)

    def image_encoder(self, model_dir, device, dtype):
        """`WanImageToVideoPipeline.encode_image` (CLIP's penultimate hidden state), if the transformer has image_dim."""
        transformer_config, _ = read_model_configs(model_dir)
        if transformer_config.get("image_dim") is None:
            return None
        from diffusers import WanImageToVideoPipeline

        pipe = WanImageToVideoPipeline.from_pretrained(model_dir, transformer=None, vae=None, text_encoder=None,
                                                       tokenizer=None, scheduler=None, dtype=dtype).to(device)

        def encode(image):
            return pipe.encode_image(image, device)[0].float().cpu()  # (N, D)

        return encode

    def check_training_folder(self, model_dir, transformer_config, latent_shape, text_dim, i2v,
                              image_embeds_shape=None) -> None:
        self.load_scheduler(model_dir)  # a flow-matching scheduler, or the reason it is not one
        channels, _, height, width = latent_shape
        in_channels = transformer_config["in_channels"]
        expected = in_channels - (self.vae_temporal + channels) if i2v else in_channels
        if channels != expected:
            kind = "image-to-video" if i2v else "text-to-video"
            hint = ""
            if i2v and in_channels == channels:
                hint = " (it is a text-to-video model)"
            elif not i2v and in_channels == 2 * channels + self.vae_temporal:
                hint = " (it is an image-to-video model: the pairs need image latents, encoded with this model)"
            raise ConfigError(f"the pairs hold {kind} latents with {channels} channels (Wan's layout is (C, F, h, w)), "
                              f"but the transformer in {model_dir} has in_channels={in_channels}{hint}")
        if text_dim != transformer_config["text_dim"]:
            raise ConfigError(f"the pairs' text embeddings are {text_dim}-dimensional, the transformer expects "
                              f"{transformer_config['text_dim']}")
        image_dim = transformer_config.get("image_dim")
        if i2v and image_dim is not None and (image_embeds_shape is None or image_embeds_shape[-1] != image_dim):
            have = "none" if image_embeds_shape is None else f"{image_embeds_shape[-1]}-dimensional ones"
            raise ConfigError(f"the transformer in {model_dir} takes {image_dim}-dimensional CLIP image embeddings "
                              f"(image_dim), the pairs hold {have}: encode them with this model's folder")
        if image_embeds_shape is not None and image_dim is None:
            raise ConfigError(f"the pairs hold CLIP image embeddings, but the transformer in {model_dir} has no "
                              "image_dim (it takes none)")
        _, p_h, p_w = transformer_config["patch_size"]
        if height % p_h or width % p_w:
            raise ConfigError(f"latent size {height}x{width} is not a multiple of the patch size {p_h}x{p_w}")

    def load_scheduler(self, model_dir):
        """The folder's own scheduler class (Wan ships UniPC with flow sigmas), checked to be flow matching."""
        import json
        from pathlib import Path

        import diffusers

        config = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if cls is None:
            raise ConfigError(f"the scheduler in {model_dir} ({config.get('_class_name')}) is not a diffusers scheduler")
        scheduler = cls.from_pretrained(model_dir, subfolder="scheduler")
        flow_shift(scheduler)  # ConfigError when it is not a flow-matching scheduler
        return scheduler

    def default_video_size(self, transformer_config):
        return DEFAULT_VIDEO_SIZE  # Wan's configs carry no sample size

    def max_sequence_length(self, pipe) -> int:
        tok_max = getattr(pipe.tokenizer, "model_max_length", MAX_SEQUENCE_LENGTH) or MAX_SEQUENCE_LENGTH
        return min(int(tok_max), MAX_SEQUENCE_LENGTH)

    def decode(self, pipe, latents):
        z = denormalise_latents(latents.to(pipe.vae.dtype), pipe.vae.config)
        return pipe.vae.decode(z, return_dict=False)[0]

    def check_folder(self, folder, index: Mapping) -> None:
        second = index.get("transformer_2")
        if (isinstance(second, list) and second and second[0] is not None) or index.get("boundary_ratio") is not None:
            raise ConfigError(
                f"{folder} is a Wan 2.2 two-expert pipeline (transformer + transformer_2, switched at boundary_ratio): "
                "not supported; videogpa takes single-transformer Wan folders (Wan 2.1 T2V 1.3B / 14B, or one "
                "expert saved as its own WanPipeline folder)")
        if index.get("expand_timesteps"):
            raise ConfigError(f"{folder} is a Wan 2.2 TI2V pipeline (expand_timesteps: one timestep per latent token): "
                              "not supported; videogpa takes single-transformer Wan folders (WanPipeline, or "
                              "WanImageToVideoPipeline as Wan 2.1 I2V is laid out)")
        if not all((Path(folder) / part / "config.json").is_file() for part in ("transformer", "vae")):
            return  # the parts check names what is missing
        transformer, vae = read_model_configs(folder)
        i2v = index.get("_class_name") == "WanImageToVideoPipeline"
        channels = 2 * vae["z_dim"] + self.vae_temporal if i2v else vae["z_dim"]  # I2V: latent ++ mask ++ condition
        if transformer["in_channels"] != channels:
            raise ConfigError(f"{folder} holds a {index.get('_class_name')} whose transformer has in_channels="
                              f"{transformer['in_channels']}; with this VAE (z_dim {vae['z_dim']}) it needs {channels}"
                              + (" (latent ++ first-frame mask ++ condition)" if i2v else ""))
        if i2v and transformer.get("image_dim") is not None:
            for part in ("image_encoder", "image_processor"):  # what encode_image needs
                if not (Path(folder) / part).is_dir():
                    raise ConfigError(f"{folder} is not a complete wan pipeline folder: {part}/ is missing (its "
                                      "transformer takes CLIP image embeddings: image_dim is set)")

    def training_inputs(self, model, scheduler, batch, generator=None, timesteps=None, noise=None,
                        compute_dtype=torch.float32):
        """As `VideoFamily.training_inputs`; `timesteps` here are sigmas in (0, 1] (B,), drawn by `draw_sigmas`."""
        check_batch(batch, model.config)
        device = next(p for p in model.parameters()).device
        bsz = batch["winner_latents"].shape[0]

        # 1. One sigma and one noise per pair, shared by winner and loser.
        sigmas = draw_sigmas(scheduler, bsz, generator) if timesteps is None else timesteps.float()
        if noise is None:
            noise = torch.randn(batch["winner_latents"].shape, generator=generator)
        x0 = torch.cat([batch["winner_latents"], batch["loser_latents"]]).to(device, torch.float32)  # (2B, C, F, h, w)
        s = torch.cat([sigmas, sigmas]).to(device, torch.float32)
        e = torch.cat([noise, noise]).to(device, torch.float32)

        # 2. Rectified flow: the straight path from data (s = 0) to noise (s = 1), and its velocity.
        s5 = s.view(-1, 1, 1, 1, 1)
        x_t = (1 - s5) * x0 + s5 * e
        target = e - x0

        # 3. Condition: text (the transformer adds its own rotary positions); image-to-video: mask ++ condition
        #    latent on channels and the CLIP image embeddings, as WanImageToVideoPipeline passes them.
        text = torch.cat([batch["prompt_embeds"], batch["prompt_embeds"]]).to(device, compute_dtype)
        model_input = x_t
        if batch.get("image_latents") is not None:
            cond = batch["image_latents"].to(device, torch.float32)
            model_input = torch.cat([x_t, torch.cat([cond, cond])], dim=1)  # (2B, C + 4 + C, F, h, w)
        image = batch.get("image_embeds")
        if image is not None:
            image = torch.cat([image, image]).to(device, compute_dtype)
        kwargs = dict(hidden_states=model_input.to(compute_dtype), timestep=s * scheduler.config.num_train_timesteps,
                      encoder_hidden_states=text, encoder_hidden_states_image=image, return_dict=False)
        return kwargs, target, slice(None)
