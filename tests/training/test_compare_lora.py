"""`vgpa compare-lora` on a tiny model: base vs LoRA scales on the same prompts and seeds, saturation guard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clients.cli import main
from training.fixtures import tiny_cogvideox as tiny
from common.saturation import mean_saturation
from training.lora import add_lora, export_lora, lora_parameters


def test_mean_saturation_is_hsv_saturation():
    import cv2

    assert mean_saturation(np.full((1, 2, 2, 3), 128, np.uint8)) == 0.0  # grey
    assert mean_saturation(np.zeros((1, 2, 2, 3), np.uint8)) == 0.0  # black: S = 0 by definition
    assert mean_saturation(np.array([[[[255, 0, 0]]]], np.uint8)) == 1.0
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    opencv = np.mean([cv2.cvtColor(f, cv2.COLOR_RGB2HSV)[..., 1] / 255.0 for f in frames])
    assert mean_saturation(frames) == pytest.approx(opencv, abs=1 / 255)
    with pytest.raises(ValueError, match="uint8"):
        mean_saturation(frames.astype(np.float32))


def test_compare_lora_samples_base_and_scales_on_the_same_seeds(tmp_path, capsys):
    from diffusers import CogVideoXTransformer3DModel

    model = tiny.save_tiny_cogvideox(tmp_path / "model")
    transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer")
    add_lora(transformer, rank=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(transformer):
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    export_lora(tmp_path / "lora", transformer)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt_id": "cube", "prompt": "a red cube"}) + "\n")

    main(["compare-lora", "--model", str(model), "--lora", str(tmp_path / "lora"), "--prompts",
          str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "cmp"), "--scales", "0.5,1", "--seeds", "0,1",
          "--steps", "2", "--saturation-tolerance", "0", "--frames", "4", "--max-side", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "base" in out and "scale-0.5" in out and "scale-1" in out and "saturation" in out

    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"] for r in result["scales"]] == ["base", "scale-0.5", "scale-1"]  # the base is always sampled
    assert result["adapter"]["lora_alpha"] == 8 and result["adapter"]["r"] == 4
    names = {"cube-seed0", "cube-seed1"}
    for label in ("base", "scale-0.5", "scale-1"):
        assert {p.stem for p in (tmp_path / "cmp" / label).glob("*.mp4")} == names
    base, full = result["scales"][0], result["scales"][2]
    assert base["saturation_change"] == 0.0 and not base["over_saturated"]
    assert full["over_saturated"] == (full["saturation_change"] > 0)  # tolerance 0
    assert all(set(r["metrics"]) >= {"psnr", "mvcs", "epipolar_px"} for r in result["scales"])

    from common.video import load_video

    def frames(label, name):
        return load_video(tmp_path / "cmp" / label / f"{name}.mp4", max_side=4096).frames
    assert not torch.equal(frames("base", "cube-seed0"), frames("scale-1", "cube-seed0"))  # the LoRA acts
    assert not torch.equal(frames("base", "cube-seed0"), frames("base", "cube-seed1"))  # seeds differ


def test_compare_lora_on_wan(tmp_path, capsys):
    """The same comparison on a tiny Wan 2.1: the LoRA (WanPipeline's loading path) at scale 1 changes the video."""
    from diffusers import WanTransformer3DModel

    from training.fixtures import tiny_wan

    model = tiny_wan.save_tiny_wan(tmp_path / "model")
    transformer = WanTransformer3DModel.from_pretrained(model, subfolder="transformer")
    add_lora(transformer, rank=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(transformer):
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    export_lora(tmp_path / "lora", transformer)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt_id": "cube", "prompt": "a red cube"}) + "\n")
    main(["compare-lora", "--model", str(model), "--lora", str(tmp_path / "lora"), "--prompts",
          str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "cmp"), "--scales", "1", "--seeds", "0",
          "--steps", "2", "--sample-frames", str(tiny_wan.NUM_FRAMES), "--height", str(tiny_wan.HEIGHT),
          "--width", str(tiny_wan.WIDTH), "--frames", "4", "--max-side", "32", "--device", "cpu"])
    assert "scale-1" in capsys.readouterr().out
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["family"] == "wan" and result["pipeline"] == "WanPipeline"
    assert result["size"] == {"frames": tiny_wan.NUM_FRAMES, "height": tiny_wan.HEIGHT, "width": tiny_wan.WIDTH}
    from common.video import load_video

    base, scaled = (load_video(tmp_path / "cmp" / label / "cube-seed0.mp4", max_side=4096).frames for label in ("base", "scale-1"))
    assert base.shape == (tiny_wan.NUM_FRAMES, tiny_wan.HEIGHT, tiny_wan.WIDTH, 3) and not torch.equal(base, scaled)
