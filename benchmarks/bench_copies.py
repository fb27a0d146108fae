"""Does the ranking hold on footage no setting was chosen on? Copies of the benchmark's clips.

The validity benchmark's corruptions are single draws on single clips, and every setting of the
scorer was measured on them. Here each chosen set's clean clip (`bench_validity.py`'s sets) is
turned into copies that are exactly as 3D-consistent as the original:

- original;
- mirrored: left and right swapped (the mirror image of a scene is a scene);
- backwards: played in reverse (the camera flies the path back);
- crop 3:4: the centre of each frame, its long side cut to 3/4 of its short side (a landscape
  shot reframed as portrait, a portrait one as landscape: a narrower view, the moving things
  larger in it);
- 1360 px / 360 px: resized to that width (a larger and a smaller encode of the same shot);

and each copy gets the benchmark's 6 px progressive drift and 3 px jitter drawn anew on it (the
set's seed; amplitudes in pixels of the original, scaled with the copy's resizing). Every copy
must score its clean clip better than both corruptions. The project and the epipolar baseline (on
the same scored frames) are scored in the same run.

    python benchmarks/bench_copies.py [--sets statue,kitchen,bear,backpack]

Each line: the set and copy, the clean score, each corruption's change over it (an unscorable
video is counted as a wrong pair), the same for the baseline, and the seconds of the project's
three scorings. Last, the pairs right out of all of them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.config import ScoreConfig  # noqa: E402
from common.scoring import score_video  # noqa: E402
from common.synthetic import corrupt_frames  # noqa: E402
from common.video import write_video  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_validity as validity  # noqa: E402  (its sets and baseline)

DEFAULT_SETS = ["statue", "kitchen", "bear", "backpack"]
CORRUPTIONS = {"drift6": ("drift", 6.0), "warp3": ("warp", 3.0)}


def mirrored(frames: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) with left and right swapped."""
    return frames.flip(2).contiguous()


def backwards(frames: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) in reverse order."""
    return frames.flip(0).contiguous()


def centre_crop(frames: torch.Tensor, aspect: float = 3 / 4) -> torch.Tensor:
    """(N, H', W', 3): the centre, its long side cut to `aspect` x the short side (even): a
    landscape shot reframed as portrait, a portrait one as landscape."""
    height, width = frames.shape[1:3]
    kept = int(aspect * min(height, width)) // 2 * 2
    if width >= height:
        left = (width - kept) // 2
        return frames[:, :, left:left + kept].contiguous()
    top = (height - kept) // 2
    return frames[:, top:top + kept].contiguous()


def resized(frames: torch.Tensor, width: int) -> torch.Tensor:
    """(N, H', width, 3) uint8, the aspect ratio kept (H' even), antialiased bilinear."""
    height = round(frames.shape[1] * width / frames.shape[2] / 2) * 2
    scaled = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# name -> (copy of the clean frames, how much the copy scales the picture: the corruptions' amplitudes follow it)
COPIES: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, float]]] = {
    "original": lambda frames: (frames, 1.0),
    "mirrored": lambda frames: (mirrored(frames), 1.0),
    "backwards": lambda frames: (backwards(frames), 1.0),
    "crop 3:4": lambda frames: (centre_crop(frames), 1.0),
    "1360 px": lambda frames: (resized(frames, 1360), 1360 / frames.shape[2]),
    "360 px": lambda frames: (resized(frames, 360), 360 / frames.shape[2]),
}


def _change(clean: Optional[float], corrupted: Optional[float]) -> str:
    if clean is None or corrupted is None:
        return "unscorable"
    return f"{100 * (corrupted - clean) / clean:+.0f}%"


def _right(clean: Optional[float], corrupted: Optional[float]) -> bool:
    return clean is not None and corrupted is not None and corrupted > clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS))
    args = parser.parse_args()
    sets = validity.chosen_sets(args.sets)
    config = ScoreConfig()
    print(validity.machine_line(config))
    print(f"  {'copy':<20} {'clean':>10} " + " ".join(f"{k:>10}" for k in CORRUPTIONS)
          + f" | {'baseline':>8} " + " ".join(f"{k:>10}" for k in CORRUPTIONS) + "   time")
    right, baseline_right, total = 0, 0, 0
    with tempfile.TemporaryDirectory(prefix="vgpa-copies-") as tmp:
        for name, video_set in sets.items():
            clean_frames = video_set.clean()
            for copy_name, make in COPIES.items():
                frames, scale = make(clean_frames)
                videos = {"clean": frames}
                for kind, (corruption, amplitude) in CORRUPTIONS.items():
                    videos[kind] = corrupt_frames(frames, corruption, seed=video_set.seed, amplitude_px=amplitude * scale)
                ours, base, seconds = {}, {}, 0.0
                for kind, video in videos.items():
                    path = write_video(Path(tmp) / f"{name}-{copy_name.replace(' ', '_').replace(':', 'x')}-{kind}.mp4", video, fps=video_set.fps)
                    start = time.perf_counter()
                    result = score_video(path, config)
                    seconds += time.perf_counter() - start
                    ours[kind] = result.score if result.status == "ok" else None
                    base[kind] = validity.score_baseline(path, config.frames).score
                for kind in CORRUPTIONS:
                    right += _right(ours["clean"], ours[kind])
                    baseline_right += _right(base["clean"], base[kind])
                    total += 1
                clean = "unscorable" if ours["clean"] is None else f"{ours['clean']:.4f}"
                b_clean = "-" if base["clean"] is None else f"{base['clean']:.3f}"
                print(f"  {name + ', ' + copy_name:<20} {clean:>10} "
                      + " ".join(f"{_change(ours['clean'], ours[k]):>10}" for k in CORRUPTIONS)
                      + f" | {b_clean:>8} " + " ".join(f"{_change(base['clean'], base[k]):>10}" for k in CORRUPTIONS)
                      + f"  {seconds:5.1f} s", flush=True)
    print(f"\npairs right (clean better than the corruption; unscorable counts as wrong): ours {right} / {total}, "
          f"baseline {baseline_right} / {total}")


if __name__ == "__main__":
    main()
