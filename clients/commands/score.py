"""`vgpa score`: score one video locally, or through a running service with --url."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import get_args

import click
from pydantic import ValidationError

from common.config import PerceptualChoice, ScoreConfig
from common.errors import invalid_settings


def config_from_options(**options) -> ScoreConfig:
    """A ScoreConfig from the options the user gave (None = default); invalid values are a ConfigError."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return ScoreConfig(**given)
    except ValidationError as err:
        raise invalid_settings(err, "score setting") from None


def service_form(options: dict) -> dict:
    """The options a service request carries (`common.scorer.ScoreRequest`: every one the service accepts),
    checked against that schema before anything is sent; an option only the service's operator sets is refused."""
    from common.scorer import ScoreRequest

    given = {k: v for k, v in options.items() if v is not None}
    accepted = {info.alias or name for name, info in ScoreRequest.model_fields.items()}
    refused = sorted(k for k in given if k not in accepted)
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise click.UsageError(
            f"{flags}: the service does not take {'this option' if len(refused) == 1 else 'these options'} from a request "
            f"(its operator sets them in the scorer's config); with --url only "
            f"{', '.join('--' + k.replace('_', '-') for k in sorted(accepted))} can be given, or score locally without --url.")
    try:
        return ScoreRequest.model_validate(given).model_dump(by_alias=True, exclude_none=True)
    except ValidationError as err:
        raise invalid_settings(err, "score setting") from None


class StageProgress:
    """Prints each stage to stderr as it starts, with the time the previous one took."""

    def __init__(self, label: str) -> None:
        self.label, self.last, self.started = label, None, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        if self.last is not None:
            click.echo(f"  {self.last} {now - self.started:.1f}s", err=True)
        self.last, self.started = stage, now
        click.echo(f"[vgpa] {self.label}: {stage}...", err=True)


def format_result(name: str, result: dict) -> str:
    """The short human table of a score result (a ScoreResult as JSON dict)."""
    lines = []
    if result["status"] == "ok":
        lines.append(
            f"{name}: ok  score {result['score']:.4f}  "
            f"(mse {result['mse']:.4f} + {result['lambda']:g} x {result['perceptual_metric']} {result['perceptual']:.4f})"
        )
    else:
        lines.append(f"{name}: UNSCORABLE  {result['reason']}")
    lines.append(f"  metric    {result['metric_id']}")
    coverage = f"{result['coverage']:.2f}" if result.get("coverage") is not None else "-"
    motion = f"{result['motion']:.4f}" if result.get("motion") is not None else "-"
    posed = sum(1 for row in result["per_frame"] if row.get("posed_from_neighbours"))
    lines.append(
        f"  frames    {result['frames']} scored, {result['registered_frames']} registered"
        + (f", {posed} posed from neighbours" if posed else "")
        + f", coverage {coverage}, camera motion {motion}"
        + (f", field of view {result['fov_deg']:.0f} deg" if result.get("fov_deg") is not None else "")
        + (", turning in place (no parallax)" if result.get("turning_in_place") else "")
    )
    left_out = []
    if result.get("moving_fraction"):
        left_out.append(f"moving things {100 * result['moving_fraction']:.1f}%")
    if result.get("overlay_fraction"):
        left_out.append(f"screen overlay {100 * result['overlay_fraction']:.1f}%")
    if any(result.get("borders") or ()):
        left_out.append("bars {} / {} / {} / {} px (top / bottom / left / right)".format(*result["borders"]))
    if left_out:
        lines.append("  left out  " + ", ".join(left_out))
    if result.get("shot_cuts"):
        lines.append("  cuts      to another shot at frame " + ", ".join(map(str, result["shot_cuts"])))
    lines.append(f"  {'frame':>7} {'mse':>8} {result['perceptual_metric']:>10} {'coverage':>9}  ok")
    for row in result["per_frame"]:
        mse = f"{row['mse']:.4f}" if row["mse"] is not None else "-"
        perc = f"{row['perceptual']:.4f}" if row["perceptual"] is not None else "-"
        posed_row = row.get("posed_from_neighbours", False)
        flag = "yes" if row["ok"] else ("low coverage" if row["registered"] or posed_row else "not registered")
        if posed_row:
            flag += " (posed from neighbours)"
        lines.append(f"  {row['index']:>7} {mse:>8} {perc:>10} {row['coverage']:>9.2f}  {flag}")
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result["timings_s"].items() if "." not in k)
    lines.append(f"  time      {timings}")
    if result.get("previews"):
        lines.append(f"  previews  {Path(result['previews'][0]).parent}")
    return "\n".join(lines)


@click.command(help="Score a video's 3D consistency (lower is better). PATH: a video file, a folder of ordered images or a zip of them.")
@click.argument("path")
@click.option("--frames", type=int, help="Frames sampled uniformly and scored (T, default 10).")
@click.option("--backend", help="Geometry backend (default colmap-flow).")
@click.option("--weights", type=click.Path(path_type=Path), help="Local weights for a learned backend.")
@click.option("--max-side", type=int, help="Resize so the long side is at most this many pixels (default 720).")
@click.option("--lambda", "lambda_", type=float, help="Weight of the perceptual term (default 1.0).")
@click.option("--perceptual", type=click.Choice(get_args(PerceptualChoice)), help="Perceptual metric.")
@click.option("--device", help="auto, cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--preview", type=click.Path(path_type=Path), help="Write original | reprojection | error PNGs here.")
@click.option("--url", help="Score through a running service (http://HOST:PORT) instead of locally.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def score(path, frames, backend, weights, max_side, lambda_, perceptual, device, as_json, preview, url, quiet):
    options = dict(frames=frames, backend=backend, weights=weights, max_side=max_side, perceptual=perceptual, device=device)
    options["lambda"] = lambda_
    if url:
        from clients.http_client import score_via_http

        result = score_via_http(url, path, preview_dir=preview, **service_form(options))
    else:
        from common.scoring import score_video

        config = config_from_options(**options)
        progress = None if quiet else StageProgress(Path(path).name)
        result = score_video(path, config, preview_dir=preview, progress=progress).to_json_dict()
        if progress:
            progress("done")
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        click.echo(format_result(Path(path).name, result))


COMMANDS = [score]
