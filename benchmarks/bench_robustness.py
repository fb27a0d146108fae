"""What real footage and generated clips carry besides the scene: does the score stay a 3D-consistency score?

For each chosen set of `bench_validity.py` (its cached H.264 files: clean, 6 px drift, 3 px jitter)
the clips get what the benchmark's files do not have, and are scored with the default settings and,
in the same run, with the setting that handles it switched off, and by the epipolar baseline:

- caption 1x / 2x: white letters outlined in grey fixed near the bottom-right corner (a watermark, a
  logo: `common.synthetic.with_caption`; 0.6% / 2% of a 720 x 480 frame), on the clean, drifted
  and jittered clip: the ranking clean < drift < jitter must hold, and the clean clip should score
  as without it (`mask_overlays`);
- letterbox: black bars over 1/8 of the height added above and below the clean clip (`crop_borders`);
- cut: the clean clip's last 30% replaced by another set's clean clip, cropped to the same size: no
  single 3D scene explains it (`detect_cuts`), it must not score like the clean clip;
- morph at 70%: the clean clip's last 30% cross-fading into another set's clip (`common.synthetic.cross_fade`):
  no cut, yet its last frames fit no single scene and often do not register; left out, they cost
  nothing (`pose_from_neighbours`), and the clip must not score like the clean one;
- zoom 1.3x: the clean clip scaled about its centre, growing linearly to 1.3x at the last frame. A
  consistent video; one focal length per video cannot explain it (an open case, printed to track it).

    python benchmarks/bench_robustness.py [--sets syn-slow,syn-slow-crowd,bear,backpack] [--cache DIR]

Each line: the video, the project's score with the default settings, with the handling setting off,
the baseline's (mean Sampson distance, px), and seconds of the default scoring.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.config import ScoreConfig  # noqa: E402
from common.scoring import score_video  # noqa: E402
from common.synthetic import cross_fade, false_colour, with_caption  # noqa: E402
from common.video import load_video, write_video  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_validity as validity  # noqa: E402  (its sets, cached files and baseline)

DEFAULT_SETS = ["syn-slow", "syn-slow-crowd", "bear", "backpack"]


def letterboxed(frames: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 with black bars of H / 8 added above and below."""
    bar = torch.zeros(frames.shape[0], frames.shape[1] // 8, *frames.shape[2:], dtype=frames.dtype)
    return torch.cat([bar, frames, bar], dim=1)


def cut_to(frames: torch.Tensor, other: torch.Tensor, at: float = 0.7) -> torch.Tensor:
    """`frames` whose last 1 - `at` are `other`'s frames (both cropped to the smaller size)."""
    height, width = min(frames.shape[1], other.shape[1]), min(frames.shape[2], other.shape[2])
    first = round(at * len(frames))
    tail = other[first:len(frames)] if len(other) >= len(frames) else other[-(len(frames) - first):]
    return torch.cat([frames[:first, :height, :width], tail[:, :height, :width]])


def zoomed(frames: torch.Tensor, end: float = 1.3) -> torch.Tensor:
    """(N, H, W, 3) uint8 scaled about the centre by 1 at the first frame to `end` at the last."""
    n, height, width, _ = frames.shape
    out = []
    for i, frame in enumerate(frames.numpy()):
        s = 1 + (end - 1) * i / max(n - 1, 1)
        move = np.float32([[s, 0, (1 - s) * width / 2], [0, s, (1 - s) * height / 2]])
        out.append(cv2.warpAffine(frame, move, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return torch.from_numpy(np.stack(out))


def _score(path: Path, config: ScoreConfig) -> tuple[str, float, str]:
    """(score or "unscorable", seconds, reason)."""
    start = time.perf_counter()
    result = score_video(path, config)
    seconds = time.perf_counter() - start
    return (f"{result.score:.4f}" if result.status == "ok" else "unscorable"), seconds, result.reason or ""


def _line(name: str, path: Path, off: Optional[str], config: ScoreConfig) -> None:
    ours, seconds, reason = _score(path, config)
    switched = _score(path, config.model_copy(update={off: False}))[0] if off else "-"
    baseline = validity.score_baseline(path, config.frames).score
    print(f"  {name:<22} {ours:>12}  {switched:>12}  {baseline if baseline is None else f'{baseline:.3f}':>8}  {seconds:5.1f} s"
          + (f"  ({reason})" if reason else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vgpa-validity-2")
    args = parser.parse_args()
    sets = validity.chosen_sets(args.sets)
    config = ScoreConfig()
    print(validity.machine_line(config))
    print(f"  {'video':<22} {'default':>12}  {'handling off':>12}  {'baseline':>8}  time")
    with tempfile.TemporaryDirectory(prefix="vgpa-robust-") as tmp:
        folder = Path(tmp)
        files = {name: validity.build_files(video_set, args.cache) for name, video_set in sets.items()}
        names = list(sets)
        for k, name in enumerate(names):
            print(f"{name}")
            fps = sets[name].fps
            clips = {kind: load_video(files[name][kind]).frames for kind in ("clean", "drift6", "warp3")}
            for kind, frames in clips.items():
                _line(kind, files[name][kind], None, config)
            for scale in (1.0, 2.0):
                for kind, frames in clips.items():
                    path = write_video(folder / f"{name}-caption{scale:g}-{kind}.mp4", with_caption(frames, scale=scale)[0], fps=fps)
                    _line(f"caption {scale:g}x, {kind}", path, "mask_overlays", config)
            path = write_video(folder / f"{name}-letterbox.mp4", letterboxed(clips["clean"]), fps=fps)
            _line("letterbox, clean", path, "crop_borders", config)
            # Another set's clip, or with one set its own clip backwards in false colour (another scene's hues).
            other = load_video(files[names[(k + 1) % len(names)]]["clean"]).frames if len(names) > 1 else false_colour(clips["clean"].flip(0))
            cut = cut_to(clips["clean"], other)
            if cut.shape[1:3] != clips["clean"].shape[1:3]:
                path = write_video(folder / f"{name}-cropped.mp4", clips["clean"][:, :cut.shape[1], :cut.shape[2]].contiguous(), fps=fps)
                _line("clean, cropped as cut", path, None, config)
            _line("cut at 70%, clean", write_video(folder / f"{name}-cut.mp4", cut, fps=fps), "detect_cuts", config)
            path = write_video(folder / f"{name}-morph.mp4", cross_fade(clips["clean"], other), fps=fps)
            _line("morph at 70%, clean", path, "pose_from_neighbours", config)
            path = write_video(folder / f"{name}-zoom.mp4", zoomed(clips["clean"]), fps=fps)
            _line("zoom 1.3x, clean", path, None, config)


if __name__ == "__main__":
    main()
