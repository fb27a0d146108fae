"""An exported LoRA, loaded into a fresh diffusers pipeline, is the trained adapter: same transformer *output*.

Comparing re-saved weights cannot catch a wrong scale (diffusers infers r from the weights but
assumes alpha = r without the adapter metadata), so every test here compares outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from training.fixtures import tiny_cogvideox as tiny
from common.lora import LORA_WEIGHTS_NAME, load_lora, read_adapter_metadata, select_adapter
from training.dpo import rotary_embeddings
from training.lora import add_lora, export_lora, lora_parameters


def randomised_policy(model_dir, rank, alpha, targets, i2v=False, seed=1):
    """The pipeline folder's transformer with a LoRA whose A and B are both random (B = 0 would be a no-op)."""
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    add_lora(transformer, rank=rank, alpha=alpha, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(transformer):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return transformer.eval()


def transformer_inputs(config, seed=0):
    """One noisy latent (1, F, C, h, w), timestep, text and rotary embeddings for the tiny transformer."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, tiny.LATENT_FRAMES, config.in_channels, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH, generator=g)
    return dict(
        hidden_states=latent,
        encoder_hidden_states=torch.randn(1, tiny.TEXT_SEQ_LEN, tiny.TEXT_EMBED_DIM, generator=g),
        timestep=torch.tensor([437]),
        image_rotary_emb=rotary_embeddings(config, tiny.LATENT_FRAMES, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH),
        return_dict=False,
    )


@torch.no_grad()
def output(transformer, inputs):
    return transformer(**inputs)[0]


CASES = [
    # rank, alpha, targets, i2v: alpha != rank in every case (alpha = rank would hide a lost scale)
    (4, 8, ("to_q", "to_k", "to_v", "to_out.0"), False),  # the paper's alpha = 2 r
    (4, 3, ("to_q", "to_v"), True),
    (8, 32, ("to_k", "to_out.0", "proj_out"), False),
]


@pytest.mark.parametrize("rank,alpha,targets,i2v", CASES, ids=["r4-a8-t2v", "r4-a3-i2v", "r8-a32-t2v"])
def test_exported_lora_reproduces_the_trained_transformer_output(tmp_path, rank, alpha, targets, i2v):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    model_dir = tiny.save_tiny_cogvideox(tmp_path / "model", i2v=i2v)
    trained = randomised_policy(model_dir, rank, alpha, targets, i2v=i2v)
    path = export_lora(tmp_path / "lora", trained)
    assert path.name == LORA_WEIGHTS_NAME
    meta = read_adapter_metadata(path)
    assert (meta["r"], meta["lora_alpha"], meta["target_modules"]) == (rank, alpha, sorted(targets))

    inputs = transformer_inputs(trained.config)
    expected = output(trained, inputs)
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    base = output(cls.from_pretrained(model_dir).transformer, inputs)
    assert (expected - base).abs().max() > 0.05, "the adapter must change the output for this test to mean anything"

    # What a user does: a fresh pipeline, load_lora_weights(folder).
    pipe = cls.from_pretrained(model_dir)
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(output(pipe.transformer, inputs), expected, rtol=0, atol=1e-5)


def test_every_sampler_uses_one_loading_path_with_scales(tmp_path):
    """load_lora + select_adapter (the sampler deployment, vgpa demo, compare-lora): scale 1 = trained, 0 = base."""
    from diffusers import CogVideoXPipeline

    model_dir = tiny.save_tiny_cogvideox(tmp_path / "model")
    trained = randomised_policy(model_dir, rank=4, alpha=8, targets=("to_q", "to_k", "to_v", "to_out.0"))
    export_lora(tmp_path / "lora", trained)
    pipe = CogVideoXPipeline.from_pretrained(model_dir)
    inputs = transformer_inputs(trained.config)
    base = output(pipe.transformer, inputs)
    assert load_lora(pipe, tmp_path / "lora", "geo")["lora_alpha"] == 8
    select_adapter(pipe, "geo")
    torch.testing.assert_close(output(pipe.transformer, inputs), output(trained, inputs), rtol=0, atol=1e-5)
    select_adapter(pipe, "geo", scale=0.0)
    torch.testing.assert_close(output(pipe.transformer, inputs), base, rtol=0, atol=1e-6)
    select_adapter(pipe, None)
    assert torch.equal(output(pipe.transformer, inputs), base)


def test_sampler_deployment_samples_the_trained_policy(tmp_path):
    """The sampler engine's per-request adapter (what `vgpa demo` samples with) = the trained module itself."""
    from diffusers import CogVideoXPipeline

    from common.sampling import SampleRequest, Sampler, SamplingConfig

    model_dir = tiny.save_tiny_cogvideox(tmp_path / "model")
    trained = randomised_policy(model_dir, rank=4, alpha=8, targets=("to_q", "to_k", "to_v", "to_out.0"))
    export_lora(tmp_path / "lora", trained)
    sampler = Sampler(SamplingConfig(model_dir=model_dir, adapters={"geo": tmp_path / "lora"}, default_steps=2,
                                     max_sequence_length=tiny.TEXT_SEQ_LEN), tmp_path / "samples")
    answer = sampler.sample(SampleRequest(prompt="a red cube", seeds=[3], adapter="geo"))
    served = torch.load(answer.result.samples[0].latents)

    # The same call on a pipeline that holds the trained transformer module itself.
    pipe = CogVideoXPipeline.from_pretrained(model_dir, transformer=trained)
    with torch.inference_mode():
        direct = pipe("a red cube", num_inference_steps=2, guidance_scale=6.0, height=tiny.HEIGHT, width=tiny.WIDTH,
                      num_frames=tiny.NUM_FRAMES, max_sequence_length=tiny.TEXT_SEQ_LEN, output_type="latent",
                      generator=torch.Generator().manual_seed(3)).frames[0]
    torch.testing.assert_close(served, direct, rtol=0, atol=1e-4)


def test_checkpoint_without_metadata_is_exported_with_it(tmp_path):
    """A checkpoint written before exports carried metadata: the driver adds it from the saved run config."""
    from diffusers import CogVideoXPipeline

    from training.lora import lora_state_dict
    from training.trainer import CHECKPOINT_STATE, TrainConfig, export_checkpoint_lora

    model_dir = tiny.save_tiny_cogvideox(tmp_path / "model")
    trained = randomised_policy(model_dir, rank=4, alpha=8, targets=("to_q", "to_v"))
    ckpt = tmp_path / "checkpoint_00000010"
    CogVideoXPipeline.save_lora_weights(ckpt / "lora", transformer_lora_layers=lora_state_dict(trained),
                                        weight_name=LORA_WEIGHTS_NAME)  # the old export: no metadata
    assert read_adapter_metadata(ckpt / "lora") is None
    cfg = TrainConfig(lora_rank=4, lora_alpha=8, lora_targets=["to_q", "to_v"])
    (ckpt / CHECKPOINT_STATE).write_text(json.dumps({"step": 10, "config": cfg.model_dump(mode="json")}))

    export_checkpoint_lora(ckpt, tmp_path / "out")
    pipe = CogVideoXPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(tmp_path / "out")
    inputs = transformer_inputs(trained.config)
    torch.testing.assert_close(output(pipe.transformer, inputs), output(trained, inputs), rtol=0, atol=1e-5)


def test_missing_lora_file_is_a_clear_error(tmp_path):
    from common.errors import ConfigError
    from common.lora import lora_file

    with pytest.raises(ConfigError, match=f"{LORA_WEIGHTS_NAME} is missing"):
        lora_file(tmp_path)
