"""benchmarks/bench_validity.py's neutral copies and its counting of pairs (the scoring itself is
tested in tests/common; the whole benchmark takes about 15 minutes, so it is not run here)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.benchmarks.scripts import load_benchmark

bench = load_benchmark("bench_validity")


def test_the_shifted_copy_moves_the_picture_by_half_a_pixel():
    ramp = torch.arange(64, dtype=torch.float32).mul(2).view(1, 1, 64, 1).expand(2, 48, 64, 3)  # 2 grey levels per column
    shifted = bench._shift(ramp.to(torch.uint8)).float()
    assert shifted.shape == ramp.shape
    # Moved right by 0.5 px: each inner pixel now shows the point half a column to its left.
    assert torch.allclose(shifted[:, 8:-8, 8:-8], ramp[:, 8:-8, 8:-8] - 1.0, atol=0.51)
    assert torch.equal(shifted[0], shifted[1])


def test_the_noisy_copy_is_seeded_and_keeps_the_picture():
    frames = torch.full((3, 32, 32, 3), 128, dtype=torch.uint8)
    noisy = bench._noise(frames)
    assert torch.equal(noisy, bench._noise(frames))
    difference = noisy.float() - 128
    assert abs(float(difference.mean())) < 0.1 and 1.8 < float(difference.std()) < 2.2


def test_the_reencoded_copy_is_a_close_second_generation():
    from common.synthetic import render_video

    first = bench._reencoded(render_video("boxes", "orbit", frames=8, size=(96, 128)).frames)  # as a file holds it
    second = bench._reencoded(first)
    assert second.shape == first.shape and second.dtype == torch.uint8
    difference = (second.float() - first.float()).abs()
    # compression noise (this small, saturated clip loses most to 4:2:0 chroma), not another picture
    assert 0 < float(difference.mean()) < 4.0 < float((first[1:].float() - first[:-1].float()).abs().mean())
    assert torch.equal(second, bench._reencoded(first))


def test_pairs_are_right_only_when_both_are_scored_and_beyond_the_margin():
    assert bench._right(1.0, 1.05) and not bench._right(1.0, 1.0) and not bench._right(None, 2.0) and not bench._right(1.0, None)
    assert bench._right(1.0, 1.05, margin=0.04) and not bench._right(1.0, 1.05, margin=0.06)
    assert math.isclose(bench._relative_spread(2.0, [2.2, 1.9]), 0.1)
    assert math.isinf(bench._relative_spread(2.0, [2.1, None]))
    assert bench._relative_spread(None, [1.0]) is None


def test_sets_with_moving_objects_have_a_still_copy_without_them():
    """The movers' sets get a fourth neutral copy, the same render without its moving objects."""
    sets = {s.name: s for s in bench.video_sets()}
    assert {"syn-slow-movers", "syn-slow-crowd"} <= sets.keys()
    assert sets["syn-slow-crowd"].neutral == [*bench.NEUTRAL, "still"]
    assert sets["syn-slow"].neutral == bench.NEUTRAL and sets["syn-slow"].still is None
    clean, deform, still = bench._rendered("boxes", "slow", 6, (48, 64), movers=2)
    small = bench.VideoSet("tiny-movers", clean, deform, still=still)
    still, clean = small.still(), small.clean()
    assert still.shape == clean.shape and not torch.equal(still, clean)
    assert torch.equal(still, bench._rendered("boxes", "slow", 6, (48, 64))[0]())


def test_a_set_is_ahead_on_more_pairs_then_on_pairs_beyond_neutral_then_on_the_weakest_margin():
    # weakest margin in neutral spreads: 1.05 vs clean 1.0 with a 10% spread is half a spread
    assert math.isclose(bench._weakest_margin(1.0, [1.3, 1.05], 0.1), 0.5)
    assert bench._weakest_margin(1.0, [1.3, 0.9], 0.1) < 0  # one ranks wrong
    assert bench._weakest_margin(1.0, [1.3, None], 0.1) == -math.inf  # unscorable counts as the worst
    assert bench._weakest_margin(1.0, [1.3, 1.1], 0.0) == math.inf  # no neutral spread at all
    assert bench._verdict((5, 3, 0.4), (4, 4, 2.0)) == "ahead"  # more pairs right decides
    assert bench._verdict((5, 3, 0.4), (5, 4, 0.1)) == "behind"  # then pairs beyond the neutral spread
    assert bench._verdict((5, 5, 16.5), (5, 5, 2.9)) == "ahead"  # then the weakest margin
    assert bench._verdict((5, 5, 1.0), (5, 5, 1.0)) == "tie"


def test_standing_reads_the_baseline_columns_with_the_prefix():
    rows = [dict(clean=1.0, corrupted=c, neutral_spread=0.1, baseline_clean=2.0, baseline_corrupted=b,
                 baseline_neutral_spread=0.05) for c, b in [(1.2, 2.0), (1.05, 2.5)]]
    assert bench._set_standing(rows, "") == (2, 1, pytest.approx(0.5))
    assert bench._set_standing(rows, "baseline_")[:2] == (1, 1)


def test_held_out_sets_take_other_frames_and_other_corruption_seeds(tmp_path):
    import cv2
    import numpy as np

    for i in range(6):  # a capture of 6 images, each a flat grey of its own level
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((16, 24, 3), 40 * i, np.uint8))
    first = bench._real(tmp_path, frames=3, consecutive=True)()
    spread = bench._real(tmp_path, frames=3)()
    assert [int(f[0, 0, 0]) for f in first] == [0, 40, 80]
    assert [int(f[0, 0, 0]) for f in spread][0] == 0 and int(spread[-1, 0, 0, 0]) == 200
    usual = {s.name: s for s in bench.video_sets()}
    for held in bench.held_out_sets():  # empty without the shared data
        assert held.name not in usual and held.seed != 1


def test_the_scripts_on_these_sets_get_them_in_the_benchmarks_order_or_exit_naming_the_unknown():
    chosen = bench.chosen_sets("syn-slow,syn-orbit")
    assert list(chosen) == ["syn-orbit", "syn-slow"] and chosen["syn-slow"].name == "syn-slow"
    with pytest.raises(SystemExit, match="nope"):
        bench.chosen_sets("syn-slow,nope")
    assert "colmap-flow.r" in bench.machine_line(bench.ScoreConfig())
