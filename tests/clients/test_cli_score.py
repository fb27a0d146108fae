"""`vgpa score` as a user runs it: a real process, real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.synthetic import render_video, with_caption
from common.video import write_video

VGPA = [sys.executable, "-c", "from clients.cli import main; main()"]


def run(*args, **kwargs):
    return subprocess.run([*VGPA, *map(str, args)], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory):
    video = render_video("boxes", "orbit", frames=20, size=(180, 240))
    return write_video(tmp_path_factory.mktemp("videos") / "orbit.mp4", video.frames)


def test_json_output_is_one_object_and_previews_are_written(demo_video, tmp_path):
    done = run("score", demo_video, "--json", "--frames", "6", "--preview", tmp_path / "previews")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # exactly one JSON document on stdout
    assert result["status"] == "ok" and result["frames"] == 6
    assert len(result["per_frame"]) == 6 and set(result["timings_s"]) >= {"decode", "geometry", "total"}
    assert len(list((tmp_path / "previews").glob("*.png"))) == 6
    assert "geometry" in done.stderr  # progress went to stderr


def test_cli_scores_what_the_library_scores_every_time(demo_video):
    from common.config import ScoreConfig
    from common.scoring import score_video

    runs = [json.loads(run("score", demo_video, "--json", "--frames", "6", "--quiet").stdout) for _ in range(2)]
    local = score_video(demo_video, ScoreConfig(frames=6))
    assert runs[0]["status"] == "ok" and runs[0]["score"] == runs[1]["score"]  # bit-identical from run to run
    assert local.score == pytest.approx(runs[0]["score"], rel=1e-3)  # another process, maybe other thread counts


def test_human_output_is_a_short_table(demo_video):
    done = run("score", demo_video, "--frames", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "score" in done.stdout and "metric" in done.stdout and done.stderr == ""


def test_human_output_says_what_was_left_out(tmp_path):
    captioned, _ = with_caption(render_video("boxes", "orbit", frames=20, size=(180, 240)).frames, scale=2.0)
    framed = captioned.clone()
    framed[:, :20] = 0  # a letterbox bar above
    done = run("score", write_video(tmp_path / "captioned.mp4", framed), "--frames", "6", "--quiet")
    assert done.returncode == 0, done.stderr
    left_out = next(line for line in done.stdout.splitlines() if line.strip().startswith("left out"))
    assert "screen overlay" in left_out and "bars 2" in left_out, done.stdout


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: _write(d / "notes.mp4", b"hello"), "not a video"),
        (lambda d: write_video(d / "one.mkv", render_video(frames=1, size=(32, 32)).frames, lossless=True), "at least 2"),
        (lambda d: _write(d / "cut.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64), "not a video|damaged"),
    ],
    ids=["missing", "not-a-video", "one-frame", "truncated"],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, message):
    import re

    done = run("score", make(tmp_path), "--json")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith(("[vgpa]", "  "))]  # progress lines aside
    assert len(errors) == 1 and errors[0] == lines[-1], done.stderr
    assert errors[0].startswith("error: ") and re.search(message, errors[0]), done.stderr
    assert "Traceback" not in done.stderr


def test_limits_and_bad_settings_are_clear(demo_video):
    done = run("score", demo_video, "--max-side", "5")
    assert done.returncode == 2 and "max_side" in done.stderr and "Traceback" not in done.stderr
    done = run("score", demo_video, "--backend", "nope")
    assert done.returncode == 2 and "unknown geometry backend 'nope'" in done.stderr


def test_url_mode_sends_every_option_the_service_takes_and_refuses_the_others(demo_video):
    """With --url: options only the service's operator sets are refused with a clear message, before any request."""
    from clients.commands.score import service_form
    from common.scorer import ScoreRequest

    accepted = {"frames": 6, "backend": "colmap-flow", "max_side": 160, "lambda": 0.5}
    assert service_form(dict(accepted, weights=None, perceptual=None, device=None)) == accepted
    assert set(accepted) == {info.alias or name for name, info in ScoreRequest.model_fields.items()}
    for flag, value in (("--weights", "/models/x"), ("--perceptual", "dssim"), ("--device", "cpu")):
        done = run("score", demo_video, "--url", "http://127.0.0.1:9", flag, value)  # port 9: nothing is contacted
        assert done.returncode == 2 and flag in done.stderr and "operator" in done.stderr, done.stderr
    done = run("score", demo_video, "--url", "http://127.0.0.1:9", "--frames", "1")
    assert done.returncode == 2 and "frames" in done.stderr
