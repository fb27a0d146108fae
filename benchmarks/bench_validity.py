"""Does the score rank a consistent video above its corrupted copies? Against an epipolar baseline.

Builds corrupted sets from real captures (../shared/data/real: statue, kitchen, each also as 8
evenly spaced frames), real videos with moving subjects (../shared/data/real-dynamic: bear,
backpack) and the synthetic renderer (orbit, dolly; at 480x720, a slow generated-style camera with
no, two and six moving objects, and a tripod pan with two: no parallax at all). Each clean video gets five corruptions: smooth per-frame jitter-warps
of 3 and 8 px, progressive drift to 6 and 16 px, and a deforming region (a growing bulge on real
footage, a growing object in the renderer). Every video is written as an H.264 file and scored
from that file, by the project's default scorer and, in the same run, by the baseline: SIFT
matches between consecutive sampled frames, a RANSAC fundamental matrix, the mean Sampson distance
(`common.metrics.epipolar_error`).

Per corruption it prints pairs right / total (a pair is right when both videos are scored and the
clean one is strictly better), unscorable counts, the smallest margin over the clean score's
repeat spread (the clean video scored again, and once with one thread), and the median and worst
time per video.

Repeats are bit-identical, so the repeat spread says nothing about how far apart two equally
consistent videos can score. Each clean video therefore also gets two neutral copies, as
3D-consistent as itself: sensor noise (Gaussian, 2 grey levels), the whole video moved by half
a pixel (a principal point shift), the video encoded once more, and exposure and white balance
changing from frame to frame (auto-exposure, flicker). The neutral spread is the largest relative change of the
clean score over them; a pair is "right beyond neutral" when the corrupted copy scores worse than
the clean one by more than that. Both are measured for the baseline too. A set with moving
objects has one more neutral copy, `still`: the same render without them (its static scene is as
3D-consistent; a scorer that leaves the movers out should score it the same).

Per set it ends with a verdict against the baseline: "ahead" with more pairs right; when equal,
with more pairs right beyond the neutral spread; when equal too, with the larger weakest margin
(the corruption that scores closest to the clean video, in units of the neutral spread).

    python benchmarks/bench_validity.py [--sets statue,kitchen,...] [--held-out] [--cache DIR] [--json OUT] [--backend-options JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# common before cv2: importing common sets OpenCV's pixel limit, which cv2 reads when it loads.
from common.config import ScoreConfig  # noqa: E402
from common.geometry import GeometryBackend  # noqa: E402
from common.geometry.colmap_flow import ColmapFlowBackend  # noqa: E402
from common.metrics import epipolar_error  # noqa: E402
from common.scoring import score_video  # noqa: E402
from common.synthetic import corrupt_frames, render_video  # noqa: E402
from common.video import load_video, uniform_indices, write_video  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED = Path(os.environ.get("VGPA_SHARED_DATA", REPO.parent / "shared" / "data"))
CORRUPTIONS = ["warp3", "warp8", "drift6", "drift16", "deform"]
_IMAGE_CORRUPTION = {"warp3": ("warp", 3.0), "warp8": ("warp", 8.0), "drift6": ("drift", 6.0), "drift16": ("drift", 16.0)}
NEUTRAL = ["noise2", "shift0.5", "reencoded", "exposure"]


def _noise(frames: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """(N, H, W, 3) uint8 plus Gaussian noise of `sigma` grey levels (seeded)."""
    noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(0)) * sigma
    return (frames.float() + noise).round().clamp(0, 255).to(torch.uint8)


def _shift(frames: torch.Tensor, px: float = 0.5) -> torch.Tensor:
    """(N, H, W, 3) uint8 moved by `px` right and down (bilinear): the same scene, another principal point."""
    H, W = frames.shape[1:3]
    move = np.float32([[1, 0, px], [0, 1, px]])
    return torch.from_numpy(np.stack([
        cv2.warpAffine(f.numpy(), move, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101) for f in frames
    ]))


def _reencoded(frames: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 after one H.264 round trip: written like every file, a second generation.

    Videos reach a scorer re-encoded (uploads, players, the sampler's own files): the same
    pictures with other compression noise, as 3D-consistent as the first generation.
    """
    with tempfile.TemporaryDirectory(prefix="vgpa-reencode-") as tmp:
        return load_video(write_video(Path(tmp) / "first.mp4", frames)).frames


def _exposure(frames: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 with the exposure and white balance changing from frame to frame, as a
    camera's auto-exposure or a generated clip's flicker change them: a slow gain swing of +-6%,
    a seeded flicker of +-3% per frame, and red up / blue down by up to 4% towards the end."""
    n = len(frames)
    time_ = torch.linspace(0, 1, n)
    flicker = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gain = 1 + 0.06 * torch.sin(2 * math.pi * time_) + 0.03 * flicker
    balance = torch.stack([1 + 0.04 * time_, torch.ones(n), 1 - 0.04 * time_], dim=1)
    scaled = frames.float() * gain.view(n, 1, 1, 1) * balance.view(n, 1, 1, 3)
    return scaled.round().clamp(0, 255).to(torch.uint8)


_NEUTRAL_COPY = {"noise2": _noise, "shift0.5": _shift, "reencoded": _reencoded, "exposure": _exposure}


@dataclass
class VideoSet:
    name: str
    clean: Callable[[], torch.Tensor]  # -> (N, H, W, 3) uint8
    deform: Callable[[torch.Tensor], torch.Tensor]  # clean frames -> deformed frames
    fps: float = 8.0
    still: Optional[Callable[[], torch.Tensor]] = None  # a render's clean frames without its moving objects
    seed: int = 1  # of the jitter-warps and drifts (held-out sets use others than the sets tuned on)

    @property
    def neutral(self) -> list[str]:
        """The neutral copies of this set: the general ones, and `still` where there are movers."""
        return NEUTRAL + (["still"] if self.still else [])


def _real(folder: Path, frames: Optional[int] = None, max_side: int = 720, consecutive: bool = False) -> Callable[[], torch.Tensor]:
    """frames: that many spread evenly over the capture, or its first ones with `consecutive` (a
    slower camera over the same footage); None: all."""
    def load() -> torch.Tensor:
        video = load_video(folder, max_side=max_side)
        total = len(video.frames)
        if frames is None:
            keep = list(range(total))
        else:
            keep = list(range(min(frames, total))) if consecutive else uniform_indices(total, frames)
        return video.frames[keep]

    return load


def _bulge(frames: torch.Tensor) -> torch.Tensor:
    return corrupt_frames(frames, "bulge", seed=3, amplitude_px=12.0)


def _rendered(scene: str, trajectory: str, frames: int, size: tuple[int, int], movers: int = 0):
    """clean, deform and (with movers) still frame makers of a synthetic set."""
    clean = lambda: render_video(scene, trajectory, frames=frames, size=size, movers=movers).frames  # noqa: E731
    deform = lambda _: render_video(scene, trajectory, frames=frames, size=size, movers=movers, corruption="deform").frames  # noqa: E731
    still = (lambda: render_video(scene, trajectory, frames=frames, size=size).frames) if movers else None  # noqa: E731
    return clean, deform, still


def video_sets() -> list[VideoSet]:
    sets = []
    for name in ("statue", "kitchen"):
        folder = SHARED / "real" / name
        if folder.is_dir():
            sets.append(VideoSet(name, _real(folder), _bulge))
            sets.append(VideoSet(f"{name}-8", _real(folder, frames=8), _bulge))
    for name in ("bear", "backpack"):
        path = SHARED / "real-dynamic" / f"{name}.mp4"
        if path.is_file():
            sets.append(VideoSet(name, _real(path, frames=49), _bulge, fps=16.0))
    for name, args in {
        "syn-orbit": ("boxes", "orbit", 24, (240, 320)),
        "syn-dolly": ("room", "dolly", 24, (240, 320)),
        "syn-slow": ("boxes", "slow", 49, (480, 720)),
        "syn-slow-movers": ("boxes", "slow", 49, (480, 720), 2),
        "syn-slow-crowd": ("boxes", "slow", 49, (480, 720), 6),  # six movers, about 6% of the pixels
        "syn-pan": ("boxes", "pan", 49, (480, 720), 2),  # a tripod pan with two movers: no parallax at all
    }.items():
        clean, deform, still = _rendered(*args)
        sets.append(VideoSet(name, clean, deform, fps=16.0, still=still))
    return sets


def held_out_sets() -> list[VideoSet]:
    """Variants of the shared footage that no setting was chosen on (`--held-out`): other frame
    subsets and other corruption seeds. What the scorer gets right only on the sets it was tuned
    on, it gets wrong here."""
    sets = []
    kitchen, statue = SHARED / "real" / "kitchen", SHARED / "real" / "statue"
    if kitchen.is_dir():
        sets.append(VideoSet("kitchen-12", _real(kitchen, frames=12), _bulge, seed=2))
    if statue.is_dir():  # its first 8 of 9 frames, where statue-8 spreads 8 over all 9
        sets.append(VideoSet("statue-first8", _real(statue, frames=8, consecutive=True), _bulge, seed=2))
    for name in ("bear", "backpack"):  # the first 49 frames: the camera moves about 60% as far
        path = SHARED / "real-dynamic" / f"{name}.mp4"
        if path.is_file():
            sets.append(VideoSet(f"{name}-slow", _real(path, frames=49, consecutive=True), _bulge, fps=16.0, seed=2))
    return sets


def chosen_sets(names: str) -> dict[str, VideoSet]:
    """The usual sets (`video_sets`, in their order) named in the comma-separated `names`, by name;
    exits naming any that is unknown or whose data is absent (for the scripts built on these sets)."""
    wanted = [name for name in names.split(",") if name]
    sets = {s.name: s for s in video_sets() if s.name in wanted}
    missing = [name for name in wanted if name not in sets]
    if missing:
        sys.exit(f"unknown or unavailable sets: {missing} (real sets need ../shared/data)")
    return sets


def machine_line(config: ScoreConfig) -> str:
    """The machine, its threads and the metric_id of the default backend: the first line of a run's output."""
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
            f"metric {config.metric_id(f'colmap-flow.r{ColmapFlowBackend.revision}', 'align')}")


def build_files(video_set: VideoSet, cache: Path) -> dict[str, Path]:
    """clean, corruptions and neutral copies as H.264 files (those in the cache folder are reused)."""
    folder = cache / video_set.name
    paths = {kind: folder / f"{kind}.mp4" for kind in ["clean", *CORRUPTIONS, *video_set.neutral]}
    missing = [kind for kind, path in paths.items() if not path.is_file()]
    if not missing:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    clean = video_set.clean()
    for kind in missing:
        if kind == "clean":
            frames = clean
        elif kind == "deform":
            frames = video_set.deform(clean)
        elif kind == "still":
            frames = video_set.still()
        elif kind in _NEUTRAL_COPY:
            frames = _NEUTRAL_COPY[kind](clean)
        else:
            corruption, amplitude = _IMAGE_CORRUPTION[kind]
            frames = corrupt_frames(clean, corruption, seed=video_set.seed, amplitude_px=amplitude)
        write_video(paths[kind], frames, fps=video_set.fps)
    return paths


@dataclass
class Scored:
    score: Optional[float]
    reason: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def score_project(path: Path, config: ScoreConfig, backend: Optional[GeometryBackend] = None) -> Scored:
    start = time.perf_counter()
    result = score_video(path, config, backend=backend)
    seconds = time.perf_counter() - start
    extra = {"coverage": result.coverage, "registered": result.registered_frames, "moving_fraction": result.moving_fraction}
    return Scored(result.score if result.status == "ok" else None, result.reason or "", seconds, extra)


def score_baseline(path: Path, frames: int) -> Scored:
    start = time.perf_counter()
    video = load_video(path, wanted=lambda total: uniform_indices(total, frames), max_side=720)
    result = epipolar_error(video.frames)
    return Scored(result.error_px, "" if result.error_px is not None else "no measurable pair", time.perf_counter() - start)


def _with_threads(n: int, fn):
    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv_threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="", help="comma-separated set names (default: all available)")
    # "-2": sets written before write_video was repeatable (no MB-tree) are not these videos.
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vgpa-validity-2")
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--held-out", action="store_true", help="the held-out sets (held_out_sets) instead of the usual ones")
    parser.add_argument("--backend-options", type=json.loads, default=None, metavar="JSON",
                        help='settings of the default backend to measure, e.g. \'{"mask_moving_features": false}\'')
    args = parser.parse_args()
    config = ScoreConfig()
    backend = ColmapFlowBackend(**args.backend_options) if args.backend_options else None
    wanted = [s for s in args.sets.split(",") if s]
    sets = [s for s in (held_out_sets() if args.held_out else video_sets()) if not wanted or s.name in wanted]
    if not sets:
        sys.exit(f"no sets to run (shared data at {SHARED}?)")

    rows, times = [], []
    for video_set in sets:
        paths = build_files(video_set, args.cache)
        ours = {kind: score_project(path, config, backend) for kind, path in paths.items()}
        repeat = score_project(paths["clean"], config, backend)
        one_thread = _with_threads(1, lambda: score_project(paths["clean"], config, backend))
        times += [(s.seconds, f"{video_set.name}/{kind}") for kind, s in ours.items()]
        times += [(repeat.seconds, f"{video_set.name}/clean again"), (one_thread.seconds, f"{video_set.name}/clean 1 thread")]
        base = {} if args.no_baseline else {kind: score_baseline(path, config.frames) for kind, path in paths.items()}
        clean = ours["clean"].score
        spread = _relative_spread(clean, [repeat.score, one_thread.score])
        neutral_kinds = video_set.neutral
        neutral = _relative_spread(clean, [ours[k].score for k in neutral_kinds])
        for kind in CORRUPTIONS:
            row = {"set": video_set.name, "corruption": kind, "clean": clean, "corrupted": ours[kind].score,
                   "clean_s": ours["clean"].seconds, "corrupted_s": ours[kind].seconds,
                   "clean_reason": ours["clean"].reason, "corrupted_reason": ours[kind].reason,
                   "spread": spread, "neutral_spread": neutral,
                   "neutral": {k: ours[k].score for k in neutral_kinds},
                   "clean_extra": ours["clean"].extra, "corrupted_extra": ours[kind].extra}
            if base:
                row.update(baseline_clean=base["clean"].score, baseline_corrupted=base[kind].score,
                           baseline_neutral_spread=_relative_spread(base["clean"].score, [base[k].score for k in neutral_kinds]))
            rows.append(row)
        print(f"{video_set.name:>16}: clean {_fmt(clean)} ({ours['clean'].reason or 'ok'}; "
              f"repeat {_fmt(repeat.score)}, 1 thread {_fmt(one_thread.score)}; neutral "
              + " ".join(f"{k}={_fmt(ours[k].score)}" for k in neutral_kinds) + ") "
              + " ".join(f"{k}={_fmt(ours[k].score)}" for k in CORRUPTIONS)
              + (f" | baseline clean {_fmt(base['clean'].score)} (neutral "
                 + " ".join(f"{k}={_fmt(base[k].score)}" for k in neutral_kinds) + ") "
                 + " ".join(f"{k}={_fmt(base[k].score)}" for k in CORRUPTIONS) if base else ""),
              flush=True)
    _report(rows, times, with_baseline=not args.no_baseline)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "seconds": [seconds for seconds, _ in times]}, indent=1))


def _percent(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _fmt(x: Optional[float]) -> str:
    return "unscorable" if x is None else f"{x:.4f}"


def _relative_spread(clean: Optional[float], others: list[Optional[float]]) -> Optional[float]:
    """Largest |other - clean| / clean (inf when another is unscorable); None when clean is."""
    if clean is None:
        return None
    return max((abs(o - clean) / clean if o is not None else float("inf") for o in others), default=0.0)


def _right(clean: Optional[float], corrupted: Optional[float], margin: float = 0.0) -> bool:
    """Both scored and the clean video better; with `margin`, better by more than that fraction."""
    return clean is not None and corrupted is not None and clean * (1 + margin) < corrupted


def _weakest_margin(clean: Optional[float], corrupted: list[Optional[float]], neutral: Optional[float]) -> float:
    """The smallest (corrupted - clean) / clean over a set's corruptions, in units of its neutral
    spread: below 1, some corruption scores closer to the clean video than an equally consistent
    copy does; negative, one ranks wrong; -inf when anything is unscorable (or the spread is)."""
    if clean is None or neutral is None or any(c is None for c in corrupted) or math.isinf(neutral):
        return -math.inf
    margins = [(c - clean) / clean for c in corrupted]
    return min(m / neutral if neutral > 0 else math.copysign(math.inf, m) if m else 0.0 for m in margins)


def _set_standing(group: list[dict], prefix: str) -> tuple[int, int, float]:
    """(pairs right, pairs right beyond the neutral spread, weakest margin in neutral spreads) of one
    set's rows; prefix "baseline_" for the baseline's columns."""
    clean = group[0][prefix + "clean"]
    neutral = group[0][prefix + "neutral_spread"]
    corrupted = [r[prefix + "corrupted"] for r in group]
    return (sum(_right(clean, c) for c in corrupted), sum(_right(clean, c, neutral or 0.0) for c in corrupted),
            _weakest_margin(clean, corrupted, neutral))


def _verdict(ours: tuple[int, int, float], baseline: tuple[int, int, float]) -> str:
    """"ahead", "tie" or "behind" on one set: more pairs right; when equal, more right beyond the neutral
    spread; when equal too, the larger weakest margin (both perfect on the counts is then decided by how
    far the weakest corruption stands from the clean video, in neutral spreads)."""
    if ours == baseline:
        return "tie"
    return "ahead" if ours > baseline else "behind"


def _report(rows: list[dict], times: list[tuple[float, str]], with_baseline: bool) -> None:
    """times: (seconds, which video) of every scoring of ours."""
    print("\nper corruption: pairs right / total (unscorable clean, corrupted); smallest margin over the repeat "
          "spread; pairs right beyond the neutral spread")
    header = f"{'corruption':>10} | {'ours':>8} {'unscorable':>10} {'margin/spread':>13} {'beyond':>6}"
    print(header + (f" | {'baseline':>8} {'unscorable':>10} {'beyond':>6}" if with_baseline else ""))
    groups = {k: [r for r in rows if r["corruption"] == k] for k in CORRUPTIONS}
    groups["all"] = rows
    for kind, group in groups.items():
        right = sum(_right(r["clean"], r["corrupted"]) for r in group)
        beyond = sum(_right(r["clean"], r["corrupted"], r["neutral_spread"] or 0.0) for r in group)
        uns = (sum(r["clean"] is None for r in group), sum(r["corrupted"] is None for r in group))
        ratios = [((r["corrupted"] - r["clean"]) / r["clean"]) / r["spread"] if r["spread"] > 0 else float("inf")
                  for r in group if _right(r["clean"], r["corrupted"])]
        line = (f"{kind:>10} | {right:>3} / {len(group):<3} {uns[0]:>4}, {uns[1]:<4} "
                f"{min(ratios, default=float('nan')):>13.1f} {beyond:>6}")
        if with_baseline:
            b_right = sum(_right(r["baseline_clean"], r["baseline_corrupted"]) for r in group)
            b_beyond = sum(_right(r["baseline_clean"], r["baseline_corrupted"], r["baseline_neutral_spread"] or 0.0) for r in group)
            b_uns = (sum(r["baseline_clean"] is None for r in group), sum(r["baseline_corrupted"] is None for r in group))
            line += f" | {b_right:>3} / {len(group):<3} {b_uns[0]:>4}, {b_uns[1]:<4} {b_beyond:>6}"
        print(line)
    print("\nper set: pairs right, right beyond neutral, weakest margin in neutral spreads (ours / baseline); "
          "neutral spread (ours / baseline); verdict")
    verdicts = {}
    for name in dict.fromkeys(r["set"] for r in rows):
        group = [r for r in rows if r["set"] == name]
        ours = _set_standing(group, "")
        line = f"{name:>16}: {ours[0]}, {ours[1]}, {ours[2]:.2f}"
        if with_baseline:
            base = _set_standing(group, "baseline_")
            verdicts[name] = _verdict(ours, base)
            line = (f"{name:>16}: {ours[0]} / {base[0]}, {ours[1]} / {base[1]}, {ours[2]:.2f} / {base[2]:.2f}; "
                    f"{_percent(group[0]['neutral_spread'])} / {_percent(group[0]['baseline_neutral_spread'])}; "
                    f"{verdicts[name]}")
        print(line)
    if verdicts:
        behind = [name for name, v in verdicts.items() if v != "ahead"]
        print(f"ahead of the baseline on {len(verdicts) - len(behind)} of {len(verdicts)} sets"
              + ("; not on: " + ", ".join(f"{name} ({verdicts[name]})" for name in behind) if behind else ""))
    seconds = [t for t, _ in times]
    slowest = sorted(times, reverse=True)[:3]
    print(f"\ntime per video (ours): median {statistics.median(seconds):.1f} s, worst {max(seconds):.1f} s "
          f"(targets: median <= 6 s, worst <= 15 s on 2 cores); slowest: " + ", ".join(f"{w} {t:.1f} s" for t, w in slowest))


if __name__ == "__main__":
    main()
