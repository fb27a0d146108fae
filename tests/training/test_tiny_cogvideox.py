"""The tiny CogVideoX saves and loads as a real diffusers pipeline folder and samples on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.fixtures import tiny_cogvideox as tiny

diffusers = pytest.importorskip("diffusers")


def _call_kwargs(seed: int = 0) -> dict:
    return dict(
        num_inference_steps=2,
        output_type="pt",
        max_sequence_length=tiny.TEXT_SEQ_LEN,
        height=tiny.HEIGHT,
        width=tiny.WIDTH,
        num_frames=tiny.NUM_FRAMES,
        generator=torch.Generator().manual_seed(seed),
    )


def test_t2v_roundtrip_and_sampling(tmp_path):
    path = tiny.save_tiny_cogvideox(tmp_path / "t2v", seed=3)
    pipe = diffusers.CogVideoXPipeline.from_pretrained(path)
    assert pipe.transformer.config.in_channels == tiny.LATENT_CHANNELS
    assert pipe.transformer.config.use_rotary_positional_embeddings
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # Same seed -> same weights as an in-memory build: the saved folder is the model.
    ref = tiny.tiny_transformer(seed=3).state_dict()
    for name, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=0)

    frames = pipe("a red cube", **_call_kwargs()).frames
    assert frames.shape == (1, tiny.NUM_FRAMES, 3, tiny.HEIGHT, tiny.WIDTH)
    assert torch.isfinite(frames).all()
    again = pipe("a red cube", **_call_kwargs()).frames
    torch.testing.assert_close(frames, again)


def test_i2v_doubles_channels_and_samples(tmp_path):
    path = tiny.save_tiny_cogvideox(tmp_path / "i2v", i2v=True)
    pipe = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(path)
    assert pipe.transformer.config.in_channels == 2 * tiny.LATENT_CHANNELS
    image = Image.fromarray((np.random.default_rng(0).random((tiny.HEIGHT, tiny.WIDTH, 3)) * 255).astype("uint8"))
    frames = pipe(image=image, prompt="a red cube", **_call_kwargs()).frames
    assert frames.shape == (1, tiny.NUM_FRAMES, 3, tiny.HEIGHT, tiny.WIDTH)


def test_tokenizer_is_offline_and_fixed_length():
    tok = tiny.tiny_tokenizer()
    ids = tok("a camera orbit around a red cube!", max_length=tiny.TEXT_SEQ_LEN, padding="max_length", truncation=True)
    assert len(ids.input_ids) == tiny.TEXT_SEQ_LEN
    assert tok.unk_token_id not in ids.input_ids  # ASCII prompts tokenize without unknowns
    assert max(ids.input_ids) < len(tok)


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_cogvideox15_shaped_tiny_model_samples(tmp_path, i2v):
    """patch_size_t = 2 (3 latent frames run as 4, the padding dropped before decoding), sliced rotary
    positions, `ofs` for image-to-video, a VAE with invert_scale_latents: the CogVideoX1.5 shape."""
    from common.cogvideox import FAMILY_1_5, latent_space, model_family
    from common.families import read_model_configs

    path = tiny.save_tiny_cogvideox(tmp_path / "m", i2v=i2v, version="1.5")
    tcfg, vcfg = read_model_configs(path)
    assert model_family(tcfg) == FAMILY_1_5 and tcfg["patch_size_t"] == 2 and (tcfg["ofs_embed_dim"] is not None) == i2v
    assert latent_space(tcfg, vcfg)["invert_scale_latents"] and vcfg["scaling_factor"] == 0.7
    cls = diffusers.CogVideoXImageToVideoPipeline if i2v else diffusers.CogVideoXPipeline
    pipe = cls.from_pretrained(path)
    extra = {"image": Image.fromarray(np.zeros((tiny.HEIGHT, tiny.WIDTH, 3), np.uint8))} if i2v else {}
    frames = pipe(prompt="a red cube", **extra, **_call_kwargs()).frames
    assert frames.shape == (1, tiny.NUM_FRAMES, 3, tiny.HEIGHT, tiny.WIDTH)
