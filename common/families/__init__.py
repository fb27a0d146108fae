"""Video-model families: what differs between CogVideoX and Wan, one small adapter per family.

    family = family_of_pipeline("WanPipeline")        # from model_index.json's _class_name
    family = family_of_transformer(model)             # from a loaded transformer (the DPO step)

An adapter (`VideoFamily`) holds what the sampler, the cache encoder and the trainer must agree on
for its family: the pipeline classes (and which is image-to-video), the folder's parts, the latent
normalisation and layout, how a training input is noised and what the regression target is
(`training_inputs`), and which parts of videogpa already take it (`uses`). Everything else (the
preference loss, the reference = adapters off, LoRA) is shared.

Families (diffusers 0.42.1):

    cogvideox  CogVideoXPipeline, CogVideoXImageToVideoPipeline: latents (F, C, h, w) x the VAE's
               scaling_factor; v-prediction (DDIM/DPM schedulers); T5 text; rotary or learned positions
    wan        WanPipeline, WanImageToVideoPipeline (Wan 2.1 / 2.2 single transformer): latents
               (C, F, h, w) normalised per channel with the VAE's latents_mean / latents_std; rectified
               flow (x_t = (1 - s) x0 + s e, target e - x0); UMT5 text; rotary positions inside the
               model; I2V: a masked first-frame video latent on channels plus CLIP image embeddings

Adding a family is one module here (an adapter and its entry in `FAMILIES`) plus its tiny test config
under `training/fixtures/`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional

from common.errors import ConfigError

#: What a family can be used for. `sample` the sampler engine, `encode` the cache encoder,
#: `mine` the mining job, `train` the `vgpa train` driver, `dpo` the Diffusion-DPO step
#: (training.dpo.dpo_step) and `lora` the LoRA export/load round trip.
USES = ("sample", "encode", "mine", "train", "dpo", "lora")
#: What the whole pipeline needs (the default of `common.sampling.inspect_video_model`).
FULL_STACK = ("sample", "encode", "mine", "train")


class VideoFamily:
    """One family's adapter. Subclasses set the class attributes and implement `training_inputs`."""

    #: Short name, e.g. "cogvideox".
    name: str = ""
    #: diffusers pipeline class name -> image-to-video?
    pipelines: Mapping[str, bool] = {}
    #: diffusers transformer class name (what `family_of_transformer` recognises).
    transformer_class: str = ""
    #: The sub-folders a complete pipeline folder has.
    parts: tuple[str, ...] = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    #: The latent layout one sample's latents are stored and trained in.
    latent_layout: str = "FChw"
    #: diffusers VAE class name (what `vgpa cache` and the pair writer load alone).
    vae_class: str = ""
    #: VAE compression: pixels per latent (spatial), frames per latent frame after the first (temporal).
    vae_spatial: int = 8
    vae_temporal: int = 4

    @property
    def t2v_pipeline(self) -> str:
        """The family's text-to-video pipeline class name (what encodes prompts)."""
        return next(name for name, i2v in self.pipelines.items() if not i2v)

    def uses(self, pipeline: str) -> frozenset[str]:
        """What videogpa can do with a folder holding `pipeline` (a subset of `USES`)."""
        return frozenset(USES)

    def check_folder(self, folder, index: Mapping) -> None:
        """Family-specific checks of a pipeline folder (model_index.json as `index`); ConfigError if refused."""

    # ---- sampling (common.sampling.Sampler) ----
    def default_video_size(self, transformer_config: Mapping) -> tuple[int, int, int]:
        """(frames, height, width) in pixels sampled when a request gives none."""
        raise NotImplementedError

    def max_sequence_length(self, pipe) -> int:
        """Prompt tokens when the sampler's config gives none."""
        raise NotImplementedError

    def video_latents(self, latents, frames: int):
        """The pipeline's `output_type="latent"` result (1, ...) -> the video's own latents (1, ...)."""
        return latents

    def decode(self, pipe, latents):
        """The video's latents (1, ...) in the transformer's space -> pixels (1, 3, T, H, W) in [-1, 1]."""
        raise NotImplementedError

    # ---- the latent space (vgpa cache, the pair writer, the trainer's checks) ----
    def latent_space(self, transformer_config: Mapping, vae_config: Mapping) -> dict:
        """What latents encoded for this model mean: pairs record it, the trainer compares it.

        Always has "family" (this family's name, or "<name>-<version>") and "i2v"."""
        raise NotImplementedError

    def encode_latents(self, posterior_mean, vae_config: Mapping):
        """One clip's VAE posterior mean (C, F, h, w) -> the latents stored in pairs, in `latent_layout`."""
        raise NotImplementedError

    def encode_text_length(self, transformer_config: Mapping, pipe) -> int:
        """Prompt tokens `vgpa cache` encodes (the pipeline `pipe` holds the tokenizer)."""
        return self.max_sequence_length(pipe)

    def check_video_size(self, transformer_config: Mapping, frames: int, height: int, width: int) -> None:
        """ConfigError unless (frames, height, width) pixels can be encoded for and trained on by this model."""
        raise NotImplementedError

    def video_size_of_latents(self, latent_shape) -> tuple[int, int, int]:
        """One sample's latent shape (in `latent_layout`) -> its (frames, height, width) in pixels."""
        sizes = dict(zip(self.latent_layout.replace("hw", "HW"), latent_shape))
        return ((sizes["F"] - 1) * self.vae_temporal + 1, sizes["H"] * self.vae_spatial, sizes["W"] * self.vae_spatial)

    # ---- the image-to-video condition (vgpa cache, the pair writer, the trainer's checks) ----
    def image_condition_frames(self, image, num_frames: int):
        """The first frame (3, 1, H, W) in [-1, 1] -> the pixels (3, T', H, W) the VAE encodes for the I2V condition."""
        raise NotImplementedError

    def image_condition_latents(self, posterior_mean, vae_config: Mapping):
        """The VAE posterior mean (C, F', h, w) of `image_condition_frames` -> the image latents stored in pairs."""
        raise NotImplementedError

    def image_latents_shape(self, latent_shape) -> tuple[int, ...]:
        """The stored image latents' shape for pairs of `latent_shape` (in `latent_layout`)."""
        raise NotImplementedError

    def image_encoder(self, model_dir, device, dtype):
        """None when the folder's I2V takes no image embedding; else a function first frame (PIL) -> (N, D) fp32 CPU."""
        return None

    # ---- training (training.trainer) ----
    def check_training_folder(self, model_dir: Path, transformer_config: Mapping, latent_shape, text_dim: int,
                              i2v: bool, image_embeds_shape=None) -> None:
        """ConfigError unless this model can train on pairs of `latent_shape` / `text_dim` (scheduler included) and,
        for image-to-video, image embeddings of `image_embeds_shape` (N, D) (None: the pairs have none)."""
        raise NotImplementedError

    def load_transformer(self, model_dir, dtype):
        """The folder's transformer (frozen weights, to receive LoRA) in `dtype`."""
        import diffusers

        return getattr(diffusers, self.transformer_class).from_pretrained(model_dir, subfolder="transformer", torch_dtype=dtype)

    def load_scheduler(self, model_dir):
        """The noise scheduler the DPO step draws timesteps with."""
        raise NotImplementedError

    # ---- training (training.dpo.dpo_step) ----
    def training_inputs(self, model, scheduler, batch: dict, generator=None, timesteps=None, noise=None,
                        compute_dtype=None) -> tuple[dict, "object", slice]:
        """(transformer kwargs for [winners; losers], regression target (2B, ...) fp32, the slice of the
        latent-frame axis (dim 1) the errors are measured on) for one Diffusion-DPO step."""
        raise NotImplementedError


def pair_tensors(batch: dict, layout: str):
    """(winner, loser, text) of a DPO batch after the checks every family shares: winner and loser
    latents of one 5-D shape (`layout`, e.g. "(B, F, C, h, w)"), all floating point."""
    w, l, text = batch["winner_latents"], batch["loser_latents"], batch["prompt_embeds"]
    if w.shape != l.shape or w.dim() != 5:
        raise ValueError(f"winner {tuple(w.shape)} and loser {tuple(l.shape)} latents must both be {layout}")
    if not (w.is_floating_point() and l.is_floating_point() and text.is_floating_point()):
        raise ValueError("latents and text embeddings must be floating point")
    return w, l, text


def read_model_configs(model_dir: str | Path) -> tuple[dict, dict]:
    """(transformer config, VAE config) of a diffusers pipeline folder, as dicts (numbers only, no weights)."""
    model_dir = Path(model_dir)
    configs = []
    for component in ("transformer", "vae"):
        path = model_dir / component / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model_dir} is not a diffusers video pipeline folder: {component}/config.json is missing")
        configs.append(json.loads(path.read_text()))
    return configs[0], configs[1]


def family_of_latent_space(space: Optional[Mapping]) -> Optional[str]:
    """The family name a recorded `latent_space` belongs to ("cogvideox-1.5" -> "cogvideox"); None when unknown."""
    if not space or not space.get("family"):
        return None
    return str(space["family"]).split("-")[0]


def latent_space_differences(recorded: Mapping, model: Mapping) -> list[str]:
    """Human-readable differences between two `latent_space` dicts (empty: the same latent space).

    Keys both dicts have are compared: numbers (and lists of numbers) to a relative 1e-6, the rest exactly.
    """
    def same(a, b) -> bool:
        if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
            return a == b
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return math.isclose(a, b, rel_tol=1e-6)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    out = []
    for key in recorded:
        if key in model and not same(recorded[key], model[key]):
            shown = [v if not isinstance(v, (list, tuple)) else f"[{len(v)} values]" for v in (recorded[key], model[key])]
            out.append(f"{key} {shown[0]} (pairs) vs {shown[1]} (model)")
    return out


def _families() -> dict[str, VideoFamily]:
    from common.families.cogvideox import CogVideoXFamily
    from common.families.wan import WanFamily

    return {f.name: f for f in (CogVideoXFamily(), WanFamily())}


FAMILIES: dict[str, VideoFamily] = _families()


def supported_pipelines() -> str:
    """'cogvideox (CogVideoXPipeline, CogVideoXImageToVideoPipeline), wan (WanPipeline, ...)' for messages."""
    return "; ".join(f"{f.name} ({', '.join(f.pipelines)})" for f in FAMILIES.values())


def family_of_pipeline(pipeline: Optional[str]) -> Optional[VideoFamily]:
    """The family whose pipelines include `pipeline` (model_index.json's `_class_name`), or None."""
    return next((f for f in FAMILIES.values() if pipeline in f.pipelines), None)


def family_of_transformer(model) -> VideoFamily:
    """The family of a loaded transformer (peft-wrapped or not), by its class; ConfigError when unknown."""
    names = {type(model).__name__, *(c.__name__ for c in type(model).__mro__)}
    for family in FAMILIES.values():
        if family.transformer_class in names:
            return family
    raise ConfigError(f"{type(model).__name__} is not a transformer of a supported family: "
                      + ", ".join(f"{f.name} ({f.transformer_class})" for f in FAMILIES.values()))


__all__ = ["FAMILIES", "FULL_STACK", "USES", "VideoFamily", "family_of_latent_space", "family_of_pipeline",
           "family_of_transformer", "latent_space_differences", "pair_tensors", "read_model_configs", "supported_pipelines"]
