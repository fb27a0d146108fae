"""`vgpa demo --tiny`: tiny random CogVideoX -> prompts -> mining -> pairs -> 2-worker LoRA-DPO -> LoRA loaded -> sample -> score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("ray.data")
pytest.importorskip("deepspeed")

from clients.cli import main  # noqa: E402

pytestmark = pytest.mark.ray


def test_demo_tiny_runs_the_whole_loop(ray_cluster, tmp_path, capsys):
    from training.pairs import load_pairs_index

    main(["demo", "--tiny", "--out", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # one JSON object, last on stdout
    assert summary["mined"]["videos"] == 6 and sum(summary["mined"]["statuses"].values()) == 6
    assert summary["pairs"] >= 1 and summary["pairs_ranked_by"]
    index = load_pairs_index(tmp_path / "pairs" if (tmp_path / "pairs").is_dir() else tmp_path / "mined" / "pairs")
    assert len(index) == summary["pairs"] and index.i2v and index.summary["metric_id"] == summary["pairs_ranked_by"]
    assert summary["steps"] == 2 and summary["workers"] == 2
    assert math.isfinite(summary["final_loss"]) and 0.0 <= summary["implicit_accuracy"] <= 1.0
    assert Path(summary["lora"]).is_file()
    train_summary = json.loads((tmp_path / "lora" / "train_summary.json").read_text())
    assert train_summary["pairs"] == str(index.directory) and train_summary["config"]["num_workers"] == 2
    after = summary["after_training"]
    assert len(after) == 3
    for row in after:  # sampled with the LoRA adapter, then scored (random weights: unscorable is an answer)
        assert row["status"] in ("ok", "unscorable") and Path(row["video"]).is_file()
    request = json.loads((Path(after[0]["video"]).parent / "request.json").read_text())
    assert request["request"]["adapter"] == "demo"


def test_demo_tiny_wan_image_to_video_runs_the_whole_loop(ray_cluster, tmp_path, capsys):
    """`vgpa demo --tiny --family wan --i2v`: a tiny random Wan 2.1 image-to-video model (first frames from the
    renderer) mined, paired, trained with two workers (flow-matching DPO), its LoRA loaded back into the sampler,
    sampled and scored. Text-to-video Wan differs from it only in its prompts: its parts are run by
    test_wan.py (the two-worker `vgpa train` included), and a whole loop costs about a minute on 2 cores."""
    from training.fixtures import tiny_wan
    from training.pairs import load_pairs_index

    pipeline = "WanImageToVideoPipeline"
    main(["demo", "--tiny", "--family", "wan", "--i2v", "--out", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["family"] == "wan" and summary["i2v"] is True
    assert summary["mined"]["videos"] == 6 and sum(summary["mined"]["statuses"].values()) == 6
    index = load_pairs_index(tmp_path / "pairs" if (tmp_path / "pairs").is_dir() else tmp_path / "mined" / "pairs")
    assert len(index) == summary["pairs"] >= 1 and index.i2v
    # Wan 2.1 I2V pairs carry the mask ++ condition latents and the CLIP image embeddings of the first frame.
    assert index.image_embeds_shape == (tiny_wan.IMAGE_TOKENS, tiny_wan.IMAGE_EMBED_DIM)
    assert index.family == "wan" and index.summary["latent_space"]["family"] == "wan"
    assert index.latent_shape == (tiny_wan.LATENT_CHANNELS, tiny_wan.LATENT_FRAMES, tiny_wan.LATENT_HEIGHT,
                                  tiny_wan.LATENT_WIDTH)  # Wan's (C, F, h, w), as the sampler wrote them
    assert summary["steps"] == 2 and summary["workers"] == 2
    assert math.isfinite(summary["final_loss"]) and 0.0 <= summary["implicit_accuracy"] <= 1.0
    train_summary = json.loads((tmp_path / "lora" / "train_summary.json").read_text())
    assert train_summary["family"] == "wan" and train_summary["pipeline"] == pipeline
    after = summary["after_training"]
    assert len(after) == 3
    for row in after:
        assert row["status"] in ("ok", "unscorable") and Path(row["video"]).is_file()
    request = json.loads((Path(after[0]["video"]).parent / "request.json").read_text())
    assert request["request"]["adapter"] == "demo" and request["pipeline"] == pipeline
    assert (request["frames"], request["height"], request["width"]) == (tiny_wan.NUM_FRAMES, tiny_wan.HEIGHT, tiny_wan.WIDTH)
