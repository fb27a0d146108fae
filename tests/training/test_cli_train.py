"""`vgpa cache` encodes real video files with the model's VAE/T5; `vgpa train` runs end to end."""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest
import torch

from clients.cli import main
from training.fixtures import tiny_cogvideox as tiny
from training.pairs import PairsDataset, load_pairs_index


def _write_clip(path, seed, frames=11, height=40, width=48):
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=8)  # lossless: the test compares exact pixels
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for _ in range(frames):
            img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_clip_folder(folder, **size):
    """Three pairs of random lossless clips and their pairs.jsonl (the input of `vgpa cache`)."""
    folder.mkdir()
    lines = []
    for i in range(3):
        _write_clip(folder / f"w{i}.mkv", seed=2 * i, **size)
        _write_clip(folder / f"l{i}.mkv", seed=2 * i + 1, **size)
        lines.append({"prompt": f"a red cube {i % 2}", "winner": f"w{i}.mkv", "loser": f"l{i}.mkv", "winner_score": 0.1})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder


@pytest.fixture
def clips(tmp_path):
    """40x48 clips: `vgpa cache` resizes them to cover the model's 32x32 and centre-crops."""
    return _write_clip_folder(tmp_path / "clips")


@pytest.fixture
def model_size_clips(tmp_path):
    """Clips at the model's own 32x32, which the pipelines' preprocessing takes without resizing."""
    return _write_clip_folder(tmp_path / "model-size-clips", height=tiny.HEIGHT, width=tiny.WIDTH)


def near_deterministic_model(folder, i2v, version="1.0"):
    """A tiny pipeline folder whose VAE posterior has std exp(-15) ~ 3e-7 (log-variance -30).

    The pipelines draw a posterior *sample* (`retrieve_latents`), the cache stores the posterior
    *mean* (caching twice gives the same latents); with this VAE both agree to ~1e-6, so the cache
    can be compared with the pipeline's own code instead of a formula re-written in the test.
    """
    pipe = tiny.tiny_pipeline(i2v=i2v, version=version)
    conv = pipe.vae.encoder.conv_out.conv  # output channels: [mean (C); log-variance (C)]
    with torch.no_grad():
        conv.weight[tiny.LATENT_CHANNELS:] = 0.0
        conv.bias[tiny.LATENT_CHANNELS:] = -30.0
    pipe.save_pretrained(folder)
    return folder


def _first_frames(path, count):
    from PIL import Image

    from common.video import load_video

    return [Image.fromarray(f.numpy()) for f in load_video(path).frames[:count]]


@pytest.mark.parametrize("i2v,version", [(False, "1.0"), (True, "1.0"), (False, "1.5"), (True, "1.5")],
                         ids=["t2v", "i2v", "t2v-1.5", "i2v-1.5"])
def test_cached_latents_equal_the_pipelines_own_encoding(tmp_path, model_size_clips, i2v, version, capsys):
    """Video latents = CogVideoXVideoToVideoPipeline.prepare_latents; the I2V condition the trainer builds
    from the cached image latent = CogVideoXImageToVideoPipeline.prepare_latents (for 1.5: divided by the
    scaling factor, at the padded frame count `__call__` gives it); text = encode_prompt. The transformer's
    weights are deleted first: `vgpa cache` must not need them."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline, CogVideoXVideoToVideoPipeline

    from common.cogvideox import padded_latent_frames
    from training.dpo import i2v_condition

    model = near_deterministic_model(tmp_path / "model", i2v, version)
    components = (CogVideoXImageToVideoPipeline if i2v else CogVideoXVideoToVideoPipeline).from_pretrained(model).components
    for weights in (model / "transformer").glob("*.safetensors"):
        weights.unlink()
    main(["cache", "--videos", str(model_size_clips), "--model", str(model), "--output", str(tmp_path / "pairs")])
    out = capsys.readouterr().out
    assert "wrote 3 pairs" in out and "no transformer): peak memory" in out
    index = load_pairs_index(tmp_path / "pairs")
    assert index.latent_shape == (tiny.LATENT_FRAMES, tiny.LATENT_CHANNELS, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH)
    assert index.text_shape == (tiny.TEXT_SEQ_LEN, tiny.TEXT_EMBED_DIM) and index.i2v == i2v
    assert index.summary["latent_space"]["family"] == f"cogvideox-{version}"
    item = PairsDataset(index)[1]

    # The video-to-video pipeline's encoding of the clip. Its prepare_latents ends with add_noise at
    # `timestep`: a scheduler whose betas are all 0 makes that the identity (alpha_bar = 1).
    v2v = CogVideoXVideoToVideoPipeline(**{**components, "scheduler": CogVideoXDDIMScheduler(trained_betas=[0.0] * 1000)})
    video = v2v.video_processor.preprocess_video(_first_frames(model_size_clips / "w1.mkv", tiny.NUM_FRAMES),
                                                 height=tiny.HEIGHT, width=tiny.WIDTH)
    with torch.no_grad():
        expected = v2v.prepare_latents(video, 1, tiny.LATENT_CHANNELS, tiny.HEIGHT, tiny.WIDTH, torch.float32, "cpu",
                                       torch.Generator().manual_seed(0), timestep=torch.tensor([999]))
    torch.testing.assert_close(item["winner_latents"], expected[0], rtol=0, atol=1e-5)
    embeds, _ = v2v.encode_prompt("a red cube 1", do_classifier_free_guidance=False, max_sequence_length=tiny.TEXT_SEQ_LEN)
    torch.testing.assert_close(item["prompt_embeds"], embeds[0])

    if i2v:
        # The condition is the winner's first frame (both clips of a pair come from one image).
        i2v_pipe = CogVideoXImageToVideoPipeline(**components)
        image = i2v_pipe.video_processor.preprocess(_first_frames(model_size_clips / "w1.mkv", 1)[0],
                                                    height=tiny.HEIGHT, width=tiny.WIDTH)
        frames = padded_latent_frames(tiny.LATENT_FRAMES, i2v_pipe.transformer.config)
        with torch.no_grad():  # __call__ passes the padded pixel frame count
            _, condition = i2v_pipe.prepare_latents(image, 1, tiny.LATENT_CHANNELS, (frames - 1) * 4 + 1, tiny.HEIGHT,
                                                    tiny.WIDTH, torch.float32, "cpu", torch.Generator().manual_seed(0))
        ours = i2v_condition(item["image_latents"].unsqueeze(0), frames)
        torch.testing.assert_close(ours, condition, rtol=0, atol=1e-5)


def test_frames_are_resized_to_cover_and_centre_cropped_into_minus_one_one():
    from training.encode import fit_frames

    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8))
    x = fit_frames(frames, 32, 32)  # the height already fits: no resize, 8 columns cropped on each side
    assert x.shape == (3, 2, 32, 32)
    torch.testing.assert_close(x, frames[:, :, 8:40].permute(3, 0, 1, 2).float() / 127.5 - 1.0)


def test_cache_reports_missing_clip(tmp_path, clips):
    (clips / "l2.mkv").unlink()
    model = tiny.save_tiny_cogvideox(tmp_path / "model")
    with pytest.raises(SystemExit) as exc:
        main(["cache", "--videos", str(clips), "--model", str(model), "--output", str(tmp_path / "pairs")])
    assert exc.value.code == 2


@pytest.mark.ray
def test_train_command_end_to_end_image_to_video_with_a_beta_list(ray_cluster, tmp_path, clips, capsys):
    """cache -> train on a CogVideoX 1.5 image-to-video model (the condition latent concatenated on channels and
    scaled by 1 / scaling_factor, 3 latent frames padded to 4, ofs), with validation, for a list of betas: one
    training per value, each validated and exported in its own folder. (One launch per value is the least a
    list can cost: a Ray Train launch takes about 30 s on 2 cores. CogVideoX 1.0's image-to-video model is
    trained by `vgpa demo --tiny`, test_mine_demo.py.)"""
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    model = tiny.save_tiny_cogvideox(tmp_path / "model", i2v=True, version="1.5")
    main(["cache", "--videos", str(clips), "--model", str(model), "--output", str(tmp_path / "pairs")])
    Image.fromarray(np.full((tiny.HEIGHT, tiny.WIDTH, 3), 128, np.uint8)).save(tmp_path / "first.png")
    (tmp_path / "cfg.yaml").write_text(
        "batch_size: 2\nlora_rank: 4\nlora_alpha: 8\nlearning_rate: 1.0e-3\nwarmup_steps: 1\n"
        f"validation_every: 3\nvalidation_prompts: [a red cube]\nvalidation_images: [{tmp_path / 'first.png'}]\n"
        "validation_inference_steps: 2\nvalidation_score_config: {frames: 9, recon_frames: 9, max_side: 32}\n"
    )
    main(["train", "--pairs", str(tmp_path / "pairs"), "--model", str(model), "--output", str(tmp_path / "out"),
          "--steps", "3", "--workers", "1", "--config", str(tmp_path / "cfg.yaml"), "--run-name", "cli",
          "--beta", "1,500"])
    out = capsys.readouterr().out
    assert out.count("3 steps, batch 2 (1 worker(s) x 1 x 2 accumulation)") == 2
    assert "no GPU in the Ray cluster: training runs on the CPU" in out  # said, not silent
    assert "implicit acc" in out and "pytorch_lora_weights.safetensors" in out
    assert "beta sweep" in out and "beta 1 " in out and "beta 500 " in out
    for beta in ("1", "500"):
        run = tmp_path / "out" / f"beta-{beta}"
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["run_name"] == f"cli-beta{beta}" and summary["config"]["beta"] == float(beta)
        assert summary["steps"] == 3 and summary["config"]["lora_rank"] == 4
        assert load_pairs_index(summary["pairs"]).summary["latent_space"]["family"] == "cogvideox-1.5"
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2, 3]
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh LoRA: policy == reference
        assert all(math.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps)
        # Validation at step 3: one fixed-seed video, saved and scored (random weights: unscorable is an answer).
        assert (run / "validation" / "step_00000003" / "00.mp4").is_file()
        scores = json.loads((run / "validation" / "step_00000003" / "scores.json").read_text())
        assert len(scores) == 1 and scores[0]["status"] in ("ok", "unscorable")
        m = summary["final_metrics"]
        assert m["val/scored"] + m["val/unscorable"] == 1
    # The exported LoRA loads into the image-to-video pipeline.
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(model)
    pipe.load_lora_weights(tmp_path / "out" / "beta-500")
    assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters())


def test_train_command_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--pairs", str(tmp_path), "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--workers", "3"])
    assert exc.value.code == 2
    assert "batch_size 16 must be a multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--pairs", str(tmp_path), "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--beta", "1,-2"])
    assert exc.value.code == 2 and "positive values" in capsys.readouterr().err


def test_cluster_job_files_are_valid(monkeypatch):
    """cluster/train-rayjob.yaml's entrypoint parses with `vgpa train` and its config validates."""
    import shlex
    from pathlib import Path

    import yaml

    from clients.commands.train import load_train_config, train

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the entrypoint's paths are relative to the job's working_dir
    job = yaml.safe_load((root / "cluster" / "train-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["vgpa", "train"]
    ctx = train.make_context("train", argv[2:])
    cfg = load_train_config(root / ctx.params["config_file"],
                            {"num_workers": ctx.params["workers"], "gpus_per_worker": ctx.params["gpus_per_worker"]})
    assert cfg.num_workers == 8 and cfg.grad_accum_steps == 2 and cfg.lora_rank == 64
    gpu_group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    # One pod per 8-GPU node holds all the node's workers (NCCL over NVLink inside the pod).
    pod_gpus = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu_group["replicas"] * pod_gpus == cfg.num_workers * ctx.params["gpus_per_worker"]
    assert pod_gpus == 8
    assert cfg.max_steps == 10_000 and cfg.weight_decay == 0.01  # the paper's reference setup
    preset = load_train_config(root / "cluster" / "train_config_cogvideox1.5.yaml", {})
    paper = load_train_config(root / ctx.params["config_file"], {})
    assert preset.max_steps == 1_500 and preset.model_dump(exclude={"max_steps"}) == paper.model_dump(exclude={"max_steps"})
