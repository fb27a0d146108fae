"""Evaluation of one or two sets of videos with every metric of `common.metrics` (the logic of `vgpa eval`).

A set is a folder (video files, image folders, zips of images) or a text file listing one path a
line. With two sets A and B, videos are paired by name (file stem: generators name their outputs
by prompt and seed), and for each metric the win rate of B over A is the fraction of pairs,
measured in both, where B is better (ties count half).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from common.config import ScoreConfig
from common.errors import ConfigError, InputNotFoundError, VideoGPAError
from common.geometry import GeometryBackend, ReconstructionFailed
from common.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, load_video, to_float, uniform_indices

# metric -> True when higher is better. The order is the order of tables and plots.
METRICS: dict[str, bool] = {
    "psnr": True,
    "ssim": True,
    "lpips": False,
    "mvcs": True,
    "epipolar_px": False,
    "epipolar_inlier_rate": True,
    "coverage": True,
}
COUNTS = ("frames_measured", "mvcs_pairs", "mvcs_unmeasurable", "epipolar_pairs", "epipolar_unmeasurable")


def collect_videos(source: str | Path) -> dict[str, Path]:
    """name -> path of every video in a folder (or listed in a .txt file, one path a line)."""
    source = Path(source)
    if not source.exists():
        raise InputNotFoundError(f"no such folder or list: {source}")
    if source.is_file() and source.suffix.lower() == ".txt":
        paths = [Path(line.strip()) for line in source.read_text().splitlines() if line.strip() and not line.startswith("#")]
        paths = [p if p.is_absolute() else source.parent / p for p in paths]
    elif source.is_dir():
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in source.iterdir()):
            paths = [source]  # a folder of frames is one video
        else:
            paths = sorted(
                p for p in source.iterdir()
                if p.suffix.lower() in VIDEO_SUFFIXES | {".zip"} or (p.is_dir() and any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir()))
            )
    else:
        paths = [source]
    videos: dict[str, Path] = {}
    for path in paths:
        name = path.stem if path.is_file() else path.name
        if name in videos:
            raise ConfigError(f"two videos are called {name!r} in {source}: names pair the videos of two sets")
        videos[name] = path
    if not videos:
        raise ConfigError(f"{source} holds no videos ({', '.join(sorted(VIDEO_SUFFIXES))}, .zip, or folders of images)")
    return videos


def evaluate_video(source, config: ScoreConfig, backend: GeometryBackend, lpips_net=None) -> dict:
    """Every metric of one video: a flat dict (None where a metric could not be measured, with `reason`)."""
    from common.metrics import epipolar_error, mvcs, reprojection_metrics

    plan: dict[str, list[int]] = {}

    def wanted(total: int) -> list[int]:
        plan["scored"] = uniform_indices(total, config.frames)
        plan["recon"] = sorted(set(uniform_indices(total, config.recon_frames)) | set(plan["scored"]))
        return plan["recon"]

    video = load_video(source, wanted=wanted, max_side=config.max_side, max_input_side=config.max_input_side,
                       max_input_frames=config.max_input_frames)
    position = {index: p for p, index in enumerate(video.indices)}
    scored = [position[i] for i in plan["scored"]]
    row: dict = {name: None for name in METRICS} | {name: 0 for name in COUNTS}
    row.update(status="ok", reason=None, frames=len(scored), registered_frames=0, backend=backend.name)

    epipolar = epipolar_error(video.frames[scored])
    row.update(epipolar_px=epipolar.error_px, epipolar_inlier_rate=epipolar.inlier_rate,
               epipolar_pairs=epipolar.pairs_measured, epipolar_unmeasurable=epipolar.pairs_unmeasurable)
    try:
        geometry = backend.reconstruct(video.frames, scored, video.indices)
    except ReconstructionFailed as err:
        row.update(status="unmeasurable", reason=f"reconstruction failed: {err}")
        return row
    row["registered_frames"] = int(geometry.registered.sum())
    reprojection = reprojection_metrics(to_float(video.frames[scored]), geometry, config, lpips_net)
    row.update({k: v for k, v in asdict(reprojection).items()})
    consistency = mvcs(geometry, min_confidence=config.min_confidence)
    row.update(mvcs=consistency.value, mvcs_pairs=consistency.pairs_measured, mvcs_unmeasurable=consistency.pairs_unmeasurable)
    if row["registered_frames"] < 2:
        row.update(status="unmeasurable", reason=f"only {row['registered_frames']} frames registered")
    return row


def evaluate_set(videos: dict[str, Path], config: ScoreConfig, backend: GeometryBackend,
                 progress: Optional[Callable[[Iterable], Iterable]] = None, label: str = "A") -> list[dict]:
    """Rows of `evaluate_video` for every video; a video that cannot be read is a row with its error."""
    from common.metrics import load_lpips

    lpips_net = load_lpips(config)  # once per set, not per video
    items = list(videos.items())
    return [video_row(name, path, config, backend, lpips_net, label) for name, path in (progress(items) if progress else items)]


def video_row(name: str, path, config: ScoreConfig, backend: GeometryBackend, lpips_net=None, label: str = "A") -> dict:
    """One row of the results: `evaluate_video`, or the error of a video that cannot be read."""
    try:
        row = evaluate_video(path, config, backend, lpips_net)
    except VideoGPAError as err:
        row = {m: None for m in METRICS} | {c: 0 for c in COUNTS} | dict(status="error", reason=str(err))
    return dict(set=label, name=name, path=str(path)) | row


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def summarise(rows_a: list[dict], rows_b: Optional[list[dict]] = None) -> dict:
    """Per metric: count, mean and median of each set, and with two sets the win rate of B over A on pairs."""
    summary: dict = {"metrics": {}}
    by_name_b = {r["name"]: r for r in rows_b or []}
    paired = [(a, by_name_b[a["name"]]) for a in rows_a if a["name"] in by_name_b]
    if rows_b is not None:
        names_a = {r["name"] for r in rows_a}
        summary["pairs"] = len(paired)
        summary["only_in_a"] = sorted(names_a - set(by_name_b))
        summary["only_in_b"] = sorted(set(by_name_b) - names_a)
    for metric, higher_better in METRICS.items():
        entry = {"higher_is_better": higher_better}
        for label, rows in (("a", rows_a), ("b", rows_b)):
            if rows is None:
                continue
            values = _finite(r.get(metric) for r in rows)
            entry[label] = {
                "n": len(values), "unmeasured": len(rows) - len(values),
                "mean": float(np.mean(values)) if values else None,
                "median": float(np.median(values)) if values else None,
            }
        if rows_b is not None:
            wins, measured = 0.0, 0
            for a, b in paired:
                va, vb = a.get(metric), b.get(metric)
                if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
                    continue
                measured += 1
                wins += 0.5 if vb == va else float((vb > va) == higher_better)
            entry["pairs_measured"] = measured
            entry["win_rate_b"] = wins / measured if measured else None
        summary["metrics"][metric] = entry
    return summary


def format_table(summary: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """The side-by-side table printed by `vgpa eval`."""
    two = any("b" in e for e in summary["metrics"].values())
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    header = f"{'metric':<22}{names[0] + ' mean':>12}{names[0] + ' median':>14}{'n':>5}"
    if two:
        header += f"{names[1] + ' mean':>12}{names[1] + ' median':>14}{'n':>5}{names[1] + ' wins':>12}"
    lines = [header, "-" * len(header)]
    for metric, e in summary["metrics"].items():
        arrow = "↑" if e["higher_is_better"] else "↓"
        line = f"{metric + ' ' + arrow:<22}{fmt(e['a']['mean']):>12}{fmt(e['a']['median']):>14}{e['a']['n']:>5}"
        if two:
            win = "-" if e["win_rate_b"] is None else f"{100 * e['win_rate_b']:.0f}%"
            line += f"{fmt(e['b']['mean']):>12}{fmt(e['b']['median']):>14}{e['b']['n']:>5}{win:>12}"
        lines.append(line)
    if two:
        lines.append(f"{summary['pairs']} pairs by name; {names[1]} wins: share of the pairs measured in both where "
                     f"{names[1]} is better (ties count half); - : not measured (e.g. LPIPS without its weights)")
        for key in ("only_in_a", "only_in_b"):
            if summary[key]:
                lines.append(f"unpaired ({key.replace('_', ' ')}): {', '.join(summary[key][:10])}"
                             + (" ..." if len(summary[key]) > 10 else ""))
    return "\n".join(lines)


def write_outputs(out_dir: Path, rows: list[dict], summary: dict, settings: dict, names: tuple[str, ...]) -> dict[str, Path]:
    """eval.csv (one row per video), eval.json (rows, summary, settings) and eval.png (distributions)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "eval.csv", "json": out_dir / "eval.json", "png": out_dir / "eval.png"}
    columns = ["set", "name", "status", "reason", *METRICS, *COUNTS, "frames", "registered_frames", "backend", "path"]
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps({"settings": settings, "summary": summary, "videos": rows}, indent=2, default=str))
    plot_distributions(paths["png"], rows, names)
    return paths


def plot_distributions(path: Path, rows: list[dict], names: tuple[str, ...]) -> None:
    """One panel per metric: each set's per-video values as a box plot with the points on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in rows})
    fig, axes = plt.subplots(1, len(METRICS), figsize=(2.4 * len(METRICS), 3.2))
    for ax, (metric, higher_better) in zip(axes, METRICS.items()):
        data = [_finite(r.get(metric) for r in rows if r["set"] == s) for s in sets]
        positions = list(range(1, len(sets) + 1))
        shown = [(p, d) for p, d in zip(positions, data) if d]
        if shown:
            ax.boxplot([d for _, d in shown], positions=[p for p, _ in shown], widths=0.5, showfliers=False)
            for p, d in shown:
                jitter = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else [0.0]
                ax.scatter(np.asarray(jitter) + p, d, s=10, alpha=0.7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, fontsize=8, color="grey")
        ax.set_xticks(positions)
        ax.set_xticklabels([names[i] if i < len(names) else s for i, s in enumerate(sets)], fontsize=8)
        ax.set_title(f"{metric} {'↑' if higher_better else '↓'}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
