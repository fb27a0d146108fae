"""`vgpa eval A [B]`: geometry metrics of one set of videos, or two sets side by side (e.g. base vs LoRA)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from clients.commands.score import config_from_options


@click.command(
    name="eval",
    help=(
        "Evaluate videos with every geometry metric (reprojection PSNR/SSIM/LPIPS, MVCS, epipolar error). "
        "A and B: folders of videos (or .txt lists of paths); with both, videos are paired by file name "
        "and the win rate of B over A is reported. Writes eval.csv, eval.json and eval.png to --out."
    ),
)
@click.argument("set_a", metavar="A")
@click.argument("set_b", metavar="[B]", required=False)
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval-results"), show_default=True, help="Output folder.")
@click.option("--names", help="Labels of the two sets, comma separated (default: the folder names).")
@click.option("--frames", type=int, help="Frames sampled uniformly per video (default 10).")
@click.option("--backend", help="Geometry backend (default colmap-flow).")
@click.option("--weights", type=click.Path(path_type=Path), help="Local weights for a learned backend.")
@click.option("--max-side", type=int, help="Resize so the long side is at most this many pixels (default 720).")
@click.option("--ray", "use_ray", is_flag=True, help="Evaluate videos as Ray tasks (local Ray, or the cluster at --address / RAY_ADDRESS).")
@click.option("--address", help="Ray cluster address for --ray (default: RAY_ADDRESS, else a local Ray).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(set_a, set_b, out, names, frames, backend, weights, max_side, use_ray, address, as_json, quiet):
    from tqdm import tqdm

    from common.evaluation import collect_videos, evaluate_set, format_table, summarise, write_outputs
    from common.geometry import create_backend

    config = config_from_options(frames=frames, backend=backend, weights=weights, max_side=max_side)
    labels = tuple(names.split(",")) if names else tuple(Path(s).name or s for s in (set_a, set_b) if s)
    if set_b is not None and len(labels) != 2:
        raise click.BadParameter("give two labels, e.g. --names base,lora", param_hint="--names")
    videos_a = collect_videos(set_a)
    videos_b = collect_videos(set_b) if set_b is not None else None
    if videos_b is not None and not set(videos_a) & set(videos_b):
        # Unpaired videos are still evaluated (they count in their set's means); none paired is a mistake.
        from common.errors import ConfigError

        raise ConfigError(f"no video names are shared by {set_a} and {set_b}: videos are paired by file name")
    geometry = create_backend(config.backend, config.weights)  # here too: a missing model fails before any work

    def bar(label):
        return lambda items: tqdm(items, desc=f"eval {label}", unit="video", disable=quiet, file=sys.stderr)

    if use_ray:
        from training.eval_job import evaluate_set_ray
        from training.ray_session import ensure_ray

        ensure_ray(address)

        def run_set(videos, label, set_name):
            with tqdm(total=len(videos), desc=f"eval {label}", unit="video", disable=quiet, file=sys.stderr) as progress:
                return evaluate_set_ray(videos, config, set_name, on_done=lambda row: progress.update(1))
    else:

        def run_set(videos, label, set_name):
            return evaluate_set(videos, config, geometry, bar(label), label=set_name)

    rows_a = run_set(videos_a, labels[0], "A")
    rows_b = run_set(videos_b, labels[1], "B") if videos_b is not None else None
    summary = summarise(rows_a, rows_b)
    settings = dict(sets=[str(set_a)] + ([str(set_b)] if set_b else []), names=list(labels), backend=geometry.name,
                    metric_id=config.metric_id(geometry.score_id, "eval"), frames=config.frames, max_side=config.max_side)
    paths = write_outputs(out, rows_a + (rows_b or []), summary, settings, labels)
    if as_json:
        sys.stdout.write(json.dumps({"summary": summary, "outputs": {k: str(v) for k, v in paths.items()}}) + "\n")
    else:
        click.echo(format_table(summary, (labels + ("B",))[:2]))
        failed = [r for r in rows_a + (rows_b or []) if r["status"] != "ok"]
        if failed:
            click.echo(f"{len(failed)} video(s) not fully measured: " + "; ".join(f"{r['set']}/{r['name']}: {r['reason']}" for r in failed[:5]))
        click.echo(f"wrote {paths['csv']}, {paths['json']}, {paths['png']}")


COMMANDS = [eval_command]
