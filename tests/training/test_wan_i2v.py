"""Wan 2.1 image-to-video (`WanImageToVideoPipeline`) in every part: the folder check, the cached condition,
the DPO step's transformer call, the LoRA export, the sampler and the pair writer.

Everything runs on the tiny random Wan 2.1 I2V (`training.fixtures.tiny_wan`, `i2v=True`: a 36-channel
transformer with `image_dim`, a tiny CLIP vision tower and its processor), built from the real classes and
loaded back through `from_pretrained`. What the pipeline builds is taken from diffusers' own code
(`prepare_latents`, `encode_image`, the transformer call inside `__call__`), never re-written in the test.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.families import FAMILIES
from common.sampling import inspect_video_model, load_video_model
from training.dpo import dpo_step
from training.fixtures import tiny_wan as tiny
from training.lora import add_lora, lora_parameters

WAN = FAMILIES["wan"]
LATENT = (tiny.LATENT_CHANNELS, tiny.LATENT_FRAMES, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH)  # (C, F, h, w)
CONDITION = (tiny.CONDITION_CHANNELS, *LATENT[1:])  # mask ++ condition latents
EMBEDS = (tiny.IMAGE_TOKENS, tiny.IMAGE_EMBED_DIM)
SIZES = dict(num_frames=tiny.NUM_FRAMES, height=tiny.HEIGHT, width=tiny.WIDTH, max_sequence_length=tiny.TEXT_SEQ_LEN)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_wan(tmp_path_factory.mktemp("wan-i2v") / "model", i2v=True)


@pytest.fixture(scope="module")
def pipe(model_dir):
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pretrained(model_dir)


def _image(seed=0, size=(tiny.WIDTH, tiny.HEIGHT)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _batch(bsz=2, seed=0):
    """The text-to-video batch of `test_wan` plus random image latents (mask ++ condition) and image embeddings."""
    from tests.training.test_wan import _batch as t2v_batch

    g = torch.Generator().manual_seed(seed + 1000)
    return dict(t2v_batch(bsz, seed), image_latents=torch.randn((bsz, *CONDITION), generator=g),
                image_embeds=torch.randn((bsz, *EMBEDS), generator=g))


def _pipeline_condition(pipe, image):
    """(mask ++ condition (1, 20, F, h, w), image embeddings (1, N, D)), as WanImageToVideoPipeline.__call__
    builds them."""
    tensor = pipe.video_processor.preprocess(image, height=tiny.HEIGHT, width=tiny.WIDTH).to(torch.float32)
    with torch.no_grad():
        _, condition = pipe.prepare_latents(tensor, 1, tiny.LATENT_CHANNELS, tiny.HEIGHT, tiny.WIDTH, tiny.NUM_FRAMES,
                                            torch.float32, "cpu", torch.Generator().manual_seed(0))
        return condition, pipe.encode_image(image, "cpu")


# ---- the folder ------------------------------------------------------------------------------------
def test_i2v_folder_is_taken_by_every_part(model_dir):
    info = inspect_video_model(model_dir, need=("sample", "encode", "mine", "train", "dpo", "lora"))
    assert (info.family, info.pipeline, info.i2v) == ("wan", "WanImageToVideoPipeline", True)
    pipe, loaded = load_video_model(model_dir, device="cpu")
    assert type(pipe).__name__ == "WanImageToVideoPipeline" and pipe.transformer.config.in_channels == 36
    from common.families import read_model_configs

    assert WAN.latent_space(*read_model_configs(model_dir))["i2v"] is True


@pytest.mark.parametrize("part", ["image_encoder", "image_processor"])
def test_i2v_folder_without_its_image_encoder_is_refused(model_dir, tmp_path, part):
    folder = shutil.copytree(model_dir, tmp_path / "broken")
    shutil.rmtree(folder / part)
    with pytest.raises(ConfigError, match=f"not a complete wan pipeline folder: {part}/ is missing .*image_dim"):
        inspect_video_model(folder)


# ---- the condition, as the pipeline builds it -----------------------------------------------------
def test_encoded_condition_is_the_pipelines_prepare_latents_and_encode_image(model_dir, pipe):
    """mask ++ normalised latents of [first frame, 8 black frames] = prepare_latents' condition; the image
    embeddings = encode_image (CLIP's penultimate hidden state)."""
    from training.encode import encode_condition_image, fit_frames, load_vae, to_image

    image = _image(3)
    expected, expected_embeds = _pipeline_condition(pipe, image)
    assert expected.shape == (1, *CONDITION) and expected_embeds.shape == (1, *EMBEDS)
    frame = fit_frames(torch.from_numpy(np.asarray(image).copy())[None], tiny.HEIGHT, tiny.WIDTH)  # (3, 1, H, W)
    ours = encode_condition_image(load_vae(model_dir, "cpu", torch.float32, WAN), frame, tiny.NUM_FRAMES, WAN)
    torch.testing.assert_close(ours, expected[0], rtol=0, atol=1e-5)
    assert WAN.image_latents_shape(LATENT) == ours.shape
    assert torch.equal(ours[:4, 0], torch.ones(4, *LATENT[2:])) and not ours[:4, 1:].any(), "the first-frame mask"
    embeds = WAN.image_encoder(model_dir, "cpu", torch.float32)(to_image(frame))
    torch.testing.assert_close(embeds, expected_embeds[0], rtol=0, atol=1e-5)


def test_cache_writes_the_condition_and_image_embeddings(model_dir, pipe, tmp_path, capsys):
    """`vgpa cache` on a Wan I2V folder: each pair's condition from its "image" (or the winner's first frame),
    equal to the pipeline's own; the trainer's folder check takes the result."""
    from clients.cli import main
    from tests.training.test_cli_train import _first_frames, _write_clip_folder
    from training.pairs import PairsDataset, collate_pairs, load_pairs_index
    from training.trainer import check_model_folder

    clips = _write_clip_folder(tmp_path / "clips", height=tiny.HEIGHT, width=tiny.WIDTH)
    _image(7).save(clips / "first.png")
    lines = [json.loads(line) for line in (clips / "pairs.jsonl").read_text().splitlines()]
    lines[0]["image"] = "first.png"
    (clips / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    main(["cache", "--videos", str(clips), "--model", str(model_dir), "--output", str(tmp_path / "pairs"),
          "--frames", str(tiny.NUM_FRAMES), "--height", str(tiny.HEIGHT), "--width", str(tiny.WIDTH)])
    out = capsys.readouterr().out
    assert f"image-to-video with image embeddings {list(EMBEDS)}" in out and "the image encoder only" in out
    index = load_pairs_index(tmp_path / "pairs")
    assert index.i2v and index.family == "wan" and index.latent_shape == LATENT and index.image_embeds_shape == EMBEDS
    check_model_folder(model_dir, index)
    dataset = PairsDataset(index)
    for i, image in ((0, _image(7)), (1, _first_frames(clips / "w1.mkv", 1)[0])):
        condition, embeds = _pipeline_condition(pipe, image)
        torch.testing.assert_close(dataset[i]["image_latents"], condition[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(dataset[i]["image_embeds"], embeds[0], rtol=0, atol=1e-5)
    batch = collate_pairs([dataset[i] for i in range(len(dataset))])
    assert batch["image_latents"].shape == (3, *CONDITION) and batch["image_embeds"].shape == (3, *EMBEDS)


# ---- the DPO step ----------------------------------------------------------------------------------
def test_training_call_is_the_pipelines_transformer_call(pipe):
    """Capture the transformer call WanImageToVideoPipeline makes at its first step; the family's training
    inputs for x0 = e = those latents at that sigma, with the pipeline's condition, are the same call."""
    captured = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: captured.append(kw), with_kwargs=True)
    image = _image(5)
    try:
        with torch.no_grad():
            pipe(image=image, prompt="a red cube", num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="latent", **SIZES)
    finally:
        hook.remove()
    call = captured[0]
    latents = call["hidden_states"][:, :tiny.LATENT_CHANNELS]
    sigma = call["timestep"] / pipe.scheduler.config.num_train_timesteps
    batch = {"winner_latents": latents, "loser_latents": latents, "prompt_embeds": call["encoder_hidden_states"],
             "image_latents": call["hidden_states"][:, tiny.LATENT_CHANNELS:],
             "image_embeds": call["encoder_hidden_states_image"]}
    kwargs, target, _ = WAN.training_inputs(pipe.transformer, pipe.scheduler, batch, timesteps=sigma, noise=latents)
    condition, embeds = _pipeline_condition(pipe, image)
    torch.testing.assert_close(batch["image_latents"], condition)  # the pipeline passed prepare_latents' condition
    torch.testing.assert_close(batch["image_embeds"], embeds)
    for key in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_image"):
        torch.testing.assert_close(kwargs[key][:1], call[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(kwargs[key][1:], call[key], rtol=0, atol=1e-6)  # winner and loser alike
    torch.testing.assert_close(kwargs["timestep"], call["timestep"].repeat(2).float())
    with torch.no_grad():
        ours = pipe.transformer(**kwargs)[0]
        theirs = pipe.transformer(**call)[0]
    assert ours.shape == target.shape == (2, *LATENT)
    torch.testing.assert_close(ours[:1], theirs, rtol=0, atol=1e-5)


class TestI2vDpo:
    def _policy(self, rank=4, alpha=8):
        return add_lora(tiny.tiny_transformer(i2v=True), rank=rank, alpha=alpha)

    def test_fresh_lora_gives_log2_and_the_condition_matters(self):
        model = self._policy()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in lora_parameters(model):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        fresh = dpo_step(self._policy(), tiny.tiny_scheduler(), _batch(), beta=1000.0,
                         generator=torch.Generator().manual_seed(0))
        assert fresh.loss.item() == pytest.approx(math.log(2), abs=1e-6) and fresh.metrics["rewards/accuracies"] == 0.5

        def errors(batch):
            with torch.no_grad():
                return dpo_step(model, tiny.tiny_scheduler(), batch, beta=1.0,
                                generator=torch.Generator().manual_seed(0)).metrics["err/policy_chosen"]

        batch = _batch()
        base = errors(batch)
        for key in ("image_latents", "image_embeds"):
            changed = dict(batch, **{key: batch[key] + torch.randn(batch[key].shape, generator=g)})
            assert abs(errors(changed) - base) > 1e-4, f"{key} must reach the transformer"

    @pytest.mark.parametrize("drop,match", [
        ("image_embeds", r"image embeddings None must be \(B=2, N, 24\)"),
        ("image_latents", r"the transformer expects 36 in all \(image-to-video: latent \+\+ mask \+\+ condition\)"),
    ])
    def test_a_batch_without_its_condition_is_refused(self, drop, match):
        batch = _batch()
        del batch[drop]
        if drop == "image_latents":
            del batch["image_embeds"]
        with pytest.raises(ValueError, match=match):
            dpo_step(self._policy(), tiny.tiny_scheduler(), batch, beta=1.0)

    def test_training_on_one_pair_raises_implicit_accuracy(self):
        model = self._policy(rank=8, alpha=8)
        scheduler, batch = tiny.tiny_scheduler(), _batch(bsz=2, seed=5)
        opt = torch.optim.Adam(lora_parameters(model), lr=1e-2)
        for step in range(8):
            out = dpo_step(model, scheduler, batch, beta=2000.0, generator=torch.Generator().manual_seed(step))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        with torch.no_grad():
            after = dpo_step(model, scheduler, batch, beta=2000.0, generator=torch.Generator().manual_seed(99)).metrics
        assert after["rewards/accuracies"] > 0.5 and after["loss"] < math.log(2)


def test_trainer_refuses_t2v_pairs_for_the_i2v_model(model_dir, tmp_path):
    from tests.training.test_wan import wan_pairs
    from common.families import read_model_configs
    from training.pairs import load_pairs_index, write_pairs_dataset
    from training.trainer import check_model_folder

    tcfg, vcfg = read_model_configs(model_dir)
    space = dict(WAN.latent_space(tcfg, vcfg), i2v=False)
    index = load_pairs_index(write_pairs_dataset(tmp_path / "t2v", wan_pairs(2), family="wan", latent_space=space))
    with pytest.raises(ConfigError, match="in_channels=36 .*image-to-video model: the pairs need image latents"):
        check_model_folder(model_dir, index)


# ---- LoRA ------------------------------------------------------------------------------------------
def test_exported_lora_reproduces_the_trained_output_in_the_i2v_pipeline(model_dir, tmp_path):
    """WanImageToVideoPipeline.load_lora_weights (which pads the image K/V projections with zero LoRA) and
    the project's load_lora both give the trained transformer's output on an image-conditioned input."""
    from diffusers import WanImageToVideoPipeline

    from tests.training.test_wan import assert_exported_lora_reproduces_the_trained_output

    def inputs(g):
        channels = tiny.LATENT_CHANNELS + tiny.CONDITION_CHANNELS
        return dict(hidden_states=torch.randn(1, channels, *LATENT[1:], generator=g),
                    encoder_hidden_states_image=torch.randn(1, *EMBEDS, generator=g),
                    encoder_hidden_states=torch.randn(1, tiny.TEXT_SEQ_LEN, tiny.TEXT_EMBED_DIM, generator=g))

    assert_exported_lora_reproduces_the_trained_output(WanImageToVideoPipeline, model_dir, tmp_path / "lora", inputs)


# ---- sampling and mining ---------------------------------------------------------------------------
def test_sampler_and_pair_writer_on_wan_i2v(model_dir, pipe, tmp_path):
    """The sampler: N seeds from an uploaded first frame (the pipeline's own latents), a per-request adapter,
    no image refused. The pair writer: the mined pairs carry the pipeline's condition of that frame."""
    from tests.training.test_wan import sampler_with_a_random_adapter
    from training.mining.config import PairConfig
    from training.mining.pair_writer import build_pairs
    from training.pairs import PairsDataset, load_pairs_index
    from training.trainer import check_model_folder

    sampler = sampler_with_a_random_adapter(model_dir, tmp_path)
    first = tmp_path / "first.png"
    _image(11, size=(48, 40)).save(first)  # resized to the sample size, as an upload would be
    sizes = dict(frames=tiny.NUM_FRAMES, height=tiny.HEIGHT, width=tiny.WIDTH, guidance=1.0)
    refused = sampler.sample({"prompt": "a red cube", **sizes})
    assert refused.error is not None and "upload the first frame" in refused.error.message
    base = sampler.sample({"prompt": "a red cube", "seeds": [0, 1], **sizes}, image_path=str(first))
    assert base.error is None, base.error
    lat = {s.seed: torch.load(s.latents) for s in base.result.samples}
    assert lat[0].shape == LATENT and not torch.equal(lat[0], lat[1])
    from PIL import Image

    direct = pipe(image=Image.open(first).convert("RGB").resize((tiny.WIDTH, tiny.HEIGHT)), prompt="a red cube",
                  num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0), **SIZES).frames[0]
    torch.testing.assert_close(lat[0], direct, rtol=0, atol=1e-5)
    geo = sampler.sample({"prompt": "a red cube", "seeds": [0], "adapter": "geo", **sizes}, image_path=str(first))
    assert geo.error is None and (torch.load(geo.result.samples[0].latents) - lat[0]).abs().max() > 1e-3

    records = [{"prompt_id": "p", "seed": s.seed, "prompt": "a red cube", "image": str(first), "status": "ok",
                "score": 0.1 + s.seed, "motion": 1.0, "metric_id": "m", "video": s.video, "latents": s.latents,
                "prompt_embeds": s.prompt_embeds} for s in base.result.samples]
    report = build_pairs(records, model_dir, tmp_path / "pairs", PairConfig(min_gap=0.0, min_motion=0.0))
    assert report["pairs"] == 1, report
    index = load_pairs_index(tmp_path / "pairs")
    assert index.i2v and index.image_embeds_shape == EMBEDS
    check_model_folder(model_dir, index)
    item = PairsDataset(index)[0]
    condition, embeds = _pipeline_condition(pipe, Image.open(first).convert("RGB").resize((tiny.WIDTH, tiny.HEIGHT)))
    torch.testing.assert_close(item["image_latents"], condition[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(item["image_embeds"], embeds[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(item["winner_latents"], lat[0])


def test_trainer_validation_samples_the_i2v_pipeline_with_the_training_transformer(model_dir, tmp_path):
    """The trainer's validation videos come from WanImageToVideoPipeline around the LoRA transformer being
    trained, with the validation image as first frame, at the pairs' size."""
    from diffusers import WanTransformer3DModel

    from common.families import read_model_configs
    from common.video import load_video
    from training.pairs import Pair, load_pairs_index, write_pairs_dataset
    from training.trainer import TrainConfig, run_validation

    g = torch.Generator().manual_seed(0)
    pairs = [Pair(prompt="a red cube", winner_latents=torch.randn(LATENT, generator=g),
                  loser_latents=torch.randn(LATENT, generator=g),
                  prompt_embeds=torch.randn(tiny.TEXT_SEQ_LEN, tiny.TEXT_EMBED_DIM, generator=g),
                  image_latents=torch.randn(CONDITION, generator=g), image_embeds=torch.randn(EMBEDS, generator=g))]
    index = load_pairs_index(write_pairs_dataset(tmp_path / "pairs", pairs, family="wan",
                                                 latent_space=WAN.latent_space(*read_model_configs(model_dir))))
    _image(2).save(tmp_path / "first.png")
    cfg = TrainConfig(validation_prompts=["a red cube"], validation_images=[str(tmp_path / "first.png")],
                      validation_inference_steps=2, validation_score=False)
    model = add_lora(WanTransformer3DModel.from_pretrained(model_dir, subfolder="transformer"), rank=4, alpha=8)
    cache: dict = {}
    run_validation(model, str(model_dir), cfg, 3, tmp_path / "val", index, cache)
    assert type(cache["pipe"]).__name__ == "WanImageToVideoPipeline" and cache["pipe"].transformer is model
    frames = load_video(tmp_path / "val" / "step_00000003" / "00.mp4").frames
    assert tuple(frames.shape) == (tiny.NUM_FRAMES, tiny.HEIGHT, tiny.WIDTH, 3)
