"""Prompt building for the mining job: camera-motion vocabulary, seeded prompts, captions, `vgpa prompts`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from clients.cli import main
from training.prompts import (
    PromptFileError,
    camera_motion_prompt,
    image_prompts,
    load_vocabulary,
    read_captions,
    read_prompt_file,
)


@pytest.fixture
def frames_dir(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_camera_prompts_are_seeded_structured_and_drawn_from_the_vocabulary():
    vocab = load_vocabulary()
    assert set(vocab["primitives"]) == {"translation", "rotation", "complex"}
    phrases = {p for ps in vocab["primitives"].values() for p in ps}
    prompts = [camera_motion_prompt(random.Random(s), vocab) for s in range(40)]
    assert prompts[3] == camera_motion_prompt(random.Random(3), vocab)  # seeded
    assert len(set(prompts)) > 20
    for text in prompts:
        assert text.startswith(vocab["prefix"])
        body = text[len(vocab["prefix"]) + 1 : -1]
        parts = [p[0].lower() + p[1:] for p in body.split(vocab["joiner"])]
        assert 2 <= len(parts) <= 3 and len(set(parts)) == len(parts)
        assert set(parts) <= phrases


def test_image_prompts_one_per_image_stable_under_added_images(frames_dir):
    rows = image_prompts(frames_dir, seed=7, prompts_per_image=2)
    assert [r["prompt_id"] for r in rows] == ["a-000", "a-001", "b-000", "b-001"]
    assert all(r["image"].endswith((".png", ".jpg")) for r in rows)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(frames_dir / "c.png")
    again = image_prompts(frames_dir, seed=7, prompts_per_image=2)
    assert again[:4] == rows and len(again) == 6


def test_custom_vocabulary_file(tmp_path, frames_dir):
    vocab_file = tmp_path / "mine.json"
    vocab_file.write_text(json.dumps({"format": "videogpa-camera-motion", "version": 1, "prefix": "Still world.",
                                      "primitives": {"moves": ["the camera cranes up", "the camera whips left"]}}))
    rows = image_prompts(frames_dir, vocabulary=load_vocabulary(vocab_file))
    assert rows[0]["prompt"].startswith("Still world. The camera")
    vocab_file.write_text(json.dumps({"format": "videogpa-camera-motion", "primitives": {"moves": []}}))
    with pytest.raises(PromptFileError, match="non-empty list"):
        load_vocabulary(vocab_file)


def test_captions_from_jsonl_and_csv(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"id": "x1", "caption": "a red car on a coast road"}\n\n{"id": 2, "caption": "a cat"}\n')
    (tmp_path / "c.csv").write_text('id,caption\nx1,"a red car, on a coast road"\nx2,a cat\n')
    assert read_captions(tmp_path / "c.jsonl") == [{"prompt_id": "x1", "prompt": "a red car on a coast road"},
                                                   {"prompt_id": "2", "prompt": "a cat"}]
    assert read_captions(tmp_path / "c.csv")[0]["prompt"] == "a red car, on a coast road"
    (tmp_path / "bad.csv").write_text("name,text\na,b\n")
    with pytest.raises(PromptFileError, match="columns id and caption"):
        read_captions(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(PromptFileError, match="line 1: needs a non-empty id and caption"):
        read_captions(tmp_path / "bad.jsonl")


def test_prompt_file_checks(tmp_path):
    with pytest.raises(PromptFileError, match="cannot read prompt file"):
        read_prompt_file(tmp_path / "missing.jsonl")
    bad = tmp_path / "p.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(PromptFileError, match="line 1 is not JSON"):
        read_prompt_file(bad)
    bad.write_text('{"prompt_id": "a", "prompt": "x"}\n{"prompt_id": "a", "prompt": "y"}\n')
    with pytest.raises(PromptFileError, match="appears twice"):
        read_prompt_file(bad)
    bad.write_text('{"prompt_id": "a", "prompt": "x", "image": "gone.png"}\n')
    with pytest.raises(PromptFileError, match="first-frame image .*gone.png does not exist"):
        read_prompt_file(bad)
    bad.write_text("")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        read_prompt_file(bad)


def test_vgpa_prompts_command(tmp_path, frames_dir, capsys):
    main(["prompts", "--frames", str(frames_dir), "--out", str(tmp_path / "p.jsonl"), "--per-image", "2", "--seed", "3"])
    assert "wrote 4 image-to-video prompts" in capsys.readouterr().out
    rows = read_prompt_file(tmp_path / "p.jsonl")
    assert rows == image_prompts(frames_dir, seed=3, prompts_per_image=2)
    (tmp_path / "c.jsonl").write_text('{"id": "k", "caption": "a kitchen"}\n')
    main(["prompts", "--captions", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "t.jsonl")])
    assert read_prompt_file(tmp_path / "t.jsonl") == [{"prompt_id": "k", "prompt": "a kitchen", "image": None}]
    with pytest.raises(SystemExit) as exit_info:
        main(["prompts", "--frames", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.jsonl")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_cluster_job_and_documented_command_parse():
    """The RayJob's entrypoint and the `ray job submit` line in docs/mining.md are valid `vgpa mine` commands."""
    import re
    import shlex
    from pathlib import Path

    import yaml

    from clients.commands.mine import mine as mine_command
    from training.mining import config_from_file

    def parse(words: list[str]) -> dict:
        assert words[:2] == ["vgpa", "mine"], words
        return mine_command.make_context("vgpa mine", words[2:]).params

    root = Path(__file__).resolve().parents[2]
    job = yaml.safe_load((root / "cluster" / "mine-rayjob.yaml").read_text())
    args = parse(shlex.split(job["spec"]["entrypoint"]))
    assert args["local"] and args["seeds"] == 4
    assert config_from_file(root / args["config_file"], {"pairs": {}}).sampler_num_gpus == 1
    doc = (root / "docs" / "mining.md").read_text()
    submit = re.search(r"ray job submit [^`]*?-- \\\n(.*?)\n```", doc, re.S).group(1).replace("\\\n", " ")
    assert parse(shlex.split(submit))["seeds"] == 4
