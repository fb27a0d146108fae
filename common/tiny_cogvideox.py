"""Tiny, randomly initialised CogVideoX built from configs with the real diffusers/transformers classes.

No model hub is reachable here, so tests, benchmarks and demos build every component from a
config and save/load it through the same `save_pretrained` / `from_pretrained` paths that users
take with the real weights. Everything runs on a CPU in milliseconds.

Sizes (pixel space -> latent space, VAE factors 8 spatial and 4 temporal):

    video  [B, C=3, T=9,  H=32, W=32]  frames in [-1, 1]
    latent [B, F=3, C=4,  h=4,  w=4]   the transformer's layout, times `vae.config.scaling_factor`
    text   [B, L=16, D=32]             T5 encoder output (L = `TEXT_SEQ_LEN` tokens)

The transformer uses rotary position embeddings (as CogVideoX-5B does), so callers must pass
`image_rotary_emb`; image-to-video doubles `in_channels` (noisy latent ++ first-frame latent on C).

`version="1.5"` builds the CogVideoX1.5 shape at the same sizes: latent frames patched in pairs
(`patch_size_t=2`, so 3 latent frames run as 4), rotary positions sliced from a 4 x 4 table, no
patch bias, an `ofs` embedding for image-to-video, and a VAE with scaling factor 0.7 and
`invert_scale_latents` (the I2V condition latent is divided by the factor).

Example:
    >>> from diffusers import CogVideoXPipeline
    >>> path = save_tiny_cogvideox("/tmp/tiny-t2v")
    >>> pipe = CogVideoXPipeline.from_pretrained(path)
    >>> pipe("a red cube", num_inference_steps=2, output_type="pt").frames.shape
    torch.Size([1, 9, 3, 32, 32])
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

#: Tokens per prompt: the pipelines' `max_sequence_length` must be set to this.
TEXT_SEQ_LEN = 16
#: Width of the T5 encoder output = the transformer's `text_embed_dim`.
TEXT_EMBED_DIM = 32
#: Latent channels (the real model has 16).
LATENT_CHANNELS = 4
#: Pixel frames / height / width of one sample (the real model: 49 x 480 x 720).
NUM_FRAMES = 9
HEIGHT = 32
WIDTH = 32
#: Latent frames / height / width: (9 - 1) // 4 + 1 = 3, 32 // 8 = 4.
LATENT_FRAMES = (NUM_FRAMES - 1) // 4 + 1
LATENT_HEIGHT = HEIGHT // 8
LATENT_WIDTH = WIDTH // 8

_WORDS = (
    "a an the of in on with and to at video camera moving around orbit slowly fast red green blue "
    "white black cube sphere room kitchen street car tree house table chair dog cat person walking "
    "scene view forward left right up down"
).split()


VERSIONS = ("1.0", "1.5")


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")


def tiny_transformer(i2v: bool = False, rotary: bool = True, seed: int = 0, version: str = "1.0"):
    """A one-layer `CogVideoXTransformer3DModel`: 2 heads x 16 dims, patch 2.

    Input `hidden_states` [B, 3, C, 4, 4] with C = 4 (text-to-video) or 8 (image-to-video:
    noisy latent and first-frame latent concatenated on channels); output [B, 3, 4, 4, 4].
    `attention_head_dim` is 16 because rotary embeddings need a multiple of 16.
    Version "1.5" takes [B, 4, C, 4, 4] (latent frames padded to a multiple of patch_size_t = 2).
    """
    from diffusers import CogVideoXTransformer3DModel

    _check_version(version)
    torch.manual_seed(seed)
    # CogVideoX1.5: latent frames patched in pairs, rotary positions sliced from the sample-size table.
    v15 = dict(patch_size_t=2, patch_bias=False, ofs_embed_dim=4 if i2v else None,
               use_learned_positional_embeddings=False) if version == "1.5" else {}
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=2 * LATENT_CHANNELS if i2v else LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        time_embed_dim=4,
        text_embed_dim=TEXT_EMBED_DIM,
        num_layers=1,
        sample_width=LATENT_WIDTH,
        sample_height=LATENT_HEIGHT,
        sample_frames=NUM_FRAMES,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_SEQ_LEN,
        use_rotary_positional_embeddings=rotary or version == "1.5",
        **v15,
    )


def tiny_vae(seed: int = 0, version: str = "1.0"):
    """An `AutoencoderKLCogVideoX` with 8 channels per block: [B, 3, 9, 32, 32] <-> [B, 4, 3, 4, 4].

    Scaling factor: diffusers' default 1.15258426 (CogVideoX-2b's); version "1.5": 0.7 with
    `invert_scale_latents` (CogVideoX1.5's VAE config).
    """
    from diffusers import AutoencoderKLCogVideoX

    _check_version(version)
    torch.manual_seed(seed)
    extra = {"scaling_factor": 0.7, "invert_scale_latents": True} if version == "1.5" else {}
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=HEIGHT,
        sample_width=WIDTH,
        **extra,
    )


def tiny_tokenizer():
    """A `T5Tokenizer` (unigram) built offline from a small vocabulary.

    Ids: 0 <pad>, 1 </s>, 2 <unk>, then single characters and a few whole words, so any
    ASCII prompt tokenizes (unknown characters map to <unk>).
    """
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += [f"\u2581{w}" for w in _WORDS]
    pieces += list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    # Unigram scores: longer pieces more likely, so whole words win over spelling them out.
    vocab = [(p, 0.0) for p in pieces[:3]] + [(p, -10.0 + len(p)) for p in pieces[3:]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TEXT_SEQ_LEN)


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    """A two-layer `T5EncoderModel` with d_model = `TEXT_EMBED_DIM`: ids [B, L] -> [B, L, 32]."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_EMBED_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )
    return T5EncoderModel(config).eval()


def tiny_scheduler(kind: str = "dpm"):
    """CogVideoX's DPM ("dpm") or DDIM ("ddim") scheduler with the real 5B settings (v-prediction, zero-SNR)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    cls = {"dpm": CogVideoXDPMScheduler, "ddim": CogVideoXDDIMScheduler}[kind]
    return cls(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        snr_shift_scale=1.0,
    )


def tiny_components(i2v: bool = False, seed: int = 0, scheduler: str = "dpm", rotary: bool = True,
                    version: str = "1.0") -> dict:
    """All five pipeline components, keyed as `CogVideoXPipeline(**components)` expects."""
    tokenizer = tiny_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": tiny_text_encoder(len(tokenizer), seed=seed),
        "vae": tiny_vae(seed=seed, version=version),
        "transformer": tiny_transformer(i2v=i2v, rotary=rotary, seed=seed, version=version),
        "scheduler": tiny_scheduler(scheduler),
    }


def tiny_pipeline(i2v: bool = False, seed: int = 0, scheduler: str = "dpm", rotary: bool = True, version: str = "1.0"):
    """A `CogVideoXPipeline` (or `CogVideoXImageToVideoPipeline` when `i2v`) from `tiny_components`."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    return cls(**tiny_components(i2v=i2v, seed=seed, scheduler=scheduler, rotary=rotary, version=version))


def save_tiny_cogvideox(
    directory: str | Path, i2v: bool = False, seed: int = 0, scheduler: str = "dpm", rotary: bool = True,
    version: str = "1.0",
) -> Path:
    """Write a full diffusers pipeline folder (model_index.json + one folder per component).

    `CogVideoXPipeline.from_pretrained(directory)` (or `CogVideoXImageToVideoPipeline` when
    `i2v`) loads it back. Call the pipeline with `max_sequence_length=TEXT_SEQ_LEN`,
    `height=HEIGHT`, `width=WIDTH`, `num_frames=NUM_FRAMES`. Returns the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiny_pipeline(i2v=i2v, seed=seed, scheduler=scheduler, rotary=rotary, version=version).save_pretrained(directory)
    return directory
