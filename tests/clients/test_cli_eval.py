"""`vgpa eval` as a user runs it: two folders of small videos, paired by name; CSV, JSON, PNG and a table."""

import csv
import json
import subprocess
import sys

import pytest

from common.evaluation import summarise
from common.synthetic import render_video
from common.video import write_video

VGPA = [sys.executable, "-c", "from clients.cli import main; main()"]
SIZE = (120, 160)


def run(*args):
    return subprocess.run([*VGPA, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """base/: clean renders; lora/: the same names, one corrupted, plus one video without a partner."""
    root = tmp_path_factory.mktemp("eval")
    for name, scene, corruption in (("a_cat_seed0", "boxes", None), ("a_dog_seed1", "boxes", None)):
        frames = render_video(scene, "orbit", frames=8, size=SIZE).frames
        write_video(root / "base" / f"{name}.mkv", frames, lossless=True)
    write_video(root / "lora" / "a_cat_seed0.mkv", render_video("boxes", "orbit", frames=8, size=SIZE, corruption="warp").frames, lossless=True)
    write_video(root / "lora" / "a_dog_seed1.mkv", render_video("boxes", "orbit", frames=8, size=SIZE).frames, lossless=True)
    write_video(root / "lora" / "extra_seed9.mkv", render_video("boxes", "dolly", frames=8, size=SIZE).frames, lossless=True)
    return root


def test_eval_two_sets_writes_csv_json_png_and_a_side_by_side_table(two_sets, tmp_path):
    out = tmp_path / "results"
    done = run("eval", two_sets / "base", two_sets / "lora", "--out", out, "--frames", "5", "--max-side", "160")
    assert done.returncode == 0, done.stderr
    assert "video" in done.stderr  # the progress bar
    table = done.stdout
    for metric in ("psnr", "ssim", "mvcs", "epipolar_px", "epipolar_inlier_rate", "lora wins"):
        assert metric in table
    assert "2 pairs by name" in table and "extra_seed9" in table

    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert sorted((r["set"], r["name"]) for r in rows) == [
        ("A", "a_cat_seed0"), ("A", "a_dog_seed1"), ("B", "a_cat_seed0"), ("B", "a_dog_seed1"), ("B", "extra_seed9")
    ]
    data = json.loads((out / "eval.json").read_text())
    assert data["settings"]["names"] == ["base", "lora"] and data["settings"]["backend"] == "colmap-flow"
    epipolar = data["summary"]["metrics"]["epipolar_px"]
    assert epipolar["pairs_measured"] == 2 and epipolar["a"]["n"] == 2 and epipolar["b"]["n"] == 3
    # The corrupted cat is worse than its clean partner, so B cannot win every pair on epipolar error.
    assert epipolar["win_rate_b"] < 1.0
    cat = {r["set"]: r for r in data["videos"] if r["name"] == "a_cat_seed0"}
    assert cat["A"]["epipolar_px"] < cat["B"]["epipolar_px"]
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_one_set_from_a_list_json_summary(two_sets, tmp_path):
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# one path a line\n{two_sets / 'base' / 'a_cat_seed0.mkv'}\n")
    done = run("eval", listing, "--out", tmp_path, "--frames", "4", "--max-side", "160", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "win_rate_b" not in result["summary"]["metrics"]["psnr"]
    assert result["summary"]["metrics"]["psnr"]["a"]["n"] == 1
    assert done.stderr == ""


def test_eval_sets_without_shared_names_is_a_one_line_error(two_sets, tmp_path):
    lonely = tmp_path / "lonely"
    write_video(lonely / "other.mkv", render_video("boxes", "orbit", frames=4, size=(32, 32)).frames, lossless=True)
    done = run("eval", two_sets / "base", lonely, "--out", tmp_path / "x")
    assert done.returncode == 2 and "paired by file name" in done.stderr


def test_win_rate_counts_direction_and_ties():
    a = [dict(name="x", psnr=20.0, epipolar_px=0.5), dict(name="y", psnr=25.0, epipolar_px=None)]
    b = [dict(name="x", psnr=22.0, epipolar_px=0.4), dict(name="y", psnr=25.0, epipolar_px=0.3)]
    metrics = summarise(a, b)["metrics"]
    assert metrics["psnr"]["win_rate_b"] == pytest.approx(0.75)  # one win, one tie
    assert metrics["epipolar_px"]["win_rate_b"] == 1.0 and metrics["epipolar_px"]["pairs_measured"] == 1
    assert metrics["epipolar_px"]["a"] == {"n": 1, "unmeasured": 1, "mean": 0.5, "median": 0.5}
