"""The pair-mining job on Ray Data: local actor stages, the Serve app's deployments, resume, failures, pairs.

Tiny random image-to-video CogVideoX, 2 denoising steps, 32x32 frames. Random weights make noise,
which the geometry scorer rightly calls unscorable; tests that need ranked videos assign scores to
the job's real records (and say so).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("ray.data")
pytest.importorskip("diffusers")

from common.errors import ConfigError  # noqa: E402
from training.mining import MineConfig, PairConfig, mine  # noqa: E402
from training.mining.job import check_prompts_for_model, video_seed  # noqa: E402
from training.mining.pair_policy import select_pairs  # noqa: E402
from training.mining.pair_writer import build_pairs  # noqa: E402
from training.mining.records import load_records  # noqa: E402
from training.prompts import PromptFileError, image_prompts, write_prompt_file  # noqa: E402

SCORE = {"frames": 4, "recon_frames": 8, "max_side": 64}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    from PIL import Image

    from common.synthetic import render_video
    from training.fixtures.tiny_cogvideox import save_tiny_cogvideox

    root = tmp_path_factory.mktemp("mine")
    model = save_tiny_cogvideox(root / "model", i2v=True)
    frames = root / "frames"
    frames.mkdir()
    for i, (kind, trajectory) in enumerate([("boxes", "orbit"), ("room", "dolly")]):
        Image.fromarray(render_video(kind, trajectory, frames=2, size=(48, 48), seed=i).frames[0].numpy()).save(frames / f"s{i}.png")
    good = image_prompts(frames)
    (root / "broken.png").write_text("this is not an image")  # exists, so only sampling can find out
    broken = {"prompt_id": "broken", "prompt": good[0]["prompt"], "image": str(root / "broken.png")}
    return {"root": root, "model": model, "good": write_prompt_file(root / "good.jsonl", good),
            "with_broken": write_prompt_file(root / "all.jsonl", good + [broken])}


@pytest.fixture(scope="module")
def local_run(ray_cluster, workspace) -> dict:
    """seeds=1, then seeds=2 (resumes: seed 0 of each prompt is not redone), then the same again."""
    out = workspace["root"] / "local"
    progress: list[list[dict]] = []
    runs = []
    for seeds in (1, 2, 2):
        progress.append([])
        runs.append(mine(workspace["with_broken"], workspace["model"], out, MineConfig(seeds=seeds, steps=2, score=SCORE),
                         local=True, on_progress=progress[-1].append))
    return {"out": out, "runs": runs, "progress": progress, "records": load_records(out)}


def test_bad_inputs_fail_before_sampling(tmp_path, workspace):
    model, good = workspace["model"], workspace["good"]
    with pytest.raises(PromptFileError, match="cannot read prompt file"):
        mine(tmp_path / "nope.jsonl", model, tmp_path / "o")
    (tmp_path / "p.jsonl").write_text('{"prompt_id": "a", "prompt": "x", "image": "missing.png"}\n')
    with pytest.raises(PromptFileError, match="missing.png does not exist"):
        mine(tmp_path / "p.jsonl", model, tmp_path / "o")
    with pytest.raises(ConfigError, match="model_index.json is missing"):
        mine(good, tmp_path, tmp_path / "o")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ConfigError, match=r"holds a StableDiffusionPipeline, a model family videogpa does not support "
                                          r"\(supported: cogvideox \(CogVideoXPipeline, CogVideoXImageToVideoPipeline\); "
                                          r"wan \(WanPipeline, WanImageToVideoPipeline\)\)"):
        mine(good, tmp_path / "sd", tmp_path / "o")
    (tmp_path / "t2v.jsonl").write_text('{"prompt_id": "a", "prompt": "a cat"}\n')
    with pytest.raises(ConfigError, match="image-to-video but prompt 'a'.* has no first-frame image"):
        mine(tmp_path / "t2v.jsonl", model, tmp_path / "o")
    assert not (tmp_path / "o" / "records").exists()  # nothing sampled, nothing recorded


def test_local_job_records_every_video_with_its_verdict(local_run, workspace):
    first, second, third = local_run["runs"]
    records = local_run["records"]
    assert first["videos_this_run"] == 3 and second["videos_this_run"] == 3 and third["videos_this_run"] == 0
    assert len(records) == 6 and third["videos_done"] == 6 and third["prompts_done"] == 3
    keys = {(r["prompt_id"], r["seed"]) for r in records}
    expected = {(p, video_seed(0, p, i)) for p in ("s0-000", "s1-000", "broken") for i in range(2)}
    assert keys == expected  # deterministic seeds; nothing duplicated by the resumed runs
    for r in records:
        if r["prompt_id"] == "broken":  # the failing video is recorded with its reason; the job went on
            assert r["status"] == "failed" and "NotAnImageError" in r["reason"]
            continue
        assert r["status"] in ("ok", "unscorable") and (r["status"] == "ok") == (r["reason"] is None)
        for key in ("video", "latents", "prompt_embeds"):
            assert Path(r[key]).is_file() and Path(r[key]).is_relative_to(local_run["out"] / "samples")
        assert r["metric_id"].startswith("colmap-flow.r10/") and "T=4" in r["metric_id"]
        assert r["image"].endswith(".png") and r["sample_s"] > 0 and r["score_s"] > 0
    start, end = local_run["progress"][1][0], local_run["progress"][1][-1]  # the resumed run's progress
    assert (start["prompts_done"], start["videos_done"], start["failed"]) == (0, 3, 1)
    assert (end["prompts_done"], end["prompts_total"], end["videos_done"], end["videos_total"]) == (3, 3, 6, 6)
    assert end["failed"] == 2 and end["pairs_so_far"] == 0 and end["videos_per_min"] > 0
    summary = json.loads((local_run["out"] / "mine_summary.json").read_text())
    assert summary["statuses"]["failed"] == 2 and summary["report"]["videos_dropped"]["failed"] == 2


def test_select_pairs_drops_and_modes():
    def rec(pid, seed, score, status="ok", motion=0.1, metric="m1"):
        return {"prompt_id": pid, "seed": seed, "status": status, "score": score, "motion": motion, "metric_id": metric}

    records = [
        rec("a", 1, 0.10), rec("a", 2, 0.30), rec("a", 3, 0.50), rec("a", 4, 0.12),
        rec("a", 5, 0.01, motion=0.0),                       # static
        rec("a", 6, 5.0),                                    # low quality (max_score 1)
        rec("a", 7, None, status="unscorable"), rec("a", 8, None, status="failed"),
        rec("b", 1, 0.20), rec("b", 2, 0.22),                # gap 0.02 < min_gap
        rec("c", 1, 0.20, metric="m1"), rec("c", 2, 0.90, metric="m2"),  # never across metric_ids
    ]
    settings = PairConfig(min_gap=0.05, min_motion=0.001, max_score=1.0)
    pairs, report = select_pairs(records, settings)
    assert [(w["prompt_id"], w["seed"], l["seed"]) for w, l in pairs] == [("a", 1, 3)]
    assert report["videos_dropped"] == {"failed": 1, "low_quality": 1, "static": 1, "unscorable": 1}
    assert report["pairs_dropped"] == {"single_candidate": 2, "small_gap": 1}
    assert sum(report["gap_histogram"]["counts"]) == 1 and report["gap_histogram"]["edges"][0] <= 0.4 <= report["gap_histogram"]["edges"][-1]
    all_pairs, report = select_pairs(records, settings.model_copy(update={"mode": "all-pairs"}))
    got = {(w["seed"], l["seed"]) for w, l in all_pairs if w["prompt_id"] == "a"}
    assert got == {(1, 2), (1, 3), (4, 2), (4, 3), (2, 3)}  # (1, 4) gap 0.02 is too small
    assert all(w["score"] < l["score"] and w["metric_id"] == l["metric_id"] for w, l in all_pairs)
    assert report["pairs"] == 5 and sum(report["gap_histogram"]["counts"]) == 5


def test_pairs_from_the_job_are_what_the_trainer_reads(local_run, workspace):
    """The job's own records and files -> pairs -> the trainer's loader and model check, no conversion.

    Random weights leave every video unscorable, so the test gives the sampled videos scores.
    """
    from training.pairs import PairsDataset, collate_pairs, load_pairs_index
    from training.trainer import check_model_folder

    records = [dict(r, status="ok", score=0.1 + 0.3 * (r["seed"] % 2) + 0.01 * i, motion=0.5,
                    metric_id="colmap-flow/dssim/test")
               if r["status"] != "failed" else r for i, r in enumerate(local_run["records"])]
    report = build_pairs(records, workspace["model"], local_run["out"] / "pairs", PairConfig(min_gap=0.0))
    assert report["pairs"] == 2 and report["videos_dropped"] == {"failed": 2}
    index = load_pairs_index(local_run["out"] / "pairs")
    assert index.i2v and index.summary["metric_id"] == "colmap-flow/dssim/test"
    assert index.summary["mining"]["pairs"] == 2
    check_model_folder(workspace["model"], index)
    batch = collate_pairs([PairsDataset(index)[i] for i in range(len(index))])
    assert batch["winner_latents"].shape == (2, 3, 4, 4, 4) and batch["image_latents"].shape == (2, 1, 4, 4, 4)
    assert batch["prompt_embeds"].shape == (2, 16, 32)
    for row in index.rows:
        assert row["winner_score"] < row["loser_score"] and not math.isnan(row["winner_score"])


def test_text_to_video_from_captions(ray_cluster, tmp_path):
    """Captions -> prompt file -> local mining on a text-to-video model -> pairs without image latents."""
    from training.fixtures.tiny_cogvideox import save_tiny_cogvideox
    from training.pairs import load_pairs_index
    from training.prompts import read_captions

    model = save_tiny_cogvideox(tmp_path / "t2v")
    (tmp_path / "captions.csv").write_text("id,caption\ncar,a red car on a coast road\n")
    prompts = write_prompt_file(tmp_path / "p.jsonl", read_captions(tmp_path / "captions.csv"))
    summary = mine(prompts, model, tmp_path / "out", MineConfig(seeds=2, steps=2, score=SCORE), local=True)
    records = load_records(tmp_path / "out")
    assert summary["videos_this_run"] == 2 and {r["image"] for r in records} == {None}
    assert all(r["status"] in ("ok", "unscorable") for r in records)
    scored = [dict(r, status="ok", score=float(i), motion=1.0, metric_id="m") for i, r in enumerate(records)]
    build_pairs(scored, model, tmp_path / "pairs", PairConfig())
    index = load_pairs_index(tmp_path / "pairs")
    assert len(index) == 1 and not index.i2v and index.rows[0]["image_latents"] is None
    with pytest.raises(ConfigError, match="text-to-video but p.jsonl gives first-frame images"):
        check_prompts_for_model([{"prompt_id": "a", "prompt": "x", "image": "f.png"}], False, "p.jsonl")


def test_serve_mode_streams_through_the_apps_deployments(ray_cluster, serve_url, workspace):
    from tests.services.conftest import deployed

    work = workspace["root"] / "serve-work"
    args = {"work_dir": str(work),
            "scorer": {"score": SCORE, "num_replicas": 1, "warmup": False},
            "sampler": {"model_dir": str(workspace["model"]), "default_steps": 2, "graceful_shutdown_timeout_s": 30}}
    out = workspace["root"] / "served"
    with pytest.raises(ConfigError, match="no Serve application named 'not-there'"):
        mine(workspace["good"], workspace["model"], out, MineConfig(seeds=2, app_name="not-there"))
    with deployed(args, "vgpa-test-mine", serve_url):
        summary = mine(workspace["good"], workspace["model"], out,
                       MineConfig(seeds=2, app_name="vgpa-test-mine", sample_concurrency=2))
    records = load_records(out)
    assert summary["videos_this_run"] == 4 and len(records) == 4 and summary["mode"] == "serve:vgpa-test-mine"
    for r in records:
        assert r["status"] in ("ok", "unscorable"), r["reason"]
        assert Path(r["video"]).is_relative_to(work) and Path(r["latents"]).is_file()
        assert "T=4" in r["metric_id"]  # the app's scorer settings


from tests.services.conftest import serve_url  # noqa: E402,F401  (the session's Serve proxy fixture)


def test_vgpa_mine_command_on_a_finished_job_adds_nothing(local_run, workspace, tmp_path, capsys):
    from clients.cli import main

    (tmp_path / "mine.yaml").write_text(f"steps: 2\nscore: {json.dumps(SCORE)}\n")
    main(["mine", "--prompts", str(workspace["with_broken"]), "--model", str(workspace["model"]),
          "--out", str(local_run["out"]), "--seeds", "2", "--local", "--config", str(tmp_path / "mine.yaml")])
    out = capsys.readouterr().out
    assert "videos         6 (0 this run" in out and "'failed': 2" in out
    assert "pairs          0" in out and not (local_run["out"] / "pairs").exists()  # the earlier test's pairs are not left stale
    assert len(load_records(local_run["out"])) == 6
    main(["mine", "--prompts", str(workspace["with_broken"]), "--model", str(workspace["model"]),
          "--out", str(local_run["out"]), "--seeds", "2", "--local", "--config", str(tmp_path / "mine.yaml"), "--retry-failed"])
    assert "videos         6 (2 this run" in capsys.readouterr().out  # only the failed ones were redone
    records = load_records(local_run["out"])
    assert len(records) == 6 and sum(r["status"] == "failed" for r in records) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["mine", "--prompts", str(tmp_path / "none.jsonl"), "--model", str(workspace["model"]),
              "--out", str(tmp_path / "o"), "--local"])
    assert exit_info.value.code == 2 and "cannot read prompt file" in capsys.readouterr().err


def test_backpressure_is_waited_out_and_a_cut_record_file_is_redone(tmp_path):
    from ray.serve.exceptions import BackPressureError

    from training.mining.records import append_records
    from training.mining.stages import call_with_backpressure as _call_with_backpressure

    calls = []

    def busy_twice():
        calls.append(1)
        if len(calls) < 3:
            raise BackPressureError(num_queued_requests=4, max_queued_requests=4)
        return "answer"

    assert _call_with_backpressure(busy_twice, timeout_s=60) == "answer" and len(calls) == 3
    def always_busy():
        raise BackPressureError(num_queued_requests=1, max_queued_requests=1)

    with pytest.raises(BackPressureError):  # past backpressure_timeout_s the video is given up (recorded as failed)
        _call_with_backpressure(always_busy, timeout_s=0.01)
    # A part file cut short by a kill is set aside; the other records stay; nothing is duplicated.
    row = {"prompt_id": "a", "seed": 1, "prompt": "x", "status": "unscorable", "reason": "static"}
    good = append_records(tmp_path, [row, dict(row, seed=2)])
    cut = append_records(tmp_path, [dict(row, seed=3)])
    cut.write_bytes(cut.read_bytes()[:20])
    append_records(tmp_path, [dict(row, seed=1)])  # the same key again (e.g. a racing rerun): kept once
    records = load_records(tmp_path)
    assert sorted(r["seed"] for r in records) == [1, 2] and good.is_file()
    assert not cut.exists() and cut.with_suffix(".unreadable").is_file()
