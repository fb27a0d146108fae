"""`vgpa eval --ray`'s job: the same rows as the local evaluation, computed by Ray tasks."""

import pytest

from common.config import ScoreConfig
from common.evaluation import evaluate_set
from common.geometry import create_backend
from common.synthetic import render_video
from common.video import write_video

pytestmark = pytest.mark.ray


def test_ray_tasks_give_the_local_rows(ray_cluster, tmp_path):
    from training.eval_job import evaluate_set_ray

    videos = {}
    for name, trajectory in (("orbit_seed0", "orbit"), ("static_seed1", "static")):
        frames = render_video("boxes", trajectory, frames=6, size=(120, 160)).frames
        videos[name] = write_video(tmp_path / f"{name}.mkv", frames, lossless=True)
    videos["broken_seed2"] = tmp_path / "missing.mkv"
    config = ScoreConfig(frames=4, max_side=160)
    done = []
    rows = evaluate_set_ray(videos, config, label="B", on_done=done.append)
    local = evaluate_set(videos, config, create_backend("colmap-flow"), label="B")
    assert [r["name"] for r in rows] == list(videos) and len(done) == 3
    for remote, here in zip(rows, local):
        assert remote["status"] == here["status"] and remote["set"] == "B"
        # The epipolar metrics do not depend on the (multi-threaded, not bit-reproducible) SfM.
        assert remote["epipolar_px"] == here["epipolar_px"]
        assert remote["epipolar_unmeasurable"] == here["epipolar_unmeasurable"]
    assert rows[1]["epipolar_px"] is None and rows[1]["epipolar_unmeasurable"] == 3  # static: unmeasurable
    assert rows[2]["status"] == "error" and "no such file" in rows[2]["reason"]
